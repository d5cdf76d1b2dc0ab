"""Tests for mixmask.data.gpu_augment: every op against torchvision's functional ops with
the same fixed parameters (per sample), every sampler against torchvision's own sampler's
distribution, and the N-view call for host syncs, determinism, draw order and output
format."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from helpers import seeded
from host_sync import HostSyncRecorder
from torchvision import transforms as T

from mixmask.data.gpu_augment import (
    BatchedViewAugment,
    ViewParams,
    apply_view,
    sample_apply,
    sample_color_jitter,
    sample_crop_boxes,
    sample_view_params,
)
from mixmask.data.gpu_ops import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    gaussian_blur,
    grayscale,
    horizontal_flip,
    normalize,
    resized_crop,
    solarize,
)
from mixmask.data.multi_size_augment import MultiSizeViewAugment
from mixmask.data.transforms import view_transform
from mixmask.data.views import ViewConfig, preset_views

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Float rounding only: our ops reorder a few float32 operations relative to torchvision's
# (fused blends, separable blur, matmul crop, closed-form hue), nothing else.
ATOL = 2e-6



def random_images(batch: int = 8, height: int = 20, width: int = 24, seed: int = 0):
    """Float images in [0, 1] with the hard cases of colour ops: grey pixels, ties between
    channels, pure black and white, values on hue-sector boundaries."""
    images = torch.rand(batch, 3, height, width, generator=seeded(seed))
    images[:, :, :3] = (images[:, :, :3] * 4).round() / 4
    images[:, :, 3:5] = images[:, :1, 3:5]
    return images


def per_sample(reference_op, images, *parameters):
    return torch.stack(
        [reference_op(image, *[p[index] for p in parameters]) for index, image in enumerate(images)]
    )


def ks_statistic(first: torch.Tensor, second: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical
    CDFs, evaluated at every observed value (exact for discrete data too)."""
    first, second = first.double().sort().values, second.double().sort().values
    points = torch.cat([first, second])
    cdf_first = torch.searchsorted(first, points, right=True) / first.numel()
    cdf_second = torch.searchsorted(second, points, right=True) / second.numel()
    return float((cdf_first - cdf_second).abs().max())


def ks_bound(n: int, m: int) -> float:
    # Critical value at alpha = 1e-3: c(alpha) sqrt((n + m) / (n m)), c = sqrt(-ln(a/2)/2).
    return math.sqrt(-math.log(1e-3 / 2) / 2) * math.sqrt((n + m) / (n * m))


# -- fixed parameters vs torchvision ------------------------------------------------------


