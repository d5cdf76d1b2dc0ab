"""The 15 common corruptions of CIFAR-10-C / ImageNet-C, applied on the fly to one image.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019: four groups (noise, blur, weather, digital), each corruption at
five severities. Reference implementation: ``ImageNet-C/create_c/make_cifar_c.py`` and
``make_imagenet_c.py`` in github.com/hendrycks/robustness, rewritten here with numpy,
scipy.ndimage and Pillow (no OpenCV, scikit-image or ImageMagick).

>>> corrupted = corrupt(image, "fog", severity=3, seed=0)  # uint8 [H, W, 3] -> same shape
>>> corrupt(image, "fog", severity=0, seed=0)              # a copy of ``image``

Constants. Images whose longer side is at most 64 px use the CIFAR-10-C constants
(make_cifar_c.py); larger ones use the ImageNet-C constants (make_imagenet_c.py).
Parameters that are lengths in pixels (defocus disk radius and its anti-alias sigma,
glass-blur sigma and displacement, motion-blur and snow-streak radius and sigma, the
snow-flake zoom, elastic-transform alpha, sigma and affine shift) are multiplied by
``min(H, W) / 32`` (CIFAR constants) or ``min(H, W) / 224`` (ImageNet constants), so a
32x32 or 224x224 image gets the reference's values exactly and e.g. a 48 or 96 px image
the same corruption relative to its size. Dimensionless ones (noise levels, zoom-blur
factors, fog, frost weights, brightness, contrast, pixelate factor, JPEG quality) are used
as they are. Both tables, not scaled, are :data:`CIFAR_CONSTANTS` and
:data:`IMAGENET_CONSTANTS`.

Deviations from the reference:

* frost: the reference blends crops of six frost photographs we cannot ship; here a seeded
  procedural ice texture (haze, ridged-noise veins and needles along three directions 60
  degrees apart, bluish white; mean about 90/255), blended with the reference's
  per-severity weights.
* snow and motion_blur: ImageMagick's MotionBlurImage (via Wand) becomes the same
  one-sided Gaussian line kernel (2 * ceil(radius) + 1 taps, rounded along the angle,
  edge pixels repeated) as a sum of shifted copies.
* glass_blur: the reference's per-pixel loop runs on an index list with all offsets drawn
  up front (same visiting order, same offset distribution). Its tuple "swap" on numpy
  views copies the neighbour into the pixel and leaves the neighbour as it is; that copy
  produced the published data, so it is kept. Still a Python loop, one list assignment per
  visited pixel and pass: about 0.4 ms at 32 px, 15-35 ms at 224 px.
* randomness: one ``numpy.random.Generator(PCG64(seed))`` per call instead of numpy's
  global state, so outputs match the reference in distribution, not pixel for pixel.
* rounding: results are rounded to the nearest grey level (the reference truncates with
  ``np.uint8``, half a level darker on average), and the reference's intermediate 8-bit
  steps (glass blur between its two blurs, the snow layer's PNG round trip) stay float.
* OpenCV / scikit-image pieces are scipy.ndimage equivalents: skimage's Gaussian filter
  (truncate 4, nearest border), ``cv2.filter2D`` and ``cv2.warpAffine`` (bilinear,
  reflect-101 border = scipy's "mirror"), OpenCV's grey weights (0.299, 0.587, 0.114);
  brightness uses the closed form of the HSV round trip (RGB scaled by V' / V).
* non-square images: the reference assumes squares; crops, zooms, the glass-blur scan,
  the elastic affine's centre and the fog's plasma map (next power of two at or above
  the longer side, then cropped; 32 -> 32 and 224 -> 256 as in the reference) work per
  axis.
* snow's flake zoom is kept at least 1 after scaling (the reference's zoom-and-crop
  cannot zoom out), which matters only for images of 65 to 111 px (ImageNet constants).

Checked once against the reference's OpenCV / scikit-image code (not a dependency) on the
same random draws: defocus, zoom, elastic, fog, brightness and glass blur agree within one
grey level (glass blur: the reference's intermediate truncation).

Cost on one core of a shared 2-core Xeon, at 32x32: 0.05-1.3 ms per call, except zoom_blur
(up to 26 bilinear zooms: 3 ms on average, 5.5 ms at severity 5); at 224x224: 1-35 ms,
zoom_blur about 0.1 s.

The package: :mod:`.constants` (the two tables, size rules, conversions),
:mod:`.noise_blur` (the noise and blur corruptions and the zoom and motion-blur pieces
snow shares), :mod:`.weather_digital` (weather, with the fog and frost textures, and
digital); here the names, the error, :func:`corrupt` and its dispatch table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mixmask.data.corruptions.constants import CIFAR_CONSTANTS, IMAGENET_CONSTANTS, _constant
from mixmask.data.corruptions.noise_blur import (
    _defocus_blur,
    _gaussian_noise,
    _glass_blur,
    _impulse_noise,
    _motion_blur_corruption,
    _shot_noise,
    _zoom_blur,
)
from mixmask.data.corruptions.weather_digital import (
    _brightness,
    _contrast,
    _elastic_transform,
    _fog,
    _frost,
    _jpeg_compression,
    _pixelate,
    _snow,
)
from mixmask.errors import MixmaskError, did_you_mean

__all__ = [
    "CIFAR_CONSTANTS",
    "CORRUPTIONS",
    "CORRUPTION_GROUPS",
    "IMAGENET_CONSTANTS",
    "MAX_SEVERITY",
    "CorruptionError",
    "corrupt",
]

CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
"""The benchmark's four groups (Hendrycks & Dietterich 2019, Figure 1)."""

