"""Tests of mixmask.data.corruptions against the published definitions of CIFAR-10-C
(Hendrycks & Dietterich 2019, make_cifar_c.py), computed here independently.

The constants below are typed in from make_cifar_c.py again on purpose: a wrong number in
the module's tables fails these tests instead of agreeing with itself.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from mixmask.data.corruptions import (
    CORRUPTION_GROUPS,
    CORRUPTIONS,
    CorruptionError,
    corrupt,
)
from mixmask.errors import MixmaskError

SHARED_DATA = Path(os.environ.get("MIXMASK_DATA", Path(__file__).parents[2] / "shared" / "data"))
CIFAR10_SUBSET = SHARED_DATA / "cifar10_exact_subset.npz"

# Corruptions that draw random numbers; the others are deterministic functions of the image.
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform")
# Mean absolute change grows with severity at CIFAR scale for all but three (see
# test_glass_blur_two_passes_change_more, test_frost_hides_more_of_the_image,
# test_elastic_local_distortion_grows).
MONOTONE = tuple(name for name in CORRUPTIONS
                 if name not in ("glass_blur", "frost", "elastic_transform"))


def synthetic_image(seed: int, height: int = 32, width: int = 32) -> np.ndarray:
    """A real-looking image: a colour gradient at a random angle, smooth texture, and a
    disc with a sharp edge."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * cols + math.sin(angle) * rows
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-12)
    low, high = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    image = low + (high - low) * ramp[..., None]
    texture = ndimage.gaussian_filter(rng.standard_normal((height, width, 3)), (1.2, 1.2, 0))
    image += 20 * texture / texture.std()
    centre, radius = rng.uniform(0.3, 0.7, 2), rng.uniform(0.15, 0.3)
    disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius ** 2
    image[disc] = 0.4 * image[disc] + 0.6 * rng.uniform(0, 255, 3)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@functools.cache
def image_set(source: str) -> tuple[np.ndarray, ...]:
    """16 images of 32x32: synthetic, or real CIFAR-10 training images when present."""
    if source == "synthetic":
        images = [synthetic_image(seed) for seed in range(16)]
    else:
        if not CIFAR10_SUBSET.is_file():
            pytest.skip(f"real CIFAR-10 subset not found at {CIFAR10_SUBSET}; set MIXMASK_DATA "
                        "to the folder holding cifar10_exact_subset.npz")
        with np.load(CIFAR10_SUBSET) as data:
            images = [data["x_train"][index] for index in range(0, 1600, 100)]
    for image in images:
        image.setflags(write=False)  # shared between tests: copy before editing
    return tuple(images)


@functools.cache
def mean_change(name: str, source: str) -> tuple[float, ...]:
    """Mean absolute difference to the original, in grey levels, at severities 1..5, over
    the 16 images of ``source`` (image i with seed i at every severity)."""
    images = image_set(source)
    return tuple(
        float(np.mean([np.abs(corrupt(image, name, severity, seed).astype(np.float64) - image)
                       .mean() for seed, image in enumerate(images)]))
        for severity in range(1, 6))


def by_severity(values: list[float]) -> list[tuple[int, float]]:
    """[(1, value at severity 1), ..., (5, value at severity 5)] for parametrize."""
    return list(enumerate(values, start=1))


def to_unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def assert_rounds_to(corrupted: np.ndarray, expected: np.ndarray) -> None:
    """``corrupted`` is ``expected`` (float grey levels, clipped to [0, 255]) rounded to the
    nearest level; exact halves (0.1 * 255 = 25.5 makes many) may go either way."""
    assert np.abs(corrupted - np.clip(expected, 0, 255)).max() <= 0.5 + 1e-6


# ---------------------------------------------------------------------------------------
# Names, errors