@pytest.mark.parametrize(
    "ours, reference",
    [
        (adjust_brightness, F2.adjust_brightness),
        (adjust_contrast, F2.adjust_contrast),
        (adjust_saturation, F2.adjust_saturation),
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_match_torchvision_with_a_factor_per_sample(ours, reference):
    images = random_images()
    factors = torch.tensor([0.0, 0.6, 0.9, 1.0, 1.2, 1.4, 2.0, 0.75])
    expected = per_sample(lambda image, f: reference(image, float(f)), images, factors)
    torch.testing.assert_close(ours(images, factors), expected, atol=ATOL, rtol=0)


def test_brightness_is_torchvisions_to_the_bit():
    images = random_images()
    factors = torch.linspace(0.6, 1.4, 8)
    expected = per_sample(lambda image, f: F2.adjust_brightness(image, float(f)), images, factors)
    assert torch.equal(adjust_brightness(images, factors), expected)


@pytest.mark.parametrize("reference", [F2.adjust_hue, TF.adjust_hue])
def test_hue_matches_torchvision_with_a_factor_per_sample(reference):
    images = random_images(batch=16)
    factors = torch.linspace(-0.5, 0.5, 16)
    expected = per_sample(lambda image, f: reference(image, float(f)), images, factors)
    torch.testing.assert_close(adjust_hue(images, factors), expected, atol=ATOL, rtol=0)


def test_hue_keeps_grey_pixels_and_each_pixels_max_and_min():
    images = random_images()
    shifted = adjust_hue(images, torch.full((8,), 0.3))
    torch.testing.assert_close(shifted.amax(1), images.amax(1), atol=ATOL, rtol=0)
    torch.testing.assert_close(shifted.amin(1), images.amin(1), atol=ATOL, rtol=0)
    grey = images[:, :, 3:5]
    assert torch.equal(shifted[:, :, 3:5], grey)


def reference_jitter(image, factors, order, apply):
    """torchvision ColorJitter.forward with fixed parameters."""
    if not apply:
        return image
    ops = {
        BRIGHTNESS: F2.adjust_brightness,
        CONTRAST: F2.adjust_contrast,
        SATURATION: F2.adjust_saturation,
        HUE: F2.adjust_hue,
    }
    for op in order.tolist():
        image = ops[op](image, float(factors[op]))
    return image


def test_color_jitter_applies_the_four_ops_in_each_samples_own_order():
    # One sample per permutation of the four ops, each with its own factors.
    orders = torch.tensor(list(itertools.permutations(range(4))))
    images = random_images(batch=len(orders), height=12, width=10, seed=1)
    factors, _ = sample_color_jitter(len(orders), generator=seeded(2))
    factors[:, HUE] *= 4  # hue in [-0.4, 0.4]: every sector boundary gets crossed
    apply = torch.ones(len(orders), dtype=torch.bool)
    ours = color_jitter(images, factors, orders, apply)
    expected = per_sample(reference_jitter, images, factors, orders, apply)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_color_jitter_leaves_unapplied_samples_unchanged_to_the_bit():
    images = random_images(seed=3)
    factors, order = sample_color_jitter(8, generator=seeded(4))
    apply = torch.tensor([True, False] * 4)
    ours = color_jitter(images, factors, order, apply)
    assert torch.equal(ours[~apply], images[~apply])
    expected = per_sample(reference_jitter, images, factors, order, apply)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_color_jitter_without_hue_skips_it_but_keeps_the_other_ops_order():
    orders = torch.tensor(list(itertools.permutations(range(4))))
    images = random_images(batch=len(orders), height=6, width=6, seed=5)
    factors, _ = sample_color_jitter(len(orders), 0.4, 0.4, 0.4, 0.0, generator=seeded(6))
    ours = color_jitter(images, factors, orders, torch.ones(24, dtype=torch.bool), hue=False)
    no_hue = [order[order != HUE] for order in orders]
    expected = per_sample(
        lambda image, f, o: reference_jitter(image, f, o, True), images, factors, no_hue
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_grayscale_matches_torchvision_on_the_chosen_samples():
    images = random_images()
    apply = torch.tensor([True, False, True, True, False, False, True, False])
    expected = torch.stack(
        [
            F2.rgb_to_grayscale(image, num_output_channels=3) if chosen else image
            for image, chosen in zip(images, apply, strict=True)
        ]
    )
    assert torch.equal(grayscale(images, apply), expected)


@pytest.mark.parametrize("kernel_size", [3, 5, 23])
def test_gaussian_blur_matches_torchvision_with_a_sigma_per_sample(kernel_size):
    images = random_images(height=26, width=30)
    sigma = torch.linspace(0.1, 2.0, 8)
    apply = torch.tensor([True] * 6 + [False] * 2)
    ours = gaussian_blur(images, sigma, kernel_size, apply)
    for reference in (TF.gaussian_blur, F2.gaussian_blur):
        expected = torch.stack(
            [
                reference(image, [kernel_size] * 2, [float(s)] * 2) if chosen else image
                for image, s, chosen in zip(images, sigma, apply, strict=True)
            ]
        )
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert torch.equal(ours[~apply], images[~apply])


def test_solarize_matches_torchvision_to_the_bit():
    images = random_images()
    images[0, 0, 0, :3] = torch.tensor([0.5, 0.5 - 1e-7, 1.0])  # at and around the threshold
    apply = torch.tensor([True, True, False, True, False, True, True, False])
    expected = per_sample(lambda image, a: F2.solarize(image, 0.5) if a else image, images, apply)
    assert torch.equal(solarize(images, apply, threshold=0.5), expected)


def test_horizontal_flip_and_normalize_match_torchvision():
    images = random_images()
    apply = torch.tensor([True, False] * 4)
    expected = per_sample(lambda image, a: F2.horizontal_flip(image) if a else image, images, apply)
    assert torch.equal(horizontal_flip(images, apply), expected)
    torch.testing.assert_close(
        normalize(images, MEAN, STD), F2.normalize(images, MEAN, STD), atol=1e-6, rtol=0
    )


# Boxes (top, left, height, width) in a 20 x 24 image: whole image, small and large,
# tall and wide, touching every border.
BOXES = torch.tensor(
    [[0, 0, 20, 24], [3, 4, 10, 12], [2, 1, 17, 5], [0, 5, 20, 19],
     [7, 7, 9, 9], [1, 2, 3, 4], [12, 0, 8, 24], [0, 20, 1, 4]]
)  # fmt: skip


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", [4, 9, 16, 40])
def test_resized_crop_matches_torchvision_resized_crop(antialias, size):
    # Sizes 4 and 9 downscale most boxes (where antialias matters), 40 upscales all.
    images = random_images()
    ours = resized_crop(images, BOXES, size, antialias=antialias)
    expected = per_sample(
        lambda image, box: F2.resized_crop(image, *box.tolist(), [size, size], antialias=antialias),
        images,
        BOXES,
    )
    assert ours.shape == (8, 3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    if size == 40:  # every box upscaled: antialias changes nothing
        other = resized_crop(images, BOXES, size, antialias=not antialias)
        torch.testing.assert_close(ours, other, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [4, 9, 16, 40])
def test_bicubic_resized_crop_matches_torchvision_antialiased_bicubic(size):
    images = random_images()
    ours = resized_crop(images, BOXES, size, antialias=True, interpolation="bicubic")
    expected = per_sample(
        lambda image, box: F2.resized_crop(image, *box.tolist(), [size, size],
                                           interpolation=T.InterpolationMode.BICUBIC,
                                           antialias=True),
        images, BOXES)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # From uint8 the cubic's overshoot is clipped, as PIL clips its uint8 output.
    images_uint8 = torch.randint(0, 256, (8, 3, 20, 24), dtype=torch.uint8, generator=seeded())
    clipped = resized_crop(images_uint8, BOXES, size, antialias=True, interpolation="bicubic")
    unclipped = resized_crop(images_uint8 / 255.0, BOXES, size, antialias=True,
                             interpolation="bicubic")
    assert clipped.min() >= 0 and clipped.max() <= 1
    torch.testing.assert_close(clipped, unclipped.clamp(0, 1), atol=ATOL, rtol=0)


def test_keys_cubic_kernel_at_hand_computed_distances():
    # a = -0.5: d = 0 -> 1; d = 0.5 -> 1.5 * 0.125 - 2.5 * 0.25 + 1 = 0.5625;
    # d = 1 -> 0; d = 1.5 -> -0.5 * (3.375 - 11.25 + 12 - 4) = -0.0625; d >= 2 -> 0.
    from mixmask.data.gpu_ops import _keys_cubic

    distance = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    torch.testing.assert_close(_keys_cubic(distance),
                               torch.tensor([1.0, 0.5625, 0.0, -0.0625, 0.0, 0.0]))


def test_bicubic_without_antialias_is_refused():
    with pytest.raises(ValueError, match="needs antialias=True"):
        resized_crop(random_images(), BOXES, 16, antialias=False, interpolation="bicubic")


def test_resized_crop_of_uint8_flipped_and_several_views_agree_with_the_plain_call():
    images_uint8 = torch.randint(0, 256, (8, 3, 20, 24), dtype=torch.uint8, generator=seeded())
    images = images_uint8 / 255.0
    plain = resized_crop(images, BOXES, 16, antialias=True)
    from_uint8 = resized_crop(images_uint8, BOXES, 16, antialias=True)
    torch.testing.assert_close(from_uint8, plain, atol=ATOL, rtol=0)

    flip = torch.tensor([True, False, False, True, True, False, True, True])
    flipped = resized_crop(images, BOXES, 16, antialias=True, flip=flip)
    torch.testing.assert_close(flipped, horizontal_flip(plain, flip), atol=ATOL, rtol=0)

    other_boxes = BOXES.flip(0)
    two_views = resized_crop(images, torch.cat([BOXES, other_boxes]), 16, antialias=True)
    torch.testing.assert_close(two_views[:8], plain, atol=0, rtol=0)
    torch.testing.assert_close(
        two_views[8:], resized_crop(images, other_boxes, 16, antialias=True), atol=0, rtol=0
    )


def test_resized_crop_ignores_a_callers_bf16_autocast():
    images = random_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = resized_crop(images, BOXES, 16)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, resized_crop(images, BOXES, 16), atol=0, rtol=0)


def torchvision_view(image, params, index, config, *, crop=True):
    """One sample of apply_view by torchvision's functional ops: crop -> jitter (its own
    order) -> grayscale -> blur -> solarize -> flip, with that sample's parameters."""
    view = image
    if crop:
        box = params.boxes[index].tolist()
        view = F2.resized_crop(image, *box, [config.image_size] * 2, antialias=True)
    view = reference_jitter(
        view, params.jitter_factors[index], params.jitter_order[index], params.jitter_apply[index]
    )
    if params.grayscale_apply[index]:
        view = F2.rgb_to_grayscale(view, num_output_channels=3)
    if config.blur_p > 0 and params.blur_apply[index]:
        sigma = float(params.blur_sigma[index])
        view = F2.gaussian_blur(view, [config.kernel_size] * 2, [sigma, sigma])
    if params.solarize_apply[index]:
        view = F2.solarize(view, 0.5)
    if params.flip[index]:
        view = F2.horizontal_flip(view)
    return view


@pytest.mark.parametrize("preset", ["cifar", "mocov2", "byol"])
def test_a_whole_view_matches_torchvisions_functional_pipeline_per_sample(preset):
    """crop -> jitter (random order) -> grayscale -> blur -> solarize -> flip, with each
    sample's drawn parameters fed to torchvision's functional ops one image at a time."""
    config = dataclasses.replace(preset_views(preset, 16)[0], solarize_p=0.5)
    images = torch.randint(0, 256, (12, 3, 24, 20), dtype=torch.uint8, generator=seeded())
    params = sample_view_params(12, 24, 20, config, generator=seeded(7))
    ours = apply_view(images, params, config)
    expected = [torchvision_view(image, params, index, config)
                for index, image in enumerate(images / 255.0)]
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_view_of_images_cropped_elsewhere_matches_torchvision_without_the_crop(dtype):
    config = dataclasses.replace(preset_views("byol", 16)[1], blur_p=0.5, solarize_p=0.5)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=seeded(1))
    params = sample_view_params(12, 16, 16, config, generator=seeded(9))
    source = images if dtype == torch.uint8 else images / 255.0
    ours = apply_view(source, params, config, crop=False)
    expected = [torchvision_view(image, params, index, config, crop=False)
                for index, image in enumerate(images / 255.0)]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="crop=False needs one 16x16 image per row"):
        apply_view(images[:, :, :12], params, config, crop=False)


# -- sampled parameters vs torchvision's samplers -----------------------------------------

DRAWS = 20_000


def torchvision_crop_boxes(draws: int, height: int, width: int, seed: int,
                           scale: tuple[float, float] = (0.2, 1.0)) -> torch.Tensor:
    torch.manual_seed(seed)
    image = torch.empty(3, height, width)
    return torch.tensor(
        [T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
         for _ in range(draws)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("height, width", [(32, 32), (24, 60)])
def test_crop_boxes_follow_torchvisions_distribution(height, width):
    # 24 x 60 is wider than 4/3: there all 10 attempts fail about 4% of the time and
    # torchvision falls back to the centre crop (0, 14, 24, 32).
    ours = sample_crop_boxes(DRAWS, height, width, generator=seeded(8))
    assert ours.dtype == torch.int64 and ours.shape == (DRAWS, 4)
    ours = ours.double()
    theirs = torchvision_crop_boxes(DRAWS, height, width, seed=9)
    top, left, box_height, box_width = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (box_height >= 1).all()
    assert (top + box_height <= height).all() and (left + box_width <= width).all()

    def statistics(boxes):
        top, left, box_height, box_width = boxes.unbind(1)
        return {
            "area": box_height * box_width / (height * width),
            "log_aspect": torch.log(box_width / box_height),
            "centre_y": (top + box_height / 2) / height,
            "centre_x": (left + box_width / 2) / width,
        }

    ours_stats, theirs_stats = statistics(ours), statistics(theirs)
    for name in ours_stats:
        assert ks_statistic(ours_stats[name], theirs_stats[name]) < ks_bound(DRAWS, DRAWS), name
        for q in (0.1, 0.5, 0.9):
            gap = ours_stats[name].quantile(q) - theirs_stats[name].quantile(q)
            assert abs(gap) < 0.03, (name, q)
    if (height, width) == (24, 60):
        fallback = torch.tensor([0.0, 14.0, 24.0, 32.0])
        ours_rate = (ours == fallback).all(1).double().mean()
        theirs_rate = (theirs == fallback).all(1).double().mean()
        assert theirs_rate > 0.02
        assert abs(ours_rate - theirs_rate) < 5 * math.sqrt(2 * 0.04 * 0.96 / DRAWS)


def test_crop_fallback_is_torchvisions_centre_crop():
    # scale (2, 3): no attempt can fit, so every box is the fallback.
    boxes = sample_crop_boxes(64, 24, 60, scale=(2.0, 3.0), generator=seeded())
    image = torch.empty(3, 24, 60)
    expected = T.RandomResizedCrop.get_params(image, [2.0, 3.0], [3 / 4, 4 / 3])
    assert expected == (0, 14, 24, 32)
    assert (boxes == torch.tensor(expected)).all()
    tall = sample_crop_boxes(4, 60, 24, scale=(2.0, 3.0), generator=seeded())
    assert (
        tall == torch.tensor(T.RandomResizedCrop.get_params(image.mT, [2.0, 3.0], [3 / 4, 4 / 3]))
    ).all()


def test_jitter_factors_follow_torchvisions_distribution():
    factors, _ = sample_color_jitter(DRAWS, generator=seeded(10))
    torch.manual_seed(11)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    theirs = torch.tensor(
        [
            jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)[1:]
            for _ in range(DRAWS)
        ]
    )
    for column, (low, high) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        values = factors[:, column]
        assert low <= values.min() and values.max() < high
        # U(low, high): mean (low + high) / 2, standard error (high - low) / sqrt(12 n).
        assert abs(values.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * DRAWS)
        assert ks_statistic(values, theirs[:, column]) < ks_bound(DRAWS, DRAWS)


def test_jitter_order_is_a_uniform_permutation_per_sample():
    _, order = sample_color_jitter(DRAWS, generator=seeded(12))
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(DRAWS, 4))
    # Each op lands in each slot a quarter of the time (5 standard errors).
    slot_frequency = torch.stack([(order == op).double().mean(0) for op in range(4)])
    tolerance = 5 * math.sqrt(0.25 * 0.75 / DRAWS)
    assert (slot_frequency - 0.25).abs().max() < tolerance
    # And all 24 orders come up equally often.
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].double() / DRAWS
    assert counts.numel() == 24
    assert (counts - 1 / 24).abs().max() < 5 * math.sqrt(1 / 24 * 23 / 24 / DRAWS)


