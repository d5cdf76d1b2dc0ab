"""Tests for mixmask.ops.mixing, each against an independent calculation."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from helpers import seeded
from host_sync import HostSyncRecorder
from torch import nn

from mixmask.ops.erasing import EraseBatch, focal_mask, high_pass_filter, sample_erase
from mixmask.ops.grid_masks import beit_block_mask, block_mask, discrete_mask, upsample_mask
from mixmask.ops.mixing import (
    MixMaskBatch,
    UnMixBatch,
    inverse_partner,
    mix_images,
    mix_ratio,
    permutation_partner,
    reversed_partner,
    sample_mixmask,
    sample_unmix,
    switched_lambda,
)


def masked_counts(keep_mask: torch.Tensor) -> torch.Tensor:
    return (keep_mask == 0).sum(dim=(1, 2))


def count_components(masked: torch.Tensor) -> torch.Tensor:
    """4-connected components of the True cells of each [g, g] mask, by propagating the
    largest cell label through each component until nothing changes."""
    n, g, _ = masked.shape
    own_label = torch.arange(1, g * g + 1).view(1, g, g).expand(n, g, g)
    labels = torch.where(masked, own_label, 0)
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack(
            [padded[:, 1:-1, :-2], padded[:, 1:-1, 2:], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]]
        ).amax(dim=0)
        updated = torch.where(masked, torch.maximum(labels, neighbours), 0)
        if torch.equal(updated, labels):
            break
        labels = updated
    # Each component keeps exactly one cell whose label is its own index: its largest.
    return (masked & (labels == own_label)).sum(dim=(1, 2))


# -- masked-cell counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "grid_size, mask_ratio",
    [(8, 0.5), (14, 0.4), (4, 0.5), (7, 0.3), (16, 0.6), (3, 0.5), (2, 0.5)],
)
def test_block_mask_has_exactly_target_masked_cells(grid_size, mask_ratio):
    target = round(mask_ratio * grid_size**2)
    keep = block_mask(150, grid_size, mask_ratio, generator=seeded())
    assert keep.shape == (150, grid_size, grid_size)
    assert keep.dtype == torch.float32
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert (masked_counts(keep) == target).all()


@pytest.mark.parametrize("grid_size, mask_ratio", [(8, 0.5), (14, 0.4), (5, 0.25), (2, 0.75)])
def test_discrete_mask_has_exactly_target_masked_cells(grid_size, mask_ratio):
    target = round(mask_ratio * grid_size**2)
    keep = discrete_mask(300, grid_size, mask_ratio, generator=seeded())
    assert keep.shape == (300, grid_size, grid_size)
    assert (masked_counts(keep) == target).all()


@pytest.mark.parametrize("mask_ratio, expected", [(0.01, 1), (0.99, 3)])
@pytest.mark.parametrize("make_mask", [block_mask, discrete_mask])
def test_masks_never_all_kept_or_all_masked(make_mask, mask_ratio, expected):
    # 2x2 grid: round(0.04) = 0 and round(3.96) = 4 are clamped to 1 and 3.
    keep = make_mask(200, 2, mask_ratio, generator=seeded())
    assert (masked_counts(keep) == expected).all()
    per_mask = keep.flatten(1)
    assert (per_mask.amax(dim=1) == 1).all() and (per_mask.amin(dim=1) == 0).all()


def test_block_mask_without_top_up_never_exceeds_target_and_mostly_hits_it():
    for grid_size, mask_ratio in [(8, 0.5), (14, 0.4), (6, 0.5)]:
        target = round(mask_ratio * grid_size**2)
        keep = block_mask(300, grid_size, mask_ratio, generator=seeded(1), fill_to_target=False)
        counts = masked_counts(keep)
        assert (counts <= target).all()
        assert (counts == target).float().mean() > 0.95
        assert (counts > 0).all()


def test_block_mask_cells_come_in_blocks():
    # Every rectangle has >= 2 cells (area >= 4 never rounds to 1x1), so without the
    # top-up every masked cell has a masked 4-neighbour.
    keep = block_mask(500, 8, 0.5, generator=seeded(2), fill_to_target=False)
    masked = F.pad(keep == 0, (1, 1, 1, 1))
    centre = masked[:, 1:-1, 1:-1]
    has_neighbour = (
        masked[:, :-2, 1:-1] | masked[:, 2:, 1:-1] | masked[:, 1:-1, :-2] | masked[:, 1:-1, 2:]
    )
    assert (has_neighbour | ~centre).all()


def test_block_masks_are_blockier_than_discrete_masks():
    block = block_mask(400, 8, 0.5, generator=seeded(3))
    discrete = discrete_mask(400, 8, 0.5, generator=seeded(3))
    block_components = count_components(block == 0).float().mean()
    discrete_components = count_components(discrete == 0).float().mean()
    assert block_components < 0.4 * discrete_components
    assert block_components < 4.0


def test_component_counter_on_a_known_mask():
    # fmt: off
    masked = torch.tensor([[1, 1, 0, 0],
                           [0, 0, 0, 1],
                           [1, 0, 1, 1],
                           [1, 0, 0, 0]], dtype=torch.bool)[None]
    # fmt: on
    assert count_components(masked).tolist() == [3]


def test_block_mask_rarely_repeats():
    keep = block_mask(200, 8, 0.5, generator=seeded(4))
    assert len({tuple(mask.flatten().tolist()) for mask in keep}) > 190


# -- determinism, device, validation ------------------------------------------------------


@pytest.mark.parametrize("make_mask", [block_mask, discrete_mask])
def test_same_seed_same_mask(make_mask):
    first = make_mask(16, 8, 0.5, generator=seeded(123))
    again = make_mask(16, 8, 0.5, generator=seeded(123))
    other = make_mask(16, 8, 0.5, generator=seeded(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("make_mask", [block_mask, discrete_mask])
def test_masks_are_built_on_the_generator_device(make_mask):
    generator = torch.Generator(device="cpu").manual_seed(0)
    assert make_mask(3, 8, generator=generator).device == generator.device


@pytest.mark.parametrize("make_mask", [block_mask, discrete_mask])
@pytest.mark.parametrize(
    "num_masks, grid_size, mask_ratio, message",
    [
        (1, 1, 0.5, "grid_size"),
        (1, 8, 0.0, "mask_ratio"),
        (1, 8, 1.0, "mask_ratio"),
        (0, 8, 0.5, "num_masks"),
    ],
)
def test_invalid_arguments_raise(make_mask, num_masks, grid_size, mask_ratio, message):
    with pytest.raises(ValueError, match=message):
        make_mask(num_masks, grid_size, mask_ratio, generator=seeded())


def test_block_mask_invalid_shape_parameters_raise():
    with pytest.raises(ValueError, match="min_aspect"):
        block_mask(1, 8, generator=seeded(), min_aspect=0.0)
    with pytest.raises(ValueError, match="min_block_cells"):
        block_mask(1, 8, generator=seeded(), min_block_cells=0)


def test_upsample_rejects_sizes_not_multiple_of_grid():
    with pytest.raises(ValueError, match="multiple"):
        upsample_mask(torch.ones(1, 8, 8), 30)


def test_sample_mixmask_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        sample_mixmask(torch.zeros(2, 3, 8, 8), grid_size=4, mode="random", generator=seeded())


# -- upsampling, mixing, lambda -----------------------------------------------------------


def test_upsample_is_nearest_neighbour():
    keep = discrete_mask(5, 4, generator=seeded())
    pixels = upsample_mask(keep, 12)
    assert pixels.shape == (5, 1, 12, 12)
    rows = torch.arange(12)[:, None] // 3
    cols = torch.arange(12)[None, :] // 3
    assert torch.equal(pixels[:, 0], keep[:, rows, cols])
    assert torch.equal(pixels, F.interpolate(keep[:, None], size=(12, 12), mode="nearest"))


def test_upsample_rectangular_image():
    keep = discrete_mask(2, 4, generator=seeded())
    pixels = upsample_mask(keep, (8, 16))
    assert torch.equal(pixels[:, 0], torch.kron(keep, torch.ones(2, 4)))


def test_reversed_partner():
    assert reversed_partner(5, "cpu").tolist() == [4, 3, 2, 1, 0]
    assert reversed_partner(4, torch.device("cpu")).dtype == torch.long


def test_mix_with_one_mask_matches_the_formula_image_by_image():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    keep = block_mask(1, 8, generator=seeded(1))
    mixed = mix_images(images, keep, reversed_partner(4, "cpu"))
    pixel_keep = torch.kron(keep[0], torch.ones(2, 2))
    for i in range(4):
        expected = pixel_keep * images[i] + (1 - pixel_keep) * images[3 - i]
        assert torch.equal(mixed[i], expected)


def test_lambda_is_mean_of_mask_and_the_share_of_original_pixels():
    batch = 6
    images = torch.randn(batch, 3, 32, 32, generator=seeded())
    keep = block_mask(batch, 8, 0.4, generator=seeded(1), fill_to_target=False)
    lam = mix_ratio(keep)
    assert lam.shape == (batch,)
    assert torch.allclose(lam, keep.float().mean(dim=(1, 2)))
    mixed = mix_images(images, keep, reversed_partner(batch, "cpu"))
    original_share = (mixed == images).float().mean(dim=(1, 2, 3))
    partner_share = (mixed == images.flip(0)).float().mean(dim=(1, 2, 3))
    assert torch.allclose(original_share, lam)
    assert torch.allclose(partner_share, 1 - lam)


def test_mix_keeps_dtype():
    images = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    mixed = mix_images(images, discrete_mask(1, 4, generator=seeded()), reversed_partner(2, "cpu"))
    assert mixed.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["block", "discrete"])
def test_sample_mixmask_per_batch(mode):
    # The exact lambda = 0.5 below is the exact-count generator's; BEiT's is tested apart.
    images = torch.randn(6, 3, 32, 32, generator=seeded())
    mix = sample_mixmask(
        images,
        grid_size=8,
        mask_ratio=0.5,
        mode=mode,
        per_sample=False,
        generator=seeded(1),
        block_generator="exact_count",
    )
    assert isinstance(mix, MixMaskBatch)
    assert mix.mixed_images.shape == images.shape
    assert mix.keep_mask.shape == (1, 8, 8)
    assert mix.lam.shape == (6,)
    assert torch.allclose(mix.lam, torch.full((6,), 0.5))
    assert mix.partner_index.tolist() == [5, 4, 3, 2, 1, 0]
    assert torch.equal(mix.mixed_images, mix_images(images, mix.keep_mask, mix.partner_index))


@pytest.mark.parametrize("mode", ["block", "discrete"])
def test_sample_mixmask_per_sample(mode):
    images = torch.randn(6, 3, 32, 32, generator=seeded())
    mix = sample_mixmask(
        images, grid_size=8, mask_ratio=0.25, mode=mode, per_sample=True, generator=seeded(1)
    )
    assert mix.keep_mask.shape == (6, 8, 8)
    assert mix.lam.shape == (6,)
    assert torch.allclose(mix.lam, mix.keep_mask.mean(dim=(1, 2)))
    assert len({tuple(mask.flatten().tolist()) for mask in mix.keep_mask}) == 6
    for i in range(6):
        pixel_keep = torch.kron(mix.keep_mask[i], torch.ones(4, 4))
        expected = pixel_keep * images[i] + (1 - pixel_keep) * images[5 - i]
        assert torch.equal(mix.mixed_images[i], expected)


def test_sample_mixmask_is_deterministic_given_the_seed():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    first = sample_mixmask(images, grid_size=4, per_sample=True, generator=seeded(7))
    again = sample_mixmask(images, grid_size=4, per_sample=True, generator=seeded(7))
    assert torch.equal(first.mixed_images, again.mixed_images)
    assert torch.equal(first.keep_mask, again.keep_mask)


# -- the complementary mix ----------------------------------------------------------------


def complementary_mix(images: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """By hand: the mix in which image i is the partner, M_j x_j + (1 - M_j) x_i, j = B-1-i."""
    batch, _, size, _ = images.shape
    scale = size // keep_mask.shape[-1]
    rows = []
    for i in range(batch):
        j = batch - 1 - i
        pixel_keep = torch.kron(keep_mask[j], torch.ones(scale, scale))
        rows.append(pixel_keep * images[j] + (1 - pixel_keep) * images[i])
    return torch.stack(rows)


def test_flipped_embedding_of_the_mix_is_the_embedding_of_the_complementary_mix():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    batch = 6
    images = torch.randn(batch, 3, 16, 16, generator=seeded())
    keep = block_mask(batch, 4, 0.5, generator=seeded(1), fill_to_target=False)
    with torch.no_grad():
        switched = model(mix_images(images, keep, reversed_partner(batch, "cpu"))).flip(0)
        expected = model(complementary_mix(images, keep))
    assert torch.allclose(switched, expected, atol=1e-5)


def test_switched_lambda_is_the_pixel_share_in_the_complementary_mix():
    batch = 6
    images = torch.randn(batch, 3, 16, 16, generator=seeded())
    # Different masked counts per sample, so the flip in switched_lambda matters.
    keep = torch.stack(
        [
            discrete_mask(1, 4, ratio, generator=seeded(i))[0]
            for i, ratio in enumerate([0.1, 0.2, 0.3, 0.5, 0.6, 0.9])
        ]
    )
    lam = mix_ratio(keep)
    share_of_image = (complementary_mix(images, keep) == images).float().mean(dim=(1, 2, 3))
    assert torch.allclose(switched_lambda(lam), share_of_image)
    expected = [1 - lam[batch - 1 - i].item() for i in range(batch)]
    assert torch.allclose(switched_lambda(lam), torch.tensor(expected))


def test_switched_lambda_with_one_mask_is_one_minus_lambda():
    lam = torch.full((4,), 0.375)
    assert torch.allclose(switched_lambda(lam), 1 - lam)


def test_masks_are_exact_under_autocast():
    # sample_mixmask runs inside the training step, possibly under autocast.
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        keep = block_mask(200, 16, 0.5, generator=seeded(), fill_to_target=False)
        topped_up = block_mask(200, 16, 0.5, generator=seeded())
    assert keep.dtype == torch.float32
    assert (masked_counts(keep) <= 128).all()
    assert (masked_counts(topped_up) == 128).all()


def test_sync_recorder_catches_host_reads():
    values = torch.randn(8)
    with HostSyncRecorder() as recorder:
        values[values > 0]
        values.sum().item()
    assert len(recorder.syncing_ops) == 2


@pytest.mark.parametrize(
    "mode, block_generator", [("block", "beit"), ("block", "exact_count"), ("discrete", "beit")]
)
@pytest.mark.parametrize("per_sample", [False, True])
def test_sampling_and_mixing_never_read_values_back_to_the_host(mode, block_generator, per_sample):
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    with HostSyncRecorder() as recorder:
        mix = sample_mixmask(
            images,
            grid_size=4,
            mode=mode,
            per_sample=per_sample,
            generator=seeded(1),
            block_generator=block_generator,
        )
        switched_lambda(mix.lam)
    assert recorder.syncing_ops == []


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


# -- partners ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 3, 5, 8, 13])
def test_permutation_partner_is_a_single_cycle_derangement(batch):
    for seed in range(20):
        partner = permutation_partner(batch, generator=seeded(seed))
        assert partner.dtype == torch.long and partner.shape == (batch,)
        assert sorted(partner.tolist()) == list(range(batch))
        assert all(partner[i].item() != i for i in range(batch))
        # Following the partners from image 0 visits every image before coming back.
        visited, image = [], 0
        for _ in range(batch):
            image = partner[image].item()
            visited.append(image)
        assert visited[-1] == 0 and sorted(visited) == list(range(batch))


def test_permutation_partner_varies_with_the_seed_and_repeats_with_it():
    draws = {tuple(permutation_partner(6, generator=seeded(seed)).tolist()) for seed in range(40)}
    assert len(draws) > 20  # 5! = 120 single cycles through 6 images
    first = permutation_partner(9, generator=seeded(3))
    assert torch.equal(first, permutation_partner(9, generator=seeded(3)))


def test_permutation_partner_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        permutation_partner(1, generator=seeded())


def test_inverse_partner_composes_to_the_identity():
    for seed in range(10):
        partner = torch.randperm(11, generator=seeded(seed))
        inverse = inverse_partner(partner)
        identity = torch.arange(11)
        assert torch.equal(partner[inverse], identity)
        assert torch.equal(inverse[partner], identity)
    reversed_index = reversed_partner(7, "cpu")
    assert torch.equal(inverse_partner(reversed_index), reversed_index)


def test_switched_embedding_with_a_permutation_partner():
    batch = 6
    model = small_model()
    images = torch.randn(batch, 3, 16, 16, generator=seeded())
    partner = permutation_partner(batch, generator=seeded(5))
    mix = sample_mixmask(
        images,
        grid_size=4,
        mask_ratio=0.3,
        mode="discrete",
        per_sample=True,
        generator=seeded(1),
        partner_index=partner,
    )
    assert torch.equal(mix.partner_index, partner)
    # By hand: the mix in which image i is the partner, found by searching the partners.
    complementary = []
    for i in range(batch):
        j = [k for k in range(batch) if partner[k].item() == i][0]
        pixel_keep = torch.kron(mix.keep_mask[j], torch.ones(4, 4))
        complementary.append(pixel_keep * images[j] + (1 - pixel_keep) * images[i])
    complementary = torch.stack(complementary)
    inverse = inverse_partner(partner)
    with torch.no_grad():
        switched = model(mix.mixed_images)[inverse]
        expected = model(complementary)
    assert torch.allclose(switched, expected, atol=1e-5)
    share_of_image = (complementary == images).float().mean(dim=(1, 2, 3))
    assert torch.allclose(switched_lambda(mix.lam, partner_index=partner), share_of_image)


def test_sample_mixmask_default_partner_is_still_the_reversed_batch():
    images = torch.randn(4, 3, 8, 8, generator=seeded())
    mix = sample_mixmask(images, grid_size=4, generator=seeded(1))
    assert mix.partner_index.tolist() == [3, 2, 1, 0]
    assert torch.equal(
        switched_lambda(mix.lam, partner_index=mix.partner_index), switched_lambda(mix.lam)
    )


@pytest.mark.parametrize("sample", [sample_mixmask, sample_unmix])
def test_mixes_reject_a_batch_of_one_and_a_wrong_partner(sample):
    kwargs = {"grid_size": 4} if sample is sample_mixmask else {}
    with pytest.raises(ValueError, match="at least 2"):
        sample(torch.zeros(1, 3, 8, 8), generator=seeded(), **kwargs)
    with pytest.raises(ValueError, match="partner_index"):
        sample(torch.zeros(4, 3, 8, 8), generator=seeded(), partner_index=torch.arange(3), **kwargs)


# -- Un-Mix ------------------------------------------------------------------------------


def unmix_draws(count: int, **kwargs) -> list[UnMixBatch]:
    images = torch.randn(2, 3, 8, 8, generator=seeded())
    generator = seeded(11)
    return [sample_unmix(images, generator=generator, **kwargs) for _ in range(count)]


def test_unmix_lambda_is_uniform_with_alpha_one():
    lam = torch.stack([draw.lam[0] for draw in unmix_draws(2000, p_mixup=1.0)])
    assert ((lam >= 0) & (lam <= 1)).all()
    # Kolmogorov-Smirnov distance to U(0, 1), by hand (1% critical value ~ 0.036).
    ordered = lam.sort().values
    n = ordered.numel()
    above = (torch.arange(1, n + 1) / n - ordered).abs().max()
    below = (ordered - torch.arange(0, n) / n).abs().max()
    assert max(above, below) < 0.04
    counts = torch.histc(lam, bins=10, min=0, max=1)
    assert (counts > 140).all() and (counts < 260).all()


def test_unmix_lambda_follows_beta_moments_for_other_alpha():
    for alpha in (0.2, 2.0):
        lam = torch.stack([draw.lam[0] for draw in unmix_draws(1500, p_mixup=1.0, alpha=alpha)])
        assert ((lam >= 0) & (lam <= 1)).all()
        variance = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1/(4(2a+1))
        assert abs(lam.mean().item() - 0.5) < 0.03
        assert abs(lam.var().item() - variance) < 0.12 * variance


def test_unmix_mixup_matches_the_formula():
    images = torch.randn(6, 3, 10, 12, generator=seeded())
    partner = permutation_partner(6, generator=seeded(2))
    for seed in range(5):
        draw = sample_unmix(images, generator=seeded(seed), p_mixup=1.0, partner_index=partner)
        assert not draw.used_cutmix
        assert draw.lam.shape == (6,) and (draw.lam == draw.lam[0]).all()
        lam = draw.lam[0].item()
        for i in range(6):
            expected = lam * images[i] + (1 - lam) * images[partner[i].item()]
            assert torch.allclose(draw.mixed_images[i], expected, atol=1e-6)


@pytest.mark.parametrize("height, width", [(16, 16), (12, 20), (7, 5), (32, 32)])
def test_unmix_cutmix_box_area_is_one_minus_lambda(height, width):
    batch = 4
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    images = images.expand(batch, 3, height, width).clone()
    saw_clipped_or_partial = False
    for seed in range(60):
        draw = sample_unmix(images, generator=seeded(seed), p_mixup=0.0)
        assert draw.used_cutmix
        from_partner = draw.mixed_images == images.flip(0)
        from_self = draw.mixed_images == images
        assert (from_partner | from_self).all()
        partner_share = from_partner.float().mean(dim=(1, 2, 3))
        assert torch.allclose(partner_share, 1 - draw.lam)
        # The pasted region is one axis-aligned rectangle, the same in every image.
        region = from_partner[0, 0]
        rows, cols = region.any(dim=1), region.any(dim=0)
        assert torch.equal(region, rows[:, None] & cols[None, :])
        assert (from_partner == from_partner[:1, :1]).all()
        saw_clipped_or_partial |= 0 < partner_share[0].item() < 1
    assert saw_clipped_or_partial


def test_unmix_extremes_and_fraction_of_mixup_draws():
    assert not any(draw.used_cutmix for draw in unmix_draws(50, p_mixup=1.0))
    assert all(draw.used_cutmix for draw in unmix_draws(50, p_mixup=0.0))
    draws = unmix_draws(2000, p_mixup=0.3)
    mixup_fraction = sum(not draw.used_cutmix for draw in draws) / len(draws)
    assert abs(mixup_fraction - 0.3) < 0.04  # binomial std ~ 0.01


def test_unmix_is_deterministic_given_the_seed():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    for seed in range(4):
        first = sample_unmix(images, generator=seeded(seed))
        again = sample_unmix(images, generator=seeded(seed))
        assert torch.equal(first.mixed_images, again.mixed_images)
        assert torch.equal(first.lam, again.lam)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"p_mixup": 1.5}, "p_mixup"), ({"p_mixup": -0.1}, "p_mixup"), ({"alpha": 0.0}, "alpha")],
)
def test_unmix_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_unmix(torch.zeros(2, 3, 8, 8), generator=seeded(), **kwargs)


# -- erase: masks, fills, filter ------------------------------------------------------------


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def test_erase_noise_fill_statistics():
    images = torch.randn(8, 3, 32, 32, generator=seeded()) + 5.0  # far from the noise
    erase = sample_erase(images, generator=seeded(1), fill="noise", noise_std=0.5)
    assert isinstance(erase, EraseBatch)
    erased = (erase.keep_mask == 0).expand_as(images)
    noise = erase.erased_images[erased]
    assert noise.numel() == images.numel() // 2
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 0.5) < 0.02


@pytest.mark.parametrize("mode", ["discrete", "block"])
@pytest.mark.parametrize("grid_size, mask_ratio", [(8, 0.5), (4, 0.25), (16, 0.6)])
def test_erase_grid_masked_fraction_is_the_mask_ratio(mode, grid_size, mask_ratio):
    # Exact counts: the exact-count block generator (BEiT's can end short, tested apart).
    images = torch.full((6, 3, 32, 32), 7.0)
    erase = sample_erase(
        images,
        generator=seeded(1),
        grid_size=grid_size,
        mask_ratio=mask_ratio,
        mode=mode,
        fill="mean",
        block_generator="exact_count",
    )
    assert erase.keep_mask.shape == (6, 1, 32, 32)
    expected = round(mask_ratio * grid_size**2) / grid_size**2
    changed = (erase.erased_images != images).float().mean(dim=(1, 2, 3))
    assert torch.allclose(changed, torch.full((6,), expected))
    # Each erased cell is a whole grid cell.
    cell = 32 // grid_size
    pooled = F.avg_pool2d(erase.keep_mask, cell)
    assert set(pooled.unique().tolist()) <= {0.0, 1.0}


def test_erase_keeps_unmasked_pixels_exactly():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    for kwargs in ({}, {"shape": "focal"}, {"channel_wise": True}, {"per_sample": False}):
        erase = sample_erase(images, generator=seeded(2), grid_size=4, **kwargs)
        kept = erase.keep_mask.bool().expand_as(images)
        assert torch.equal(erase.erased_images[kept], images[kept])
        assert (erase.erased_images[~kept] != images[~kept]).all()


def test_erase_channel_wise_masks_differ_per_channel():
    images = torch.randn(5, 3, 32, 32, generator=seeded())
    erase = sample_erase(images, generator=seeded(3), channel_wise=True, mask_ratio=0.5)
    assert erase.keep_mask.shape == (5, 3, 32, 32)
    for i in range(5):
        masks = erase.keep_mask[i]
        assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert torch.allclose(1 - erase.keep_mask.mean(dim=(2, 3)), torch.full((5, 3), 0.5))
    shared = sample_erase(images, generator=seeded(3), channel_wise=True, per_sample=False)
    assert shared.keep_mask.shape == (1, 3, 32, 32)


def test_erase_one_mask_for_the_batch():
    images = torch.randn(5, 3, 16, 16, generator=seeded())
    erase = sample_erase(images, generator=seeded(3), grid_size=4, per_sample=False)
    assert erase.keep_mask.shape == (1, 1, 16, 16)
    changed = erase.erased_images != images
    assert (changed == changed[:1]).all()


def test_erase_zero_fill_is_a_raw_black_pixel_and_mean_fill_is_zero():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    zero = sample_erase(
        images,
        generator=seeded(4),
        grid_size=4,
        fill="zero",
        pixel_mean=CIFAR_MEAN,
        pixel_std=CIFAR_STD,
    )
    raw = zero.erased_images * std + mean
    erased = (zero.keep_mask == 0).expand_as(images)
    assert torch.allclose(raw[erased], torch.zeros(()), atol=1e-6)
    mean_fill = sample_erase(images, generator=seeded(4), grid_size=4, fill="mean")
    assert (mean_fill.erased_images[(mean_fill.keep_mask == 0).expand_as(images)] == 0).all()


def test_focal_mask_keeps_one_rectangle_within_the_scale_range():
    height, width, scale = 24, 40, (0.1, 0.6)
    keep = focal_mask(500, (height, width), generator=seeded(5), scale=scale)
    assert keep.shape == (500, 1, height, width) and keep.dtype == torch.float32
    fraction = keep.mean(dim=(1, 2, 3))
    slack = 1 / (2 * width)  # rounding the rectangle's width to whole pixels
    assert (fraction >= scale[0] - slack).all() and (fraction <= scale[1] + slack).all()
    assert fraction.min() < 0.15 and fraction.max() > 0.55  # the range is covered
    region = keep[:, 0].bool()
    rows, cols = region.any(dim=2), region.any(dim=1)
    assert torch.equal(region, rows[:, :, None] & cols[:, None, :])
    # Rows (and columns) of the rectangle are contiguous.
    assert (rows.float().diff(dim=1).abs().sum(dim=1) <= 2).all()
    assert (cols.float().diff(dim=1).abs().sum(dim=1) <= 2).all()
    # The corner is uniform enough that every pixel is kept by some mask.
    assert region.any(dim=0).all()


def test_erase_focal_keeps_one_minus_mask_ratio_by_default():
    images = torch.randn(50, 3, 32, 32, generator=seeded())
    erase = sample_erase(images, generator=seeded(6), shape="focal", mask_ratio=0.7)
    kept = erase.keep_mask.mean(dim=(1, 2, 3))
    assert (kept - 0.3).abs().max() <= 1 / 64 + 1e-6
    ranged = sample_erase(images, generator=seeded(6), shape="focal", focal_scale=(0.2, 0.4))
    kept = ranged.keep_mask.mean(dim=(1, 2, 3))
    assert kept.min() >= 0.2 - 1 / 64 and kept.max() <= 0.4 + 1 / 64


@pytest.mark.parametrize("sigma", [0.8, 1.5, 3.0])
def test_high_pass_is_the_image_minus_torchvision_gaussian_blur(sigma):
    images = torch.randn(2, 3, 32, 24, generator=seeded())
    size = 2 * math.ceil(3 * sigma) + 1
    expected = images - TF.gaussian_blur(images, [size, size], [sigma, sigma])
    assert torch.allclose(high_pass_filter(images, sigma), expected, atol=1e-5)


def test_high_pass_of_a_constant_image_is_zero():
    images = torch.full((2, 3, 16, 16), 1.7) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    assert high_pass_filter(images, 2.0).abs().max() < 1e-5
    # Even when the kernel is wider than a tiny image.
    assert high_pass_filter(torch.full((1, 1, 3, 3), 4.0), 5.0).abs().max() < 1e-5


@pytest.mark.parametrize("sigma", [1.5, 2.0])
def test_high_pass_frequency_response(sigma):
    # A cosine of f cycles per pixel leaves the filter scaled by 1 - exp(-2 pi^2 sigma^2 f^2),
    # the continuous Gaussian's response; compare away from the borders.
    size, radius = 64, math.ceil(3 * sigma)
    columns = torch.arange(size, dtype=torch.float32)
    for frequency in (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2):
        wave = torch.cos(2 * math.pi * frequency * columns).expand(1, 1, size, size)
        output = high_pass_filter(wave.clone(), sigma)[..., radius:-radius, radius:-radius]
        inner = wave[..., radius:-radius, radius:-radius]
        gain = (output * inner).sum() / (inner * inner).sum()
        expected = 1 - math.exp(-2 * math.pi**2 * sigma**2 * frequency**2)
        assert abs(gain.item() - expected) < 0.01
        assert torch.allclose(output, gain * inner, atol=1e-4)


def test_high_pass_keeps_dtype_and_channels_separate():
    images = torch.zeros(1, 3, 16, 16)
    images[0, 1, 8, 8] = 1.0
    filtered = high_pass_filter(images, 1.0)
    assert filtered[0, 0].abs().max() == 0 and filtered[0, 2].abs().max() == 0
    assert filtered[0, 1, 8, 8] > 0.5
    assert high_pass_filter(images.to(torch.bfloat16), 1.0).dtype == torch.bfloat16


def test_erase_high_pass_filters_the_kept_pixels():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    erase = sample_erase(images, generator=seeded(7), grid_size=4, high_pass_sigma=1.0)
    kept = erase.keep_mask.bool().expand_as(images)
    filtered = images - TF.gaussian_blur(images, [7, 7], [1.0, 1.0])
    assert torch.allclose(erase.erased_images[kept], filtered[kept], atol=1e-5)


def test_erase_is_deterministic_given_the_seed():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    for kwargs in ({}, {"shape": "focal", "channel_wise": True}):
        first = sample_erase(images, generator=seeded(8), grid_size=4, **kwargs)
        again = sample_erase(images, generator=seeded(8), grid_size=4, **kwargs)
        other = sample_erase(images, generator=seeded(9), grid_size=4, **kwargs)
        assert torch.equal(first.erased_images, again.erased_images)
        assert torch.equal(first.keep_mask, again.keep_mask)
        assert not torch.equal(first.erased_images, other.erased_images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid_size": 5}, "grid_size"),
        ({"grid_size": 32}, "grid_size"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"shape": "circle"}, "shape"),
        ({"fill": "blur"}, "fill"),
        ({"mode": "random"}, "mode"),
        ({"fill": "zero"}, "pixel_mean"),
        ({"fill": "zero", "pixel_mean": (0.5,), "pixel_std": (0.2,)}, "one value per channel"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"high_pass_sigma": -1.0}, "high_pass_sigma"),
    ],
)
def test_erase_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_erase(torch.zeros(2, 3, 16, 16), generator=seeded(), **kwargs)


def test_focal_and_high_pass_invalid_arguments_raise():
    with pytest.raises(ValueError, match="scale"):
        focal_mask(2, 16, generator=seeded(), scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="scale"):
        focal_mask(2, 16, generator=seeded(), scale=(0.0, 0.2))
    with pytest.raises(ValueError, match="sigma"):
        high_pass_filter(torch.zeros(1, 1, 8, 8), 0.0)


# -- no host reads in the new samplers ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "block", "per_sample": False},
        {"mode": "block", "block_generator": "exact_count"},
        {"shape": "focal", "channel_wise": True},
        {"fill": "zero", "pixel_mean": CIFAR_MEAN, "pixel_std": CIFAR_STD, "high_pass_sigma": 1.0},
    ],
)
def test_erase_never_reads_values_back_to_the_host(kwargs):
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    with HostSyncRecorder() as recorder:
        sample_erase(images, generator=seeded(1), grid_size=4, **kwargs)
    assert recorder.syncing_ops == []


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unmix_and_partners_never_read_values_back_to_the_host(alpha):
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    with HostSyncRecorder() as recorder:
        partner = permutation_partner(4, generator=seeded(1))
        inverse = inverse_partner(partner)
        draw = sample_unmix(images, generator=seeded(2), alpha=alpha, partner_index=partner)
        sample_mixmask(images, grid_size=4, generator=seeded(3), partner_index=partner)
        switched_lambda(draw.lam, partner_index=partner)
        draw.mixed_images[inverse]
    assert recorder.syncing_ops == []


# -- BEiT's block-mask generator (the MixMask reference's) ---------------------------------


def beit_reference_mask(grid_size: int, num_patches: int, rng) -> list[list[int]]:
    """A literal transcription of BEiT's ``MaskingGenerator`` (arXiv 2106.08254, Alg. 1) as
    the MixMask reference runs it: ``num_patches`` block cells, min_num_patches = 4,
    max_num_patches = num_patches, aspect in (0.3, 1/0.3). ``rng`` is Python's ``random``
    module (or a stand-in with its ``uniform``/``randint``). 1 = inside a block."""
    height = width = grid_size
    min_num_patches, max_num_patches = 4, num_patches
    log_aspect_ratio = (math.log(0.3), math.log(1 / 0.3))
    mask = [[0] * width for _ in range(height)]

    def _mask(max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = rng.uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = sum(
                    mask[i][j] for i in range(top, top + h) for j in range(left, left + w)
                )
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_patches:
        max_mask_patches = min(num_patches - mask_count, max_num_patches)
        delta = _mask(max_mask_patches)
        if delta == 0:
            break
        mask_count += delta
    return mask


def smallest_component(mask: list[list[int]]) -> int:
    """Size of the smallest 4-connected component of the 1 cells (by flood fill); 0 if none."""
    size = len(mask)
    seen = [[False] * size for _ in range(size)]
    smallest = 0
    for row in range(size):
        for col in range(size):
            if mask[row][col] and not seen[row][col]:
                seen[row][col] = True
                stack, cells = [(row, col)], 0
                while stack:
                    r, c = stack.pop()
                    cells += 1
                    for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                        if 0 <= nr < size and 0 <= nc < size and mask[nr][nc]:
                            if not seen[nr][nc]:
                                seen[nr][nc] = True
                                stack.append((nr, nc))
                smallest = cells if smallest == 0 else min(smallest, cells)
    return smallest


class ReplayRandom:
    """A stand-in for Python's ``random`` that replays ``beit_block_mask``'s uniforms: one
    (area, aspect, top, left) row per attempt, the attempt starting at each area draw, and
    CPython's formulas ``uniform(a, b) = a + (b - a) u``, ``randint(a, b)`` uniform over
    ``a..b`` (here ``a + floor(u (b - a + 1))``)."""

    def __init__(self, rows: list[list[float]]):
        self.rows = iter(rows)
        self.row: list[float] = []
        self.slot = 4

    def _next(self, start_attempt: bool) -> float:
        if start_attempt:
            self.row, self.slot = next(self.rows), 0
        value = self.row[self.slot]
        self.slot += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._next(start_attempt=self.slot != 1)

    def randint(self, low: int, high: int) -> int:
        return low + min(math.floor(self._next(False) * (high - low + 1)), high - low)


def beit_uniforms(num_masks: int, target: int, seed: int) -> torch.Tensor:
    """The draw beit_block_mask documents: one float64 rand [n, target * 10, 4]."""
    return torch.rand(num_masks, target * 10, 4, dtype=torch.float64, generator=seeded(seed))


@pytest.mark.parametrize("grid_size, target", [(8, 32), (4, 8), (6, 18)])
def test_beit_block_mask_is_the_reference_loop_on_its_uniforms(grid_size, target):
    num_masks, seed = 400, 21
    keep = beit_block_mask(num_masks, grid_size, 0.5, generator=seeded(seed))
    uniforms = beit_uniforms(num_masks, target, seed).tolist()
    expected = [beit_reference_mask(grid_size, target, ReplayRandom(rows)) for rows in uniforms]
    assert keep.long().tolist() == expected


def test_beit_lambda_distribution_matches_the_reference_with_python_random():
    rng = random.Random(0)
    for grid_size, draws, low, high in [(8, 8000, 0.93, 0.98), (4, 4000, 0.975, 1.0)]:
        cells = grid_size * grid_size
        target = cells // 2
        reference = [
            sum(map(sum, beit_reference_mask(grid_size, target, rng))) for _ in range(draws)
        ]
        ours = beit_block_mask(draws, grid_size, 0.5, generator=seeded(1)).sum(dim=(1, 2))
        ours = ours.long().tolist()
        shares = []
        for counts in (reference, ours):
            assert max(counts) == target  # lambda <= 1 - ratio = 0.5
            share = counts.count(target) / draws
            assert low <= share <= high
            shares.append(share)
            if grid_size == 8:
                short = Counter(count for count in counts if count != target)
                assert short.most_common(1)[0][0] == 31  # lambda = 31/64
                assert min(counts) >= 26  # rarely below 0.44 (28/64) in the reference
        assert abs(shares[0] - shares[1]) < 0.02  # binomial sd of the difference ~0.003


def test_beit_block_mask_places_blocks_smaller_than_min_block_cells():
    # Every placed rectangle is fully marked and connected, so each 4-connected component
    # is a union of whole rectangles, and a component of <= 2 cells holds only rectangles
    # of <= 2 cells: BEiT draws those when fewer than 4 cells remain (uniform(4, budget)).
    rng = random.Random(2)
    reference = [beit_reference_mask(8, 32, rng) for _ in range(3000)]
    ours = beit_block_mask(3000, 8, 0.5, generator=seeded(3)).long().tolist()
    rates = [
        sum(0 < smallest_component(mask) <= 2 for mask in masks) / len(masks)
        for masks in (reference, ours)
    ]
    assert all(rate > 0.05 for rate in rates)  # about 13% in both
    assert abs(rates[0] - rates[1]) < 0.04
    # The exact-count generator (without its top-up) never proposes such blocks.
    exact = block_mask(500, 8, 0.5, generator=seeded(3), fill_to_target=False) == 0
    assert all(smallest_component(mask) > 2 for mask in exact.long().tolist())


@pytest.mark.parametrize(
    "grid_size, mask_ratio, kept",
    # kept = int((1 - ratio) * g^2) in integer arithmetic; 1 - 0.9 = 0.0999... in floats.
    [(8, 0.5, 32), (14, 0.4, 117), (7, 0.3, 34), (16, 0.6, 102), (10, 0.9, 10), (3, 0.5, 4)],
)
def test_beit_block_mask_keeps_at_most_the_target_and_mostly_hits_it(grid_size, mask_ratio, kept):
    keep = beit_block_mask(300, grid_size, mask_ratio, generator=seeded(4))
    assert keep.shape == (300, grid_size, grid_size)
    assert keep.dtype == torch.float32 and keep.device.type == "cpu"
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    counts = keep.sum(dim=(1, 2))
    assert (counts <= kept).all()
    assert (counts == kept).float().mean() > 0.8  # 0.89-0.99 with this seed


def test_beit_block_mask_same_seed_same_mask():
    first = beit_block_mask(16, 8, generator=seeded(123))
    assert torch.equal(first, beit_block_mask(16, 8, generator=seeded(123)))
    assert not torch.equal(first, beit_block_mask(16, 8, generator=seeded(124)))


def test_beit_block_mask_advances_the_generator_by_a_fixed_amount():
    # Whatever the masks look like (short of the target or not), one call consumes exactly
    # one torch.rand(n, 32 * 10, 4, float64) of the generator.
    outcomes = set()
    for seed in range(100):  # about 1 mask in 20 ends short
        generator, twin = seeded(seed), seeded(seed)
        keep = beit_block_mask(1, 8, 0.5, generator=generator)
        torch.rand(1, 320, 4, dtype=torch.float64, generator=twin)
        outcomes.add(int(keep.sum().item()))
        assert torch.equal(generator.get_state(), twin.get_state())
        assert torch.equal(torch.rand(8, generator=generator), torch.rand(8, generator=twin))
    assert 32 in outcomes and min(outcomes) < 32  # both kinds of outcome were covered


class FakeDeviceGenerator:
    """Only a ``device`` attribute, as a CUDA generator has; any draw from it would fail."""

    device = torch.device("cuda", 0)


def test_beit_block_mask_rejects_non_cpu_generators_and_bad_parameters():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        beit_block_mask(1, 8, generator=FakeDeviceGenerator())
    with pytest.raises(ValueError, match="min_block_cells"):
        beit_block_mask(1, 8, generator=seeded(), min_block_cells=0)
    with pytest.raises(ValueError, match="min_aspect"):
        beit_block_mask(1, 8, generator=seeded(), min_aspect=0.0)
    with pytest.raises(ValueError, match="max_attempts"):
        beit_block_mask(1, 8, generator=seeded(), max_attempts=0)
    with pytest.raises(ValueError, match="grid_size"):
        beit_block_mask(1, 1, generator=seeded())


def test_samplers_ask_for_a_host_generator_with_a_device_generator():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    with pytest.raises(ValueError, match="host_generator"):
        sample_mixmask(images, grid_size=4, generator=FakeDeviceGenerator())
    with pytest.raises(ValueError, match="host_generator"):
        sample_erase(
            images, grid_size=4, mode="block", fill="mean", generator=FakeDeviceGenerator()
        )
    # With a host generator the device generator is not needed for BEiT's masks.
    mix = sample_mixmask(
        images, grid_size=4, generator=FakeDeviceGenerator(), host_generator=seeded(5)
    )
    assert torch.equal(mix.keep_mask, beit_block_mask(1, 4, generator=seeded(5)))
    erase = sample_erase(
        images,
        grid_size=4,
        mode="block",
        fill="mean",
        generator=FakeDeviceGenerator(),
        host_generator=seeded(5),
    )
    assert torch.equal(erase.keep_mask[:, 0, ::4, ::4], beit_block_mask(4, 4, generator=seeded(5)))
    for sample, kwargs in ((sample_mixmask, {}), (sample_erase, {"mode": "block"})):
        with pytest.raises(ValueError, match="block_generator"):
            sample(images, grid_size=4, generator=seeded(), block_generator="bernoulli", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_beit_masks_with_cuda_images_and_generators():
    images = torch.randn(4, 3, 16, 16, generator=seeded()).cuda()
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        beit_block_mask(1, 8, generator=cuda_generator)
    with pytest.raises(ValueError, match="host_generator"):
        sample_mixmask(images, grid_size=4, generator=cuda_generator)
    mix = sample_mixmask(
        images, grid_size=4, per_sample=True, generator=cuda_generator, host_generator=seeded(6)
    )
    assert mix.keep_mask.device == images.device
    assert torch.equal(mix.keep_mask.cpu(), beit_block_mask(4, 4, generator=seeded(6)))
    expected = mix_images(images.cpu(), mix.keep_mask.cpu(), reversed_partner(4, "cpu"))
    assert torch.equal(mix.mixed_images.cpu(), expected)


@pytest.mark.parametrize("per_sample", [False, True])
def test_sample_mixmask_with_beit_masks(per_sample):
    batch = 6
    images = torch.randn(batch, 3, 32, 32, generator=seeded())
    generator = seeded(7)
    mix = sample_mixmask(images, grid_size=8, per_sample=per_sample, generator=generator)
    # The default block generator is BEiT's, drawn from the (CPU) generator.
    num_masks = batch if per_sample else 1
    assert torch.equal(mix.keep_mask, beit_block_mask(num_masks, 8, generator=seeded(7)))
    assert mix.keep_mask.shape == (num_masks, 8, 8)
    assert torch.equal(mix.lam, mix.keep_mask.mean(dim=(1, 2)).expand(batch))
    assert (mix.lam <= 0.5).all()
    for i in range(batch):
        pixel_keep = torch.kron(mix.keep_mask[i if per_sample else 0], torch.ones(4, 4))
        expected = pixel_keep * images[i] + (1 - pixel_keep) * images[batch - 1 - i]
        assert torch.equal(mix.mixed_images[i], expected)
        share = (mix.mixed_images[i] == images[i]).float().mean()
        assert share.item() == mix.lam[i].item()
    # A host generator takes the mask's draws, leaving `generator` untouched.
    untouched = seeded(8)
    hosted = sample_mixmask(images, grid_size=8, generator=untouched, host_generator=seeded(7))
    assert torch.equal(hosted.keep_mask, beit_block_mask(1, 8, generator=seeded(7)))
    assert torch.equal(untouched.get_state(), seeded(8).get_state())


def test_exact_count_block_generator_reproduces_the_old_draws():
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    mix = sample_mixmask(
        images, grid_size=4, per_sample=True, generator=seeded(9), block_generator="exact_count"
    )
    assert torch.equal(mix.keep_mask, block_mask(4, 4, generator=seeded(9)))
    erase = sample_erase(
        images, grid_size=4, mode="block", generator=seeded(9), block_generator="exact_count"
    )
    assert torch.equal(erase.keep_mask[:, 0, ::4, ::4], block_mask(4, 4, generator=seeded(9)))