def test_names_order_and_groups():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression")
    assert tuple(CORRUPTION_GROUPS) == ("noise", "blur", "weather", "digital")
    assert sum(CORRUPTION_GROUPS.values(), ()) == CORRUPTIONS


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(CorruptionError) as caught:
        corrupt(synthetic_image(0), "fogg", 1, 0)
    message = str(caught.value)
    assert "'fogg'" in message and "Did you mean 'fog'?" in message
    assert all(name in message for name in CORRUPTIONS)
    assert isinstance(caught.value, MixmaskError)  # the CLI prints it without a traceback


@pytest.mark.parametrize("severity", [6, -1, 2.0, True, "3"])
def test_severity_outside_0_to_5_is_refused(severity):
    with pytest.raises(CorruptionError, match=r"severity must be an integer from 0 .* to 5"):
        corrupt(synthetic_image(0), "fog", severity, 0)


def test_numpy_integer_severity_is_accepted():
    image = synthetic_image(0)
    assert np.array_equal(corrupt(image, "contrast", np.int64(2), 0),
                          corrupt(image, "contrast", 2, 0))


@pytest.mark.parametrize("bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3)),
                                 np.zeros((32, 32, 4), np.uint8), [[0, 0, 0]]])
def test_image_must_be_uint8_rgb(bad):
    with pytest.raises(ValueError, match=r"uint8 RGB image of shape \[H, W, 3\]"):
        corrupt(bad, "fog", 1, 0)


@pytest.mark.parametrize("seed", [None, -1, 1.5])
def test_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(ValueError, match="non-negative integer seed"):
        corrupt(synthetic_image(0), "fog", 1, seed)


# ---------------------------------------------------------------------------------------
# Invariants of every corruption


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_a_copy_and_others_change_the_image(name):
    for seed, image in enumerate(image_set("synthetic")[:4]):
        original = image.copy()
        clean = corrupt(image, name, 0, seed)
        assert np.array_equal(clean, image) and clean is not image
        for severity in range(1, 6):
            corrupted = corrupt(image, name, severity, seed)
            assert not np.array_equal(corrupted, image), (name, severity, seed)
        assert np.array_equal(image, original)  # the input is never written to