@pytest.mark.parametrize("preset", ["cifar", "mocov2"])
def test_apply_probabilities_are_the_presets(preset):
    config = dataclasses.replace(preset_views(preset, 32)[0], solarize_p=0.2)
    params = sample_view_params(DRAWS, 32, 32, config, generator=seeded(13))
    expected = {
        "flip": 0.5,
        "jitter_apply": 0.8,
        "grayscale_apply": 0.2,
        "blur_apply": 0.5 if preset == "mocov2" else 0.0,
        "solarize_apply": 0.2,
    }
    for name, p in expected.items():
        frequency = getattr(params, name).double().mean()
        assert abs(frequency - p) < 5 * math.sqrt(0.25 / DRAWS) + 1e-12, name
    assert 0.1 <= params.blur_sigma.min() and params.blur_sigma.max() < 2.0
    assert abs(params.blur_sigma.mean() - 1.05) < 0.01
    assert abs(sample_apply(DRAWS, 0.0, generator=seeded()).double().mean()) == 0


# -- the N-view call ----------------------------------------------------------------------


def rows_of(params: ViewParams, rows: slice) -> ViewParams:
    return ViewParams(**{name: value[rows] for name, value in params.__dict__.items()})


@pytest.mark.parametrize("preset, num_views", [("cifar", 2), ("mocov2", 2), ("byol", 2),
                                               ("byol", 3)])
