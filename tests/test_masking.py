"""Tests for mixmask.masking, each against an independent calculation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixmask.masking import (
    MixMaskBatch,
    block_mask,
    discrete_mask,
    mix_images,
    mix_ratio,
    reversed_partner,
    sample_mixmask,
    switched_lambda,
    upsample_mask,
)


class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that read a tensor value back to the host, which would stall a CUDA
    step: .item()/bool()/int() (aten::_local_scalar_dense), nonzero, masked_select and
    indexing with a boolean mask (its output size depends on the data)."""

    def __init__(self):
        super().__init__()
        self.syncing_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        indices = args[1] if name.startswith(("aten::index", "aten::_index_put")) else ()
        bool_index = any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices
        )
        if bool_index or name in {
            "aten::_local_scalar_dense",
            "aten::nonzero",
            "aten::masked_select",
            "aten::repeat_interleave.Tensor",
        }:
            self.syncing_ops.append(name)
        return func(*args, **(kwargs or {}))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
    images = torch.randn(6, 3, 32, 32, generator=seeded())
    mix = sample_mixmask(
        images, grid_size=8, mask_ratio=0.5, mode=mode, per_sample=False, generator=seeded(1)
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


@pytest.mark.parametrize("mode", ["block", "discrete"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_sampling_and_mixing_never_read_values_back_to_the_host(mode, per_sample):
    images = torch.randn(4, 3, 16, 16, generator=seeded())
    with HostSyncRecorder() as recorder:
        mix = sample_mixmask(
            images, grid_size=4, mode=mode, per_sample=per_sample, generator=seeded(1)
        )
        switched_lambda(mix.lam)
    assert recorder.syncing_ops == []
