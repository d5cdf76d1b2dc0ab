"""The weather corruptions (snow, frost, fog) with the plasma fractal behind the fog and
the procedural ice texture standing in for the reference's frost photographs, and the
digital corruptions (brightness, contrast, elastic transform, pixelate, JPEG)."""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image
from scipy import ndimage

from mixmask.data.corruptions.constants import (
    _GREY_WEIGHTS,
    _from_unit,
    _length_scale,
    _to_unit,
)
from mixmask.data.corruptions.noise_blur import _clipped_zoom, _motion_blur

# ---------------------------------------------------------------------------------------
# Textures: the fog's cloud and the frost's ice


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map on a torus of side ``size`` (a power of two), scaled to
    [0, 1]: the cloud layer of the reference's fog (``plasma_fractal``).

    Each halving of the grid sets the new points to the mean of their four neighbours plus
    uniform noise. The reference draws uniform(-w, w) and multiplies it by w again, so the
    noise spans w^2 and shrinks by decay^2 per level (w starts at 100, w /= decay); kept,
    since the fog constants were tuned with it.
    """
    height_map = np.zeros((size, size))
    step, spread = size, 100.0
    while step >= 2:
        half = step // 2
        amplitude = spread * spread
        corners = height_map[::step, ::step]
        # square step: the centre of each cell from its four corners
        corner_sum = corners + np.roll(corners, -1, axis=0)
        corner_sum = corner_sum + np.roll(corner_sum, -1, axis=1)
        height_map[half::step, half::step] = corner_sum / 4 + rng.uniform(
            -amplitude, amplitude, corner_sum.shape)
        centres = height_map[half::step, half::step]
        # diamond step: edge midpoints from the two corners and two centres around them
        # (rows of corners first, then columns, as the reference draws them)
        across = (corners + np.roll(corners, -1, axis=1) + centres
                  + np.roll(centres, 1, axis=0))
        height_map[::step, half::step] = across / 4 + rng.uniform(-amplitude, amplitude,
                                                                 across.shape)
        down = (corners + np.roll(corners, -1, axis=0) + centres
                + np.roll(centres, 1, axis=1))
        height_map[half::step, ::step] = down / 4 + rng.uniform(-amplitude, amplitude,
                                                               down.shape)
        step = half
        spread /= decay
    height_map -= height_map.min()
    return height_map / height_map.max()


def _line_sum(layer: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Sum of ``layer`` shifted to every whole-pixel point of a centred segment of
    ``length`` pixels at ``angle`` (radians), wrapping around: each bright point becomes a
    straight needle."""
    total = np.zeros_like(layer)
    for step in range(-(length // 2), length - length // 2):
        total += np.roll(layer, (round(step * math.sin(angle)), round(step * math.cos(angle))),
                         axis=(0, 1))
    return total


def _ice_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded frost texture in [0, 255], float [H, W, 3], standing in for the reference's
    frost photographs.

    Feature sizes follow the image side (the reference crops its photos so that a crop
    spans a similar share of a photo at 32 and at 224 px). Three parts: a cloudy haze
    (smooth noise), a vein network (ridged multi-octave noise: bright where smooth noise
    crosses zero, as frost fronts meet) and short needles grown from seeds on the veins
    along three directions 60 degrees apart (ice's hexagonal habit). Bluish white, like
    frost on a window at night.
    """
    side = min(height, width)
    veins = np.zeros((height, width))
    octave_weights = 0.6 ** np.arange(4)
    for octave, weight in enumerate(octave_weights):
        noise = ndimage.gaussian_filter(rng.standard_normal((height, width)),
                                        sigma=max(side / 8 / 2 ** octave, 0.5), mode="wrap")
        noise /= noise.std() + 1e-12
        veins += weight * np.clip(1.0 - np.abs(noise) / 0.5, 0.0, 1.0) ** 2
    veins /= octave_weights.sum()
    haze = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=side / 6,
                                   mode="wrap")
    haze = np.clip(0.5 + 0.5 * haze / (haze.std() + 1e-12), 0.0, 1.0)
    needles = np.zeros((height, width))
    needle_length = max(3, round(side / 10))
    base_angle = rng.uniform(0.0, math.pi / 3)
    for direction in range(3):
        seeds = (rng.random((height, width)) < 0.25 * veins ** 2) * rng.uniform(
            0.2, 1.0, (height, width))
        needles += _line_sum(seeds, needle_length, base_angle + direction * math.pi / 3)
    needles = ndimage.gaussian_filter(needles, sigma=max(side / 200, 0.3), mode="wrap")
    needles = np.clip(needles / (np.quantile(needles, 0.995) + 1e-12), 0.0, 1.0)
    intensity = np.clip(0.1 + 0.35 * haze + 0.5 * veins + 0.5 * needles, 0.0, 1.0)
    return intensity[..., None] * np.array([0.82, 0.90, 1.00]) * 255.0


# ---------------------------------------------------------------------------------------
# The weather and digital corruptions: each takes the uint8 image, its severity's constant
# from the tables of .constants and the generator, and returns uint8. Hendrycks &
# Dietterich 2019 describe each in words (Figure 1 shows them); the formulas are
# make_cifar_c.py's.


def _snow(image: np.ndarray, constant: tuple[float, ...],
          rng: np.random.Generator) -> np.ndarray:
    """Snow: thresholded, zoomed Gaussian flakes streaked by a motion blur falling at a
    random angle in [-135, -45) degrees, added twice (the second copy rotated by 180 degrees)
    over a whitened image."""
    mean, std, zoom, threshold, radius, sigma, image_weight = constant
    scale = _length_scale(image)
    pixels = _to_unit(image)
    flakes = rng.normal(mean, std, image.shape[:2])
    flakes = _clipped_zoom(flakes[..., None], max(1.0, zoom * scale))
    flakes[flakes < threshold] = 0.0
    streaks = _motion_blur(np.clip(flakes, 0.0, 1.0), radius * scale, sigma * scale,
                           rng.uniform(-135.0, -45.0))
    grey = pixels @ _GREY_WEIGHTS
    whitened = image_weight * pixels + (1.0 - image_weight) * np.maximum(
        pixels, grey[..., None] * 1.5 + 0.5)
    return _from_unit(whitened + streaks + np.rot90(streaks, k=2))


def _frost(image: np.ndarray, constant: tuple[float, float],
           rng: np.random.Generator) -> np.ndarray:
    """Frost on a window: image_weight * x + frost_weight * ice texture, on [0, 255]."""
    image_weight, frost_weight = constant
    texture = _ice_texture(image.shape[0], image.shape[1], rng)
    return _from_unit((image_weight * image + frost_weight * texture) / 255.0)


def _fog(image: np.ndarray, constant: tuple[float, float],
         rng: np.random.Generator) -> np.ndarray:
    """Fog: add ``amount`` times a plasma fractal, then rescale so the brightest value of the
    image stays where it was relative to the fog (x * max / (max + amount))."""
    amount, decay = constant
    height, width = image.shape[:2]
    pixels = _to_unit(image)
    peak = pixels.max()
    size = 1 << (max(height, width) - 1).bit_length()
    cloud = _plasma_fractal(size, decay, rng)[:height, :width]
    return _from_unit((pixels + amount * cloud[..., None]) * peak / (peak + amount))


def _brightness(image: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Sunlight: V + shift in HSV (clipped to 1). Hue and saturation fixed make every channel
    proportional to V, so RGB is scaled by V' / V; black (S = 0) becomes grey V'."""
    pixels = _to_unit(image)
    value = pixels.max(axis=2, keepdims=True)
    new_value = np.minimum(value + shift, 1.0)
    ratio = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return _from_unit(np.where(value > 0, pixels * ratio, new_value))


def _contrast(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Low contrast: (x - mean) * factor + mean, with each channel's mean over the image."""
    pixels = _to_unit(image)
    means = pixels.mean(axis=(0, 1), keepdims=True)
    return _from_unit((pixels - means) * factor + means)


def _elastic_transform(image: np.ndarray, constant: tuple[float, float, float],
                       rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation: a random affine warp (three points near the centre moved by up
    to ``shift`` px), then a smooth random displacement field (uniform noise, Gaussian
    ``sigma``, times ``alpha``), each resampled bilinearly."""
    scale = _length_scale(image)
    alpha, sigma, shift = (value * scale for value in constant)
    height, width = image.shape[:2]
    pixels = _to_unit(image)
    centre = np.array([width // 2, height // 2], dtype=np.float64)  # (x, y)
    arm = min(height, width) // 3
    source_points = np.array([centre + arm, [centre[0] + arm, centre[1] - arm], centre - arm])
    target_points = source_points + rng.uniform(-shift, shift, source_points.shape)
    # cv2.getAffineTransform: the map taking source to target points; warpAffine samples
    # each output pixel at the inverse map, bilinear, reflect-101 border.
    ones = np.ones((3, 1))
    forward = np.linalg.solve(np.hstack([source_points, ones]),
                              np.hstack([target_points, ones])).T  # 3x3 on (x, y, 1)
    inverse = np.linalg.inv(forward)
    # to (row, col, channel) coordinates for scipy
    matrix = np.array([[inverse[1, 1], inverse[1, 0], 0.0],
                       [inverse[0, 1], inverse[0, 0], 0.0],
                       [0.0, 0.0, 1.0]])
    offset = np.array([inverse[1, 2], inverse[0, 2], 0.0])
    warped = ndimage.affine_transform(pixels, matrix, offset, order=1, mode="mirror")
    shift_x = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (height, width)), sigma,
                                      mode="reflect", truncate=3.0) * alpha
    shift_y = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, (height, width)), sigma,
                                      mode="reflect", truncate=3.0) * alpha
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([rows + shift_y, cols + shift_x])
    channels = [ndimage.map_coordinates(warped[..., channel], coords, order=1, mode="reflect")
                for channel in range(3)]
    return _from_unit(np.stack(channels, axis=-1))


def _pixelate(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Pixelation: shrink by ``factor`` with PIL's box filter, then back up with it."""
    height, width = image.shape[:2]
    small = PIL.Image.fromarray(image).resize(
        (max(1, int(width * factor)), max(1, int(height * factor))), PIL.Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), PIL.Image.Resampling.BOX)).copy()


def _jpeg_compression(image: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG artefacts: a round trip through PIL's encoder at ``quality``."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()