@pytest.mark.parametrize("source", ["synthetic", "cifar"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_higher_severity_changes_more(name, source):
    change = mean_change(name, source)
    if name != "elastic_transform":  # see test_elastic_local_distortion_grows
        assert change[4] > change[0], change
    if name in MONOTONE:
        # 0.05 grey levels of slack: motion blur's severities 3 and 4 differ only in taps
        # whose weight is below 1e-7 (radius 6 vs 8 at sigma 2), so they tie.
        assert np.all(np.diff(change) >= -0.05), change


@pytest.mark.parametrize("source", ["synthetic", "cifar"])
def test_glass_blur_two_passes_change_more(source):
    # Not monotone in make_cifar_c.py's constants: severities 1 and 2 differ only in a blur
    # sigma (0.05 vs 0.25) whose side taps weigh e^-8, and severity 3's stronger blur
    # (0.4) smooths the same single shuffling pass back towards the original. What holds:
    # the two shuffling passes of severities 4 and 5 change the image more than any
    # single pass.
    change = mean_change("glass_blur", source)
    assert min(change[3:]) > max(change[:3]), change
    assert change[1] == pytest.approx(change[0], abs=0.1)


@pytest.mark.parametrize("source", ["synthetic", "cifar"])
def test_frost_hides_more_of_the_image(source):
    # Not monotone in mean change: the result is a * x + b * frost with (a, b) = (1, 0.2),
    # (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45), and where the frost term dominates,
    # |(a - 1) x + b frost| shrinks from severity 3 on. What holds: the image's share a / b
    # falls (5, 3.3, 2.25, 2.1, 1.7), so the correlation with the clean image falls.
    for seed, image in enumerate(image_set(source)[:8]):
        correlations = [np.corrcoef(image.ravel(), corrupt(image, "frost", severity, seed)
                                    .ravel())[0, 1] for severity in range(1, 6)]
        assert np.all(np.diff(correlations) < 0), correlations


def test_elastic_local_distortion_grows():
    # Not monotone in mean change: make_cifar_c.py's affine shift shrinks with severity
    # (0.08, 0.07, 0.06, 0.05, 0.03 of the side) while the elastic field grows (alpha
    # 0, 0.05, 0.08, 0.1, 0.1 of the side at sigma 0.2, 0.06, 0.04, 0.03), so severity 1
    # moves pixels furthest. What grows is the local, non-affine distortion: on a linear ramp
    # an affine warp (bilinear, away from the border) leaves a plane, and the elastic field
    # bends it. Measured as the residual of a least-squares plane over the central 12x12.
    rows, cols = np.mgrid[0:32, 0:32]
    ramp = np.clip(16 + 5 * cols + 2 * rows, 0, 255).astype(np.uint8)
    image = np.repeat(ramp[..., None], 3, axis=2)
    centre = (slice(10, 22), slice(10, 22))
    design = np.stack([rows[centre].ravel(), cols[centre].ravel(),
                       np.ones(144)], axis=1).astype(np.float64)

    def bend(severity: int) -> float:
        residuals = []
        for seed in range(16):
            values = corrupt(image, "elastic_transform", severity, seed)[..., 0][centre]
            values = values.ravel().astype(np.float64)
            fit, *_ = np.linalg.lstsq(design, values, rcond=None)
            residuals.append(np.abs(values - design @ fit).mean())
        return float(np.mean(residuals))

    bends = [bend(severity) for severity in range(1, 6)]
    assert np.all(np.diff(bends) >= 0), bends
    assert bends[4] > 3 * bends[0] and bends[0] < 0.5, bends  # severity 1: rounding only


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_per_seed(name):
    image = image_set("synthetic")[3]
    first = corrupt(image, name, 3, 7)
    assert np.array_equal(first, corrupt(image, name, 3, 7))
    other_seed = corrupt(image, name, 3, 8)
    assert np.array_equal(first, other_seed) == (name not in RANDOM)


def test_global_random_state_is_left_alone():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    for name in CORRUPTIONS:
        corrupt(synthetic_image(1), name, 5, 0)
    assert np.random.random() == expected


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(32, 32), (40, 56), (33, 47)])
def test_dtype_and_shape(name, shape):
    image = synthetic_image(2, *shape)
    for severity in (1, 5):
        corrupted = corrupt(image, name, severity, 0)
        assert corrupted.dtype == np.uint8 and corrupted.shape == image.shape


@pytest.mark.parametrize("name", ["glass_blur", "snow", "fog", "elastic_transform",
                                  "zoom_blur", "frost"])
@pytest.mark.parametrize("side", [96, 224])
def test_imagenet_sizes(name, side):
    image = synthetic_image(3, side, side)
    corrupted = corrupt(image, name, 5, 0)
    assert corrupted.dtype == np.uint8 and corrupted.shape == image.shape
    assert np.abs(corrupted.astype(np.float64) - image).mean() > 2


# ---------------------------------------------------------------------------------------
# Hand-checked values against the published definitions (make_cifar_c.py)


@pytest.mark.parametrize("severity,shift", by_severity([0.05, 0.1, 0.15, 0.2, 0.3]))
def test_brightness_adds_to_hsv_value(severity, shift):
    image = image_set("synthetic")[severity].copy()
    image[0, 0] = 0  # black: its HSV round trip goes through S = 0
    image[0, 1] = 255
    expected = np.empty(image.shape)
    for row, col in np.ndindex(image.shape[:2]):
        hue, saturation, value = colorsys.rgb_to_hsv(*to_unit(image[row, col]))
        expected[row, col] = colorsys.hsv_to_rgb(hue, saturation, min(value + shift, 1.0))
    assert_rounds_to(corrupt(image, "brightness", severity, 0), expected * 255)


def test_larger_images_use_imagenet_constants():
    # make_imagenet_c.py: brightness + 0.5 and contrast 0.05 at severity 5.
    image = synthetic_image(4, 80, 80)
    grey = np.full((80, 80, 3), 100, np.uint8)
    assert_rounds_to(corrupt(grey, "brightness", 5, 0), np.full(grey.shape, 100 + 0.5 * 255))
    means = image.mean(axis=(0, 1))
    assert_rounds_to(corrupt(image, "contrast", 5, 0), (image - means) * 0.05 + means)


