"""The noise corruptions (gaussian, shot, impulse) and the blur corruptions (defocus,
glass, motion, zoom), with the Gaussian blur, centred zoom and ImageMagick-style motion blur
they use (snow, in :mod:`.weather_digital`, uses the last two)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, signal

from mixmask.data.corruptions.constants import _from_unit, _length_scale, _to_unit

# ---------------------------------------------------------------------------------------
# Shared pieces


def _gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian as the reference calls it: each channel on its own,
    truncated at 4 sigma, border pixels repeated."""
    return ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0), mode="nearest",
                                   truncate=4.0)


def _clipped_zoom(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Zoom in by ``factor`` >= 1 about the centre, keeping the size: crop the central
    1/factor of each side, zoom it bilinearly, trim the excess (the reference's
    ``clipped_zoom``, per axis so non-square images work)."""
    height, width = pixels.shape[:2]
    crop_height, crop_width = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    crop = pixels[top:top + crop_height, left:left + crop_width]
    zoomed = ndimage.zoom(crop, (factor, factor) + (1,) * (pixels.ndim - 2), order=1)
    trim_top = (zoomed.shape[0] - height) // 2
    trim_left = (zoomed.shape[1] - width) // 2
    return zoomed[trim_top:trim_top + height, trim_left:trim_left + width]


def _motion_blur(pixels: np.ndarray, radius: float, sigma: float,
                 angle_degrees: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage, which the reference calls through Wand: a one-sided
    trail of ``2 * ceil(radius) + 1`` taps weighted exp(-i^2 / 2 sigma^2) (normalised),
    tap i at ``i * (cos, sin)(angle)`` rounded to whole pixels, border pixels repeated."""
    height, width = pixels.shape[:2]
    taps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    angle = math.radians(angle_degrees)
    # ImageMagick rounds with ceil(v - 0.5) (halves go down); y grows downwards.
    shift_x = np.ceil(taps * math.cos(angle) - 0.5).astype(int)
    shift_y = np.ceil(taps * math.sin(angle) - 0.5).astype(int)
    pad = int(taps[-1])
    padded = np.pad(pixels, ((pad, pad), (pad, pad)) + ((0, 0),) * (pixels.ndim - 2),
                    mode="edge")
    blurred = np.zeros_like(pixels, dtype=np.float64)
    for weight, dx, dy in zip(weights, shift_x, shift_y, strict=True):
        blurred += weight * padded[pad + dy:pad + dy + height, pad + dx:pad + dx + width]
    return blurred


# ---------------------------------------------------------------------------------------
# The noise and blur corruptions: each takes the uint8 image, its severity's constant from
# the tables of .constants and the generator, and returns uint8. Hendrycks & Dietterich
# 2019 describe each in words (Figure 1 shows them); the formulas are make_cifar_c.py's.


def _gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise in low light: x + N(0, std^2) per value, on [0, 1]."""
    pixels = _to_unit(image)
    return _from_unit(pixels + rng.normal(0.0, std, pixels.shape))


def _shot_noise(image: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Photon (Poisson) noise: Poisson(x * rate) / rate, on [0, 1]."""
    return _from_unit(rng.poisson(_to_unit(image) * rate) / rate)


def _impulse_noise(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: each value (channels apart, as skimage's ``random_noise(mode='s&p')``
    does) becomes 0 or 255 with probability ``amount``, half of them each."""
    noisy = image.copy()
    hit = rng.random(image.shape) < amount
    salt = rng.random(image.shape) < 0.5
    noisy[hit & salt] = 255
    noisy[hit & ~salt] = 0
    return noisy


def _defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The reference's ``disk``: a normalised disk of ``radius`` on a grid of +-8 px (+-radius
    beyond 8), blurred by a 3-tap (5-tap beyond radius 8) Gaussian of ``alias_sigma`` to
    anti-alias it, trimmed to its support.

    The blur reflects at the grid's edge (OpenCV's default reflect-101), which adds a little
    weight where the disk touches the edge (radius 8 and beyond: the ImageNet severities 4
    and 5 get about 1% brighter); kept, so 224 px images match the reference.
    """
    half = max(8, math.ceil(radius))
    coords = np.arange(-half, half + 1)
    disk = (coords[:, None] ** 2 + coords[None, :] ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(5 if radius > 8 else 3) - (2 if radius > 8 else 1)
    smooth = np.exp(-(taps ** 2) / (2.0 * alias_sigma ** 2))
    smooth /= smooth.sum()
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk, smooth, axis=0, mode="mirror"),
                                 smooth, axis=1, mode="mirror")
    rows, cols = np.nonzero(kernel.any(axis=1))[0], np.nonzero(kernel.any(axis=0))[0]
    return kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _defocus_blur(image: np.ndarray, constant: tuple[float, float],
                  rng: np.random.Generator) -> np.ndarray:
    """Out of focus: convolve with an anti-aliased disk (cv2.filter2D, reflect-101 border)."""
    scale = _length_scale(image)
    kernel = _defocus_kernel(constant[0] * scale, constant[1] * scale)
    pad_y, pad_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    # numpy's "reflect" is OpenCV's BORDER_REFLECT_101; the kernel is symmetric, so
    # convolution equals filter2D's correlation. FFT keeps ImageNet's 25 px disks cheap.
    padded = np.pad(_to_unit(image), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    return _from_unit(signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1)))