def test_two_views_never_read_values_back_to_the_host(preset, num_views):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    augment = BatchedViewAugment.from_preset(preset, 32, MEAN, STD, num_views=num_views,
                                             channels_last=True)
    augment(images, seeded(1))  # moves mean/std to the device once, outside the recorder
    with HostSyncRecorder() as recorder:
        augment(images, seeded(1))
    assert recorder.syncing_ops == []


def test_two_views_are_deterministic_per_seed_and_independent():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    augment = BatchedViewAugment.from_preset("mocov2", 32, MEAN, STD)
    (first, second), _ = augment(images, seeded(5))
    (again_first, again_second), _ = augment(images, seeded(5))
    assert torch.equal(first, again_first) and torch.equal(second, again_second)
    (other_first, _), _ = augment(images, seeded(6))
    assert not torch.equal(first, other_first)
    # Two views of one image differ (independent boxes, flips, colours).
    assert ((first - second).flatten(1).abs().amax(1) > 0.1).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_two_views_are_normalised_float32_of_the_requested_size_and_layout(channels_last):
    images = torch.randint(0, 256, (10, 3, 40, 36), dtype=torch.uint8, generator=seeded())
    augment = BatchedViewAugment.from_preset("cifar", 24, MEAN, STD, channels_last=channels_last)
    views, _ = augment(images, seeded(2))
    for view in views:
        assert view.shape == (10, 3, 24, 24) and view.dtype == torch.float32
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert view.is_contiguous(memory_format=memory_format)
        unnormalised = view * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_n_views_are_apply_view_on_each_views_params_drawn_in_view_order(num_views):
    """The documented draw order, checked from outside: sample_view_params for view 1,
    then view 2, ..., from the one generator; each view is apply_view of its own rows
    (for two views, what the two-view pipeline always drew)."""
    images = torch.randint(0, 256, (6, 3, 36, 32), dtype=torch.uint8, generator=seeded())
    configs = preset_views("byol", 32, num_views)
    augment = BatchedViewAugment(configs, mean=MEAN, std=STD)
    views, params = augment(images, seeded(3))
    assert len(views) == num_views
    generator = seeded(3)
    expected = [sample_view_params(6, 36, 32, config, generator=generator) for config in configs]
    for name, value in params.__dict__.items():
        assert torch.equal(value, torch.cat([getattr(p, name) for p in expected])), name
    assert params.boxes.shape == (num_views * 6, 4) and params.flip.shape == (num_views * 6,)
    for view, config, view_params in zip(views, configs, expected, strict=True):
        assert view.shape == (6, 3, 32, 32)
        reference = normalize(apply_view(images, view_params, config), MEAN, STD)
        torch.testing.assert_close(view, reference, atol=1e-5, rtol=0)