@pytest.mark.parametrize("severity,factor", by_severity([0.75, 0.5, 0.4, 0.3, 0.15]))
def test_contrast_scales_deviation_from_channel_mean(severity, factor):
    image = image_set("synthetic")[severity]
    means = image.mean(axis=(0, 1))
    assert_rounds_to(corrupt(image, "contrast", severity, 0), (image - means) * factor + means)


@pytest.mark.parametrize("severity,std", by_severity([0.04, 0.06, 0.08, 0.09, 0.10]))
def test_gaussian_noise_statistics_on_flat_grey(severity, std):
    grey = np.full((64, 64, 3), 128, np.uint8)
    noise = corrupt(grey, "gaussian_noise", severity, severity).astype(np.float64) - 128
    # 12288 values: the sample std is within 2% of sigma with overwhelming probability
    assert noise.std() == pytest.approx(std * 255, rel=0.03)
    assert abs(noise.mean()) < 4 * std * 255 / math.sqrt(noise.size)


@pytest.mark.parametrize("severity,rate", by_severity([500, 250, 100, 75, 50]))
def test_shot_noise_statistics_on_flat_grey(severity, rate):
    grey = np.full((64, 64, 3), 128, np.uint8)
    noisy = to_unit(corrupt(grey, "shot_noise", severity, severity))
    level = 128 / 255
    # Poisson(level * rate) / rate: mean level, variance level / rate
    assert noisy.std() == pytest.approx(math.sqrt(level / rate), rel=0.05)
    assert abs(noisy.mean() - level) < 4 * math.sqrt(level / rate / noisy.size) + 0.5 / 255


@pytest.mark.parametrize("severity,amount", by_severity([0.01, 0.02, 0.03, 0.05, 0.07]))
def test_impulse_noise_fraction(severity, amount):
    grey = np.full((64, 64, 3), 128, np.uint8)
    noisy = corrupt(grey, "impulse_noise", severity, severity)
    salt, pepper = np.mean(noisy == 255), np.mean(noisy == 0)
    tolerance = 4 * math.sqrt(amount * (1 - amount) / noisy.size)
    assert salt + pepper == pytest.approx(amount, abs=tolerance)
    assert salt == pytest.approx(pepper, abs=tolerance)
    assert np.all((noisy == 0) | (noisy == 255) | (noisy == 128))