CORRUPTIONS: tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values()
                                     for name in group)
"""The 15 corruptions in the benchmark's order: noise, blur, weather, digital."""

MAX_SEVERITY = 5
"""Severities run 1..5; 0 means no corruption."""


class CorruptionError(MixmaskError):
    """An unknown corruption name or a severity outside 0..5."""


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 [H, W, 3], RGB) with corruption ``name`` at ``severity`` (0..5).

    Severity 0 returns a copy of ``image``. The result is a new uint8 array of the same
    shape, a pure function of (image, name, severity, seed): every random draw comes from
    ``numpy.random.Generator(PCG64(seed))``, so the same arguments give the same pixels.

    Raises :class:`CorruptionError` for an unknown ``name`` or a severity outside 0..5, and
    ``ValueError`` for an image that is not uint8 [H, W, 3] or a seed that is not a
    non-negative integer.
    """
    function = _CORRUPTION_FUNCTIONS.get(name) if isinstance(name, str) else None
    if function is None:
        raise CorruptionError(f"unknown corruption {name!r}: choose one of "
                              f"{', '.join(CORRUPTIONS)}.{did_you_mean(name, CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) \
            or not 0 <= severity <= MAX_SEVERITY:
        raise CorruptionError(f"severity must be an integer from 0 (clean) to {MAX_SEVERITY}, "
                              f"got {severity!r} for corruption {name!r}.")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and min(image.shape[:2]) > 0):
        described = (f"{image.dtype} array of shape {image.shape}"
                     if isinstance(image, np.ndarray) else type(image).__name__)
        raise ValueError(f"corrupt() takes a uint8 RGB image of shape [H, W, 3], got a "
                         f"{described}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        # PCG64(None) would draw fresh entropy: a silent loss of reproducibility.
        raise ValueError(f"corrupt() takes a non-negative integer seed, got {seed!r}.")
    if severity == 0:
        return image.copy()
    rng = np.random.Generator(np.random.PCG64(seed))
    corrupted = function(image, _constant(name, image, int(severity)), rng)
    assert corrupted.shape == image.shape and corrupted.dtype == np.uint8
    return corrupted


# ---------------------------------------------------------------------------------------
# The corruptions (in .noise_blur and .weather_digital): each takes the uint8 image, its
# severity's constant from the tables of .constants and the generator, and returns uint8.

Corruption = Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]

_CORRUPTION_FUNCTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_CORRUPTION_FUNCTIONS) == CORRUPTIONS
