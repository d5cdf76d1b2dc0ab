"""The per-severity constants of CIFAR-10-C and ImageNet-C, which table an image uses, the
factor that scales lengths in pixels to its size, and the conversions between uint8 and
[0, 1] floats that every corruption shares."""

from __future__ import annotations

from typing import Any

import numpy as np

SMALL_IMAGE_SIDE = 64
"""Images whose longer side is at most this use the CIFAR-10-C constants."""

# Per-severity parameters (severity 1..5), copied as numbers from Hendrycks & Dietterich
# 2019, make_cifar_c.py (CIFAR) and make_imagenet_c.py (ImageNet). Lengths are in pixels of
# a 32 px (CIFAR) or 224 px (ImageNet) image; `_length_scale` adapts them to other sizes.
CIFAR_CONSTANTS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # photons at full intensity (Poisson rate)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper values
    # (disk radius, anti-alias sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (Gaussian sigma, max displacement, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # (radius, sigma)
    # zoom factors as np.arange(start, stop, step); float rounding puts `stop` itself in the
    # first two lists (1.06, 1.11) and not in the others, as in the reference.
    "zoom_blur": ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01),
                  (1, 1.26, 0.01)),
    # (flake mean, flake std, flake zoom, flake threshold, streak radius, streak sigma,
    #  image weight in the whitening blend)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # (image, frost)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # (amount, plasma decay)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the mean
    # (alpha, sigma, affine shift): the reference writes them as fractions of IMSIZE = 32
    "elastic_transform": ((32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                          (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                          (32 * 0.1, 32 * 0.03, 32 * 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # resize factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # PIL quality
}
"""CIFAR-10-C's per-severity parameters (Hendrycks & Dietterich 2019, make_cifar_c.py)."""

IMAGENET_CONSTANTS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                  (1, 1.31, 0.03)),
    "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # The reference multiplies by 244 where it meant 224 ("nothing is incorrect"): kept, so
    # a 224 px image gets exactly its values.
    "elastic_transform": ((244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                          (244 * 0.05, 244 * 0.01, 244 * 0.02),
                          (244 * 0.07, 244 * 0.01, 244 * 0.02),
                          (244 * 0.12, 244 * 0.01, 244 * 0.02)),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}
"""ImageNet-C's per-severity parameters (Hendrycks & Dietterich 2019, make_imagenet_c.py)."""

_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # OpenCV's RGB2GRAY, used by the reference


# ---------------------------------------------------------------------------------------
# Sizes, constants, conversions


def _is_small(image: np.ndarray) -> bool:
    return max(image.shape[:2]) <= SMALL_IMAGE_SIDE


def _constant(name: str, image: np.ndarray, severity: int) -> Any:
    table = CIFAR_CONSTANTS if _is_small(image) else IMAGENET_CONSTANTS
    return table[name][severity - 1]


def _length_scale(image: np.ndarray) -> float:
    """Factor from the reference's pixel lengths (32 or 224 px images) to this image's."""
    return min(image.shape[:2]) / (32 if _is_small(image) else 224)


def _to_unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _from_unit(pixels: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