def box_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL's BOX resampling written out: each output pixel averages the input pixels whose
    centres lie in its box (of width max(scale, 1) input pixels, open on the left), the
    horizontal pass first and rounded (halves up) to uint8, then the vertical one."""

    def weights(size_in: int, size_out: int) -> np.ndarray:
        scale = size_in / size_out
        box = max(scale, 1.0)
        centres = (np.arange(size_out) + 0.5) * scale
        position = (np.arange(size_in)[None, :] + 0.5 - centres[:, None]) / box
        matrix = ((position > -0.5) & (position <= 0.5)).astype(np.float64)
        return matrix / matrix.sum(axis=1, keepdims=True)

    across = np.einsum("ow,hwc->hoc", weights(image.shape[1], width), image.astype(np.float64))
    across = np.clip(np.floor(across + 0.5 + 1e-9), 0, 255)
    down = np.einsum("oh,hwc->owc", weights(image.shape[0], height), across)
    return np.clip(np.floor(down + 0.5 + 1e-9), 0, 255)


@pytest.mark.parametrize("severity,factor", by_severity([0.95, 0.9, 0.85, 0.75, 0.65]))
@pytest.mark.parametrize("shape", [(32, 32), (40, 56)])
def test_pixelate_is_box_down_then_box_up(severity, factor, shape):
    image = synthetic_image(severity, *shape)
    height, width = shape
    small = box_resize(image, int(width * factor), int(height * factor))
    expected = box_resize(small.astype(np.uint8), width, height)
    assert np.array_equal(corrupt(image, "pixelate", severity, 0), expected)


@pytest.mark.parametrize("severity,quality", by_severity([80, 65, 58, 50, 40]))
def test_jpeg_is_a_pil_round_trip_at_quality(severity, quality):
    image = image_set("synthetic")[severity]
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    expected = np.asarray(PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(corrupt(image, "jpeg_compression", severity, 0), expected)


def test_glass_blur_matches_the_reference_loop():
    # make_cifar_c.py, severity 5 = (sigma 0.4, max shift 1, 2 passes): scan rows and
    # columns from 31 down to 2, offsets (dx, dy) from randint(-1, 1), and the "swap"
    # `x[h, w], x[h', w'] = x[h', w'], x[h, w]`, which on numpy views copies the
    # neighbour in and leaves the neighbour as it was. Same draws, written as that loop.
    image = image_set("synthetic")[5]
    rng = np.random.Generator(np.random.PCG64(11))
    pixels = ndimage.gaussian_filter(to_unit(image), (0.4, 0.4, 0), mode="nearest", truncate=4)
    for _ in range(2):
        offsets = rng.integers(-1, 1, size=(30 * 30, 2))
        visit = 0
        for row in range(31, 1, -1):
            for col in range(31, 1, -1):
                dx, dy = offsets[visit]
                visit += 1
                pixels[row, col], pixels[row + dy, col + dx] = (pixels[row + dy, col + dx],
                                                                pixels[row, col])
    pixels = ndimage.gaussian_filter(pixels, (0.4, 0.4, 0), mode="nearest", truncate=4)
    expected = np.rint(np.clip(pixels, 0, 1) * 255)
    assert np.array_equal(corrupt(image, "glass_blur", 5, 11), expected)


def test_motion_blur_trail_is_one_sided():
    # ImageMagick's motion blur (the reference's Wand call) sums taps at +i pixels along
    # the angle, i >= 0, with Gaussian weights: a point becomes a trail on one side only,
    # and angles in [-45, 45) point that trail to the left (-x) of the point.
    for seed in range(8):
        image = np.zeros((32, 32, 3), np.uint8)
        image[16, 16] = 255
        trail = corrupt(image, "motion_blur", 5, seed).astype(np.float64)
        assert trail[:, 17:].max() == 0
        assert trail[16, 16, 0] > 0 and trail[:, :16].max() > 0
        assert trail.sum() / 3 == pytest.approx(255, abs=20)  # weights sum to 1, rounded


def test_zoom_blur_keeps_the_centre_fixed():
    # Every zoom is about the image centre (to within a pixel: the reference's integer crop
    # and scipy's corner-aligned zoom), so a flat image stays flat and a centred disc stays
    # centred but grows.
    grey = np.full((32, 32, 3), 77, np.uint8)
    assert np.array_equal(corrupt(grey, "zoom_blur", 5, 0), grey)
    rows, cols = np.mgrid[0:32, 0:32]
    disc = ((rows - 15.5) ** 2 + (cols - 15.5) ** 2 < 36)[..., None] * np.full(3, 200)
    blurred = corrupt(disc.astype(np.uint8), "zoom_blur", 5, 0)[..., 0].astype(np.float64)
    centroid = np.array([(rows * blurred).sum(), (cols * blurred).sum()]) / blurred.sum()
    assert np.abs(centroid - 15.5).max() < 1
    assert np.count_nonzero(blurred) > np.count_nonzero(disc[..., 0])


def test_fog_keeps_a_black_image_black_and_lifts_dark_pixels():
    # x * max / (max + amount) after adding the cloud: a black image stays black, and a
    # dark region under fog gets brighter.
    black = np.zeros((32, 32, 3), np.uint8)
    assert np.array_equal(corrupt(black, "fog", 5, 0), black)
    image = np.full((32, 32, 3), 230, np.uint8)
    image[:, :16] = 10
    fogged = corrupt(image, "fog", 5, 0).astype(np.float64)
    assert fogged[:, :16].mean() > 40 and fogged[:, 16:].mean() < 230