def test_two_views_equal_apply_view_on_the_sampled_parameters():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    augment = BatchedViewAugment.from_preset("mocov2", 32, MEAN, STD)
    (first, second), returned = augment(images, seeded(3))
    params = augment.sample_params(6, 32, 32, generator=seeded(3))
    assert all(torch.equal(value, getattr(returned, name))
               for name, value in params.__dict__.items())
    config = augment.views[0]
    for view, rows in ((first, slice(0, 6)), (second, slice(6, 12))):
        expected = normalize(apply_view(images, rows_of(params, rows), config), MEAN, STD)
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_views", [2, 3])
def test_augment_crops_is_apply_view_without_the_crop_and_never_syncs(num_views):
    crops = [torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=seeded(1 + k))
             for k in range(num_views)]
    augment = BatchedViewAugment.from_preset("byol", 16, MEAN, STD, num_views=num_views)
    views, returned = augment.augment_crops(crops, seeded(3))
    params = augment.sample_params(6, 16, 16, generator=seeded(3))
    assert torch.equal(returned.flip, params.flip)
    for k, (view, crop, config) in enumerate(zip(views, crops, augment.views, strict=True)):
        one_view = rows_of(params, slice(6 * k, 6 * (k + 1)))
        expected = [torchvision_view(image, one_view, index, config, crop=False)
                    for index, image in enumerate(crop / 255.0)]
        expected = normalize(torch.stack(expected), MEAN, STD)
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)
    # The crops' own boxes (cut elsewhere) come back in params in place of the unused draws.
    boxes = torch.arange(num_views * 6 * 4).view(-1, 4)
    again, with_boxes = augment.augment_crops(crops, seeded(3), boxes=boxes)
    assert with_boxes.boxes is boxes
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    with HostSyncRecorder() as recorder:
        augment.augment_crops(crops, seeded(3))
    assert recorder.syncing_ops == []
    with pytest.raises(ValueError, match=f"Expected {num_views} crops"):
        augment.augment_crops(crops[:1], seeded(3))


def test_asymmetric_views_draw_each_views_probabilities():
    # BYOL (Grill et al. 2020, Table 6): blur always in view 1, solarize only in view 2.
    first = ViewConfig(image_size=32, blur_p=1.0, solarize_p=0.0)
    second = ViewConfig(image_size=32, blur_p=0.1, solarize_p=0.2)
    augment = BatchedViewAugment([first, second], mean=MEAN, std=STD)
    params = augment.sample_params(4000, 32, 32, generator=seeded())
    assert params.blur_apply[:4000].all() and not params.solarize_apply[:4000].any()
    assert abs(params.blur_apply[4000:].double().mean() - 0.1) < 0.03
    assert abs(params.solarize_apply[4000:].double().mean() - 0.2) < 0.03
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    (view_1, view_2), _ = augment(images, seeded())
    assert view_1.shape == view_2.shape == (4, 3, 32, 32)