def _glass_blur(image: np.ndarray, constant: tuple[float, int, int],
                rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: blur, then move each pixel's content from a random neighbour at most
    ``max_shift`` away (scanning from the bottom-right corner), then blur again."""
    scale = _length_scale(image)
    sigma = constant[0] * scale
    max_shift = max(1, round(constant[1] * scale))
    iterations = constant[2]
    height, width = image.shape[:2]
    pixels = _gaussian_blur(_to_unit(image), sigma)
    # The reference's scan: rows, then columns, from (size - max_shift) down to
    # max_shift + 1; offsets from np.random.randint(-max_shift, max_shift), whose upper end
    # is exclusive, so they lean up and left by half a pixel.
    rows = np.arange(height - max_shift, max_shift, -1)
    cols = np.arange(width - max_shift, max_shift, -1)
    here = (rows[:, None] * width + cols[None, :]).ravel()
    source = list(range(height * width))  # which original pixel each position now holds
    for _ in range(iterations):
        offsets = rng.integers(-max_shift, max_shift, size=(here.size, 2))  # (dx, dy)
        there = here + offsets[:, 1] * width + offsets[:, 0]
        # `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views copies x[h', w'] into
        # x[h, w] and leaves x[h', w'] unchanged: a copy, not a swap. That produced
        # CIFAR-10-C and ImageNet-C, so the copy is what we reproduce, in order.
        for position, neighbour in zip(here.tolist(), there.tolist(), strict=True):
            source[position] = source[neighbour]
    shuffled = pixels.reshape(height * width, 3)[source].reshape(pixels.shape)
    return _from_unit(_gaussian_blur(shuffled, sigma))


def _motion_blur_corruption(image: np.ndarray, constant: tuple[float, float],
                            rng: np.random.Generator) -> np.ndarray:
    """Camera shake: a one-sided Gaussian trail at a random angle in [-45, 45) degrees."""
    scale = _length_scale(image)
    angle = rng.uniform(-45.0, 45.0)
    return _from_unit(_motion_blur(_to_unit(image), constant[0] * scale, constant[1] * scale,
                                   angle))


def _zoom_blur(image: np.ndarray, constant: tuple[float, float, float],
               rng: np.random.Generator) -> np.ndarray:
    """Moving towards the camera: the mean of the image and its central zooms by each factor
    (the factors include 1, as in the reference, so the original counts twice)."""
    pixels = _to_unit(image)
    factors = np.arange(*constant)
    total = pixels.copy()
    for factor in factors:
        total += _clipped_zoom(pixels, float(factor))
    return _from_unit(total / (len(factors) + 1))