def test_one_view_and_a_third_view_cycle_the_preset():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    one = BatchedViewAugment.from_preset("byol", 32, MEAN, STD, num_views=1)
    three = BatchedViewAugment.from_preset("byol", 32, MEAN, STD, num_views=3)
    assert one.views == tuple(preset_views("byol", 32)[:1])
    assert three.views[2] == three.views[0] != three.views[1]
    (only,), params = one(images, seeded(4))
    assert only.shape == (5, 3, 32, 32) and params.boxes.shape == (5, 4)
    # View 1 draws first, so one view is the first of three.
    (first, _, _), _ = three(images, seeded(4))
    assert torch.equal(only, first)


# -- presets vs the PIL pipelines ---------------------------------------------------------


def torchvision_view_config(transform) -> ViewConfig:
    """The ViewConfig that a PIL view pipeline of mixmask.data.transforms describes, read
    off its torchvision transforms; ops it lacks get p = 0. Checks that the ops come in the
    order apply_view runs them (the flip commutes with all of them, see apply_view)."""
    order = [T.RandomResizedCrop, T.ColorJitter, T.RandomGrayscale, T.GaussianBlur,
             T.RandomSolarize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    fields, seen = {"jitter_p": 0.0, "grayscale_p": 0.0, "flip_p": 0.0}, []
    for step in transform.transforms:
        p = 1.0
        if isinstance(step, T.RandomApply):
            (step,), p = step.transforms, step.p
        # The crop and the flip are subclasses that also record their draws.
        seen.append(next(kind for kind in order if isinstance(step, kind)))
        if isinstance(step, T.RandomResizedCrop):
            assert step.size[0] == step.size[1]
            modes = {T.InterpolationMode.BILINEAR: "bilinear",
                     T.InterpolationMode.BICUBIC: "bicubic"}
            fields.update(image_size=step.size[0], scale=tuple(step.scale),
                          ratio=tuple(step.ratio), antialias=step.antialias,
                          interpolation=modes[step.interpolation])
        elif isinstance(step, T.ColorJitter):
            # ColorJitter(b) stores (1 - b, 1 + b); round off 1 + b - 1's float error.
            fields.update(jitter_p=p, brightness=round(step.brightness[1] - 1, 9),
                          contrast=round(step.contrast[1] - 1, 9),
                          saturation=round(step.saturation[1] - 1, 9), hue=step.hue[1])
            assert step.brightness[0] == pytest.approx(1 - fields["brightness"])
        elif isinstance(step, T.RandomGrayscale):
            fields["grayscale_p"] = step.p
        elif isinstance(step, T.GaussianBlur):
            assert step.kernel_size[0] == step.kernel_size[1]
            fields.update(blur_p=p, blur_kernel_size=step.kernel_size[0],
                          blur_sigma=tuple(step.sigma))
        elif isinstance(step, T.RandomSolarize):
            # PIL solarizes uint8 pixels >= threshold; on [0, 1] floats that is any
            # threshold in ((threshold - 1) / 255, threshold / 255]. Keep the upper end.
            fields.update(solarize_p=step.p, solarize_threshold=step.threshold / 255)
        elif isinstance(step, T.RandomHorizontalFlip):
            fields["flip_p"] = step.p
    assert seen == [kind for kind in order if kind in seen], seen
    return ViewConfig(**fields)


@pytest.mark.parametrize("preset", ["cifar", "mocov2", "byol", "byol_cifar", "mae",
                                    "a2mim_vit", "a2mim_resnet", "siameseim",
                                    "siameseim_cifar"])
@pytest.mark.parametrize("size", [32, 224])
def test_tensor_presets_match_the_pil_presets_view_by_view(preset, size):
    configs = preset_views(preset, size)
    augment = BatchedViewAugment.from_preset(preset, size, MEAN, STD)
    for ours, batched in zip(configs, augment.views, strict=True):
        expected = torchvision_view_config(view_transform(ours, MEAN, STD))
        assert batched == ours
        if expected.blur_p > 0:
            assert ours.kernel_size == expected.kernel_size
        assert 127 / 255 < ours.solarize_threshold <= expected.solarize_threshold
        ignore = {"blur_kernel_size": None, "solarize_threshold": 0.5}
        assert dataclasses.replace(ours, **ignore) == dataclasses.replace(expected, **ignore)


@pytest.mark.parametrize("preset", ["byol", "byol_cifar"])
def test_byol_solarizes_a_fifth_of_view_2_and_none_of_view_1(preset):
    # White images: crop, blur and every colour op leave a grey level of at least 0.6
    # (brightness >= 0.6; contrast, saturation and hue keep a flat grey), and solarizing
    # turns it into at most 0.4, so the mean of a view tells whether it was solarized.
    images = torch.full((DRAWS // 4, 3, 10, 10), 255, dtype=torch.uint8)
    augment = BatchedViewAugment.from_preset(preset, 8, MEAN, STD)
    (first, second), _ = augment(images, seeded(14))
    for view, p in ((first, 0.0), (second, 0.2)):
        level = (view * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1))
        level = level.mean(dim=(1, 2, 3))
        assert ((level <= 0.4 + 1e-5) | (level >= 0.6 - 1e-5)).all()
        solarized = (level < 0.5).double().mean()
        assert abs(solarized - p) < 5 * math.sqrt(p * (1 - p) / len(images)) + 1e-12, solarized


def test_ops_that_work_in_place_internally_leave_their_inputs_alone():
    images = random_images(batch=6, height=16, width=16)
    before = images.clone()
    factors, order = sample_color_jitter(6, generator=seeded(1))
    color_jitter(images, factors, order, torch.ones(6, dtype=torch.bool))
    gaussian_blur(images, torch.full((6,), 1.0), 5, torch.ones(6, dtype=torch.bool))
    config = dataclasses.replace(preset_views("byol", 16)[1], blur_p=0.5, solarize_p=0.5)
    params = sample_view_params(6, 16, 16, config, generator=seeded(2))
    apply_view(images, params, config, crop=False)
    apply_view(images, params, config)
    assert torch.equal(images, before)


def test_user_errors_are_short_sentences():
    with pytest.raises(ValueError, match="Unknown augmentation preset"):
        BatchedViewAugment.from_preset("autoaug", 32, MEAN, STD)
    with pytest.raises(ValueError, match="share image_size"):
        BatchedViewAugment([ViewConfig(32), ViewConfig(64)], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="share kernel_size"):
        BatchedViewAugment([ViewConfig(32), ViewConfig(32, blur_kernel_size=5)], mean=MEAN,
                           std=STD)
    with pytest.raises(ValueError, match="at least one view"):
        BatchedViewAugment([], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="RGB images"):
        BatchedViewAugment([ViewConfig(32)], mean=MEAN, std=STD)(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        gaussian_blur(random_images(), torch.ones(8), 4)
    with pytest.raises(ValueError, match="too large for 20x24 images"):
        gaussian_blur(random_images(), torch.ones(8), 41)


# -- views of several sizes (DINO's multi-crop) -------------------------------------------

# DINO's multi-crop at CIFAR scale (arXiv 2104.14294, sec. 3 and app.: global crops scale
# (0.4, 1) at the image size, local crops (0.05, 0.4) at about 0.4 of it), with BYOL's
# asymmetric colour ops on the two global views.
GLOBAL_VIEWS = [dataclasses.replace(view, scale=(0.4, 1.0)) for view in preset_views("byol", 32)]
LOCAL_VIEW = ViewConfig(16, scale=(0.05, 0.4), blur_p=0.5)


def test_one_group_of_views_is_batched_view_augment_to_the_bit():
    """Every preset's views share one size: MultiSizeViewAugment is then its one
    BatchedViewAugment, call for call, the views and every parameter bit-identical."""
    images = torch.randint(0, 256, (6, 3, 36, 32), dtype=torch.uint8, generator=seeded())
    crops = [torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=seeded(1 + k))
             for k in range(3)]
    for preset, size, num_views in (("cifar", 32, 2), ("mocov2", 32, 2), ("byol", 16, 3),
                                    ("siameseim", 16, 1)):
        configs = preset_views(preset, size, num_views)
        single = BatchedViewAugment(configs, mean=MEAN, std=STD, channels_last=True)
        multi = MultiSizeViewAugment(configs, mean=MEAN, std=STD, channels_last=True)
        assert len(multi.groups) == 1 and multi.members == (tuple(range(num_views)),)
        assert multi.views == single.views and multi.num_views == num_views
        calls = [(single(images, seeded(7)), multi(images, seeded(7)))]
        if size == 16:
            calls.append((single.augment_crops(crops[:num_views], seeded(8)),
                          multi.augment_crops(crops[:num_views], seeded(8))))
        for (expected_views, expected), (views, params) in calls:
            assert all(torch.equal(a, b) for a, b in zip(views, expected_views, strict=True))
            assert all(view.is_contiguous(memory_format=torch.channels_last) for view in views)
            for name, value in expected.__dict__.items():
                assert torch.equal(getattr(params, name), value), name


@pytest.mark.parametrize("order", ["globals_first", "interleaved"])
def test_views_of_several_sizes_are_each_groups_views_put_back_in_view_order(order):
    """One group per size, drawn in the order of each group's first view from the one
    generator, each group as its own BatchedViewAugment makes it; views, boxes and flips
    come back in view order."""
    configs = GLOBAL_VIEWS + [LOCAL_VIEW] * 4
    if order == "interleaved":
        configs = [LOCAL_VIEW, GLOBAL_VIEWS[0], LOCAL_VIEW, LOCAL_VIEW, GLOBAL_VIEWS[1],
                   LOCAL_VIEW]
    images = torch.randint(0, 256, (5, 3, 36, 40), dtype=torch.uint8, generator=seeded())
    augment = MultiSizeViewAugment(configs, mean=MEAN, std=STD)
    views, params = augment(images, seeded(3))
    members = [[k for k, c in enumerate(configs) if c.image_size == size]
               for size in dict.fromkeys(c.image_size for c in configs)]
    assert augment.members == tuple(map(tuple, members))
    # The independent calculation: one BatchedViewAugment per size, in the order of each
    # size's first view, on one generator.
    generator, expected_views, expected_rows = seeded(3), {}, {}
    for indices in members:
        group = BatchedViewAugment([configs[k] for k in indices], mean=MEAN, std=STD)
        group_views, group_params = group(images, generator)
        for position, k in enumerate(indices):
            expected_views[k] = group_views[position]
            expected_rows[k] = rows_of(group_params, slice(5 * position, 5 * (position + 1)))
    assert len(views) == 6
    for k, (view, config) in enumerate(zip(views, configs, strict=True)):
        assert view.shape == (5, 3, config.image_size, config.image_size)
        assert torch.equal(view, expected_views[k])
        for name, value in rows_of(params, slice(5 * k, 5 * (k + 1))).__dict__.items():
            assert torch.equal(value, getattr(expected_rows[k], name)), (k, name)
    assert params.boxes.shape == (30, 4) and params.flip.shape == (30,)
    # sample_params draws the same, in view order.
    drawn = augment.sample_params(5, 36, 40, generator=seeded(3))
    assert all(torch.equal(value, getattr(params, name)) for name, value in drawn.__dict__.items())
    if order == "globals_first":  # the global views draw first: the single-size pipeline's
        (first, second), _ = BatchedViewAugment(GLOBAL_VIEWS, mean=MEAN, std=STD)(images,
                                                                                  seeded(3))
        assert torch.equal(views[0], first) and torch.equal(views[1], second)


def test_views_of_several_sizes_are_deterministic_and_never_read_back_to_the_host():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    augment = MultiSizeViewAugment(GLOBAL_VIEWS + [LOCAL_VIEW] * 4, mean=MEAN, std=STD)
    crops = [torch.randint(0, 256, (6, 3, s, s), dtype=torch.uint8, generator=seeded(s))
             for s in (32, 32, 16, 16, 16, 16)]
    first, _ = augment(images, seeded(5))
    augment.augment_crops(crops, seeded(5))  # mean/std to the device once, outside the recorder
    with HostSyncRecorder() as recorder:
        again, _ = augment(images, seeded(5))
        augment.augment_crops(crops, seeded(5))
    assert recorder.syncing_ops == []
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other, _ = augment(images, seeded(6))
    assert not torch.equal(other[2], first[2])
    # Four local views of one image differ from each other.
    pairs = itertools.combinations(range(2, 6), 2)
    assert all(not torch.equal(first[a], first[b]) for a, b in pairs)


def test_augment_crops_of_several_sizes_is_each_groups_augment_crops_in_view_order():
    configs = [GLOBAL_VIEWS[0], LOCAL_VIEW, GLOBAL_VIEWS[1], LOCAL_VIEW]
    crops = [torch.randint(0, 256, (4, 3, c.image_size, c.image_size), dtype=torch.uint8,
                           generator=seeded(k)) for k, c in enumerate(configs)]
    augment = MultiSizeViewAugment(configs, mean=MEAN, std=STD)
    boxes = torch.arange(4 * 4 * 4).view(-1, 4)
    views, params = augment.augment_crops(crops, seeded(2), boxes=boxes)
    assert params.boxes is boxes
    generator = seeded(2)
    global_augment = BatchedViewAugment(GLOBAL_VIEWS, mean=MEAN, std=STD)
    local_augment = BatchedViewAugment([LOCAL_VIEW] * 2, mean=MEAN, std=STD)
    global_views, global_params = global_augment.augment_crops([crops[0], crops[2]], generator)
    local_views, local_params = local_augment.augment_crops([crops[1], crops[3]], generator)
    for view, expected in zip(views, [global_views[0], local_views[0], global_views[1],
                                      local_views[1]], strict=True):
        assert torch.equal(view, expected)
    flips = torch.cat([global_params.flip[:4], local_params.flip[:4], global_params.flip[4:],
                       local_params.flip[4:]])
    assert torch.equal(params.flip, flips)
    with pytest.raises(ValueError, match="Expected 4 crops"):
        augment.augment_crops(crops[:3], seeded(2))
    with pytest.raises(ValueError, match="crop=False needs one 32x32 image"):
        augment.augment_crops([crops[1]] * 4, seeded(2))
    with pytest.raises(ValueError, match="at least one view"):
        MultiSizeViewAugment([], mean=MEAN, std=STD)


def test_local_boxes_follow_torchvisions_distribution_with_their_own_scale():
    """The local views (the second group, drawn after the global views) draw boxes as
    RandomResizedCrop(16, scale=(0.05, 0.4)) does on the source image, inside it; the
    global views as RandomResizedCrop(32, scale=(0.4, 1))."""
    augment = MultiSizeViewAugment(GLOBAL_VIEWS + [LOCAL_VIEW] * 2, mean=MEAN, std=STD)
    params = augment.sample_params(DRAWS // 4, 32, 32, generator=seeded(12))
    draws = DRAWS // 2
    for rows, scale in ((slice(0, draws), (0.4, 1.0)), (slice(draws, 2 * draws), (0.05, 0.4))):
        ours = params.boxes[rows].double()
        top, left, box_height, box_width = ours.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (box_height >= 1).all()
        assert (top + box_height <= 32).all() and (left + box_width <= 32).all()
        theirs = torchvision_crop_boxes(draws, 32, 32, seed=13, scale=scale)
        for column in range(4):
            statistic = ks_statistic(ours[:, column], theirs[:, column])
            assert statistic < ks_bound(draws, draws), (scale, column)
        area = (box_height * box_width / 32**2).mean()
        assert abs(area - (theirs[:, 2] * theirs[:, 3] / 32**2).mean()) < 0.01, scale
