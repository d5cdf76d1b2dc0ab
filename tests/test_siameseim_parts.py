"""Tests for SiameseIM's parts: mixmask.ops.relative_position, mixmask.ops.losses.unigrad
and the fixed-count BEiT masks of mixmask.ops.grid_masks, each against an independent (hand
or reference-formula) calculation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import seeded

from mixmask.models.vit import sincos_2d_position_embedding
from mixmask.ops.grid_masks import beit_block_mask
from mixmask.ops.losses.unigrad import unigrad_loss
from mixmask.ops.relative_position import (
    crop_geometry_reference,
    relative_position_embedding,
    view2_patch_centres_in_view1,
)


def crops(*boxes: tuple[int, int, int, int]) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.int64)


def flags(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def grid_rows_and_columns(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r and column c of every patch in row-major order, [g * g] each."""
    index = torch.arange(grid * grid)
    return index // grid, index % grid


# --- relative positions --------------------------------------------------------------------


def test_identical_crops_give_the_integer_grid_and_the_absolute_embedding():
    grid, dim = 4, 16
    box = crops((3, 5, 20, 24), (0, 0, 32, 32))
    no_flip = flags(False, False)
    centres = view2_patch_centres_in_view1(box, no_flip, box, no_flip, grid)
    rows, cols = grid_rows_and_columns(grid)
    assert centres.shape == (2, 16, 2) and centres.dtype == torch.float32
    for sample in range(2):
        assert torch.allclose(centres[sample, :, 0], cols.float(), atol=1e-6)  # x = column
        assert torch.allclose(centres[sample, :, 1], rows.float(), atol=1e-6)  # y = row

    embedding = relative_position_embedding(box, no_flip, box, no_flip, grid, dim)
    assert embedding.shape == (2, 16, 32) and embedding.dtype == torch.float32
    absolute = sincos_2d_position_embedding(grid, grid, dim, cls_token=False)
    for sample in range(2):
        assert torch.allclose(embedding[sample, :, :dim], absolute, atol=1e-6)
    # Equal sizes: ln 1 = 0 in both halves, sin 0 = 0 for the first dim/4, cos 0 = 1 next.
    scale_of_zero = torch.tensor(([0.0] * 4 + [1.0] * 4) * 2)
    assert torch.equal(embedding[:, :, dim:], scale_of_zero.expand(2, 16, dim))


def test_one_flipped_view_mirrors_the_columns_and_two_flipped_views_do_not():
    grid = 4
    full = crops((0, 0, 32, 32))
    rows, cols = grid_rows_and_columns(grid)
    cases = [((True, False), grid - 1 - cols), ((False, True), grid - 1 - cols),
             ((True, True), cols), ((False, False), cols)]
    for (flip1, flip2), expected_x in cases:
        centres = view2_patch_centres_in_view1(full, flags(flip1), full, flags(flip2), grid)
        assert torch.allclose(centres[0, :, 0], expected_x.float(), atol=1e-6), (flip1, flip2)
        assert torch.allclose(centres[0, :, 1], rows.float(), atol=1e-6), (flip1, flip2)
    # So the mirrored query of patch (r, c) carries the absolute embedding of (r, g-1-c).
    embedding = relative_position_embedding(full, flags(True), full, flags(False), grid, 8)
    absolute = sincos_2d_position_embedding(grid, grid, 8, cls_token=False)
    mirrored = (rows * grid + (grid - 1 - cols)).tolist()
    assert torch.allclose(embedding[0, :, :8], absolute[mirrored], atol=1e-6)


def test_hand_computed_centres_of_a_zoomed_in_crop():
    # View 1 = the whole 32 x 32 image (8 px per patch at g = 4); view 2 = its 16 x 16 square at
    # top 8, left 16 (4 px per patch). View-2 patch centres in its crop: 2, 6, 10, 14 px; in
    # the source: rows 10, 14, 18, 22 and columns 18, 22, 26, 30. In view-1 patches
    # (source / 8 - 1/2): rows 0.75, 1.25, 1.75, 2.25; columns 1.75, 2.25, 2.75, 3.25.
    view1, view2 = crops((0, 0, 32, 32)), crops((8, 16, 16, 16))
    expected_rows = [0.75, 1.25, 1.75, 2.25]
    # Flipped view 2: output column c shows crop column 16 - (2, 6, 10, 14) = 14, 10, 6, 2,
    # source 30, 26, 22, 18. Flipped view 1 (view 2 not): x = (32 - source) / 8 - 1/2 for
    # source 18, 22, 26, 30: 1.25, 0.75, 0.25, -0.25. Both flipped: source 30, 26, 22, 18,
    # x = (32 - source) / 8 - 1/2 = -0.25, 0.25, 0.75, 1.25: not mirrored (x grows with c),
    # but not the unflipped columns either, since flipped view 1 shows the source's right
    # half, where view 2 lies, on its left.
    expected_columns = {
        (False, False): [1.75, 2.25, 2.75, 3.25],
        (False, True): [3.25, 2.75, 2.25, 1.75],
        (True, False): [1.25, 0.75, 0.25, -0.25],
        (True, True): [-0.25, 0.25, 0.75, 1.25],
    }
    for (flip1, flip2), columns in expected_columns.items():
        centres = view2_patch_centres_in_view1(view1, flags(flip1), view2, flags(flip2), 4)
        expected = torch.tensor([[x, y] for y in expected_rows for x in columns])
        assert torch.allclose(centres[0], expected, atol=1e-6), (flip1, flip2)


def test_hand_computed_centres_and_embedding_of_a_non_square_pair():
    # View 1: top 4, left 8, 16 x 32 (h x w), so at g = 2 its patches are 8 px tall and 16 px
    # wide. View 2: top 8, left 16, 8 x 8, patches 4 x 4 px, centres at 2 and 6 px in the
    # crop: source rows 10, 14 and columns 18, 22. In view 1: y = (row - 4) / 8 - 1/2 = 0.25,
    # 0.75; x = (column - 8) / 16 - 1/2 = 0.125, 0.375. Scales h2/h1 = 1/2, w2/w1 = 1/4.
    view1, view2, no_flip = crops((4, 8, 16, 32)), crops((8, 16, 8, 8)), flags(False)
    centres = view2_patch_centres_in_view1(view1, no_flip, view2, no_flip, 2)
    expected = torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.125, 0.75], [0.375, 0.75]])
    assert torch.allclose(centres[0], expected, atol=1e-6)

    dim = 8  # two frequencies per quarter: 1 and 10000^(-1/2) = 0.01
    embedding = relative_position_embedding(view1, no_flip, view2, no_flip, 2, dim)[0]

    def sincos(value: float) -> list[float]:
        return [math.sin(value), math.sin(value * 0.01), math.cos(value), math.cos(value * 0.01)]

    for patch, (x, y) in enumerate(expected.tolist()):
        position = sincos(x) + sincos(y)  # column half first, as the absolute embedding
        scale = sincos(10 * math.log(0.25)) + sincos(10 * math.log(0.5))  # w ratio first
        assert torch.allclose(embedding[patch], torch.tensor(position + scale), atol=1e-6)


def reference_centres(
    geometry: tuple[float, float, float, float, bool, float], grid: int
) -> list[tuple[float, float]]:
    """SiameseIM's formula (util/pos_embed.py: get_2d_sincos_pos_embed_relative), per patch
    in row-major order, as (x, y)."""
    delta_i, delta_j, scale_h, scale_w, relative_flip, delta_j_flip = geometry
    centres = []
    for row in range(grid):
        for col in range(grid):
            y = delta_i * grid + scale_h * (row + 0.5) - 0.5
            if relative_flip:
                x = delta_j_flip * grid - scale_w * (col + 0.5) - 0.5
            else:
                x = delta_j * grid + scale_w * (col + 0.5) - 0.5
            centres.append((x, y))
    return centres


def random_box(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
    crop_h, crop_w = rng.randint(4, height), rng.randint(4, width)
    return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w


def test_centres_match_the_reference_formula_on_random_crops_and_every_flip_pair():
    rng = random.Random(0)
    grid = 5
    for flip1 in (False, True):
        for flip2 in (False, True):
            for _ in range(25):
                height, width = rng.randint(16, 64), rng.randint(16, 64)
                (i1, j1, h1, w1), (i2, j2, h2, w2) = (random_box(rng, height, width),
                                                      random_box(rng, height, width))
                # The reference flips the image first and measures j in the flipped image.
                j1_ref = width - j1 - w1 if flip1 else j1
                j2_ref = width - j2 - w2 if flip2 else j2
                geometry = ((i2 - i1) / h1, (j2_ref - j1_ref) / w1, h2 / h1, w2 / w1,
                            flip1 != flip2, (width - j1_ref - j2_ref) / w1)
                expected = torch.tensor(reference_centres(geometry, grid))
                ours = view2_patch_centres_in_view1(
                    crops((i1, j1, h1, w1)), flags(flip1), crops((i2, j2, h2, w2)),
                    flags(flip2), grid)
                assert torch.allclose(ours[0], expected, atol=1e-4), (flip1, flip2)


def test_a_batch_is_computed_per_sample():
    view1 = crops((0, 0, 32, 32), (4, 8, 16, 32))
    view2 = crops((8, 16, 16, 16), (8, 16, 8, 8))
    flips1, flips2 = flags(False, False), flags(True, False)
    both = view2_patch_centres_in_view1(view1, flips1, view2, flips2, 2)
    for sample in range(2):
        alone = view2_patch_centres_in_view1(
            view1[sample:sample + 1], flips1[sample:sample + 1], view2[sample:sample + 1],
            flips2[sample:sample + 1], 2)
        assert torch.equal(both[sample], alone[0])


def test_crop_geometry_reference_by_hand():
    # W = 40. View 1 (top 2, left 4, 20 x 16) flipped: in the flipped image its left edge is
    # 40 - 4 - 16 = 20. View 2 (top 6, left 10, 10 x 8) unflipped: j = 10.
    # di = (6 - 2) / 20 = 0.2, dj = (10 - 20) / 16 = -0.625, sh = 10 / 20 = 0.5,
    # sw = 8 / 16 = 0.5, relative flip, dj_flip = (40 - 20 - 10) / 16 = 0.625.
    geometry = crop_geometry_reference(crops((2, 4, 20, 16)), flags(True),
                                       crops((6, 10, 10, 8)), flags(False), torch.tensor([40]))
    assert geometry.delta_i.tolist() == [0.2]
    assert geometry.delta_j.tolist() == [-0.625]
    assert geometry.scale_h.tolist() == [0.5] and geometry.scale_w.tolist() == [0.5]
    assert geometry.relative_flip.tolist() == [True]
    assert geometry.delta_j_flip.tolist() == [0.625]


def test_relative_position_rejects_bad_shapes():
    box, flip = crops((0, 0, 8, 8)), flags(False)
    with pytest.raises(ValueError, match="boxes1"):
        view2_patch_centres_in_view1(box[0], flip, box, flip, 2)
    with pytest.raises(ValueError, match="same batch"):
        view2_patch_centres_in_view1(box, flip, crops((0, 0, 8, 8), (0, 0, 4, 4)), flip, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        relative_position_embedding(box, flip, box, flip, 2, 6)


# --- UniGrad loss --------------------------------------------------------------------------

# N = 2 tokens, D = 2. Targets (3, 1) and (0, 4) layer-normalise to (1, -1) and (-1, 1) (up to
# eps: a factor 1 / sqrt(1 + 1e-5 / var), var = 1 and 4). C = ((1, -1), (-1, 1)), so
# p^T C p = (p_x - p_y)^2. Predictions (1, 0) and (0, 2):
#   P = (||(0, 1)||^2 + ||(1, 1)||^2) / 2 = 1.5,   Q = (1 + 4) / 2 = 2.5,
#   loss = (1.5 + 0.02 * 2.5) / 2 = 0.775.
HAND_PREDICTION = [[1.0, 0.0], [0.0, 2.0]]
HAND_TARGET = [[3.0, 1.0], [0.0, 4.0]]


def test_unigrad_loss_by_hand():
    prediction, target = torch.tensor(HAND_PREDICTION), torch.tensor(HAND_TARGET)
    assert unigrad_loss(prediction, target).item() == pytest.approx(0.775, abs=1e-4)
    assert unigrad_loss(prediction, target, negative_weight=1.0).item() == pytest.approx(
        (1.5 + 2.5) / 2, abs=1e-4)
    # [B, T, D] is the same tokens.
    batched = unigrad_loss(prediction.view(1, 2, 2), target.view(1, 2, 2))
    assert batched.item() == pytest.approx(0.775, abs=1e-4)


def test_unigrad_gradient_by_hand_and_none_for_the_target():
    # d loss / d p_n = (2 / (N D)) ((p_n - t_n) + 0.02 C p_n) = (1/2) (...):
    #   p1: (0, 1) + 0.02 (1, -1) -> (0.01, 0.49);  p2: (1, 1) + 0.02 (-2, 2) -> (0.48, 0.52).
    prediction = torch.tensor(HAND_PREDICTION, requires_grad=True)
    target = torch.tensor(HAND_TARGET, requires_grad=True)
    unigrad_loss(prediction, target).backward()
    assert torch.allclose(prediction.grad, torch.tensor([[0.01, 0.49], [0.48, 0.52]]), atol=1e-4)
    assert target.grad is None


def test_unigrad_all_reduce_is_called_once_on_the_correlation():
    calls = []

    def doubling_all_reduce(correlation: torch.Tensor) -> torch.Tensor:
        calls.append(correlation.clone())
        return 2 * correlation

    loss = unigrad_loss(torch.tensor(HAND_PREDICTION), torch.tensor(HAND_TARGET),
                        all_reduce=doubling_all_reduce)
    assert len(calls) == 1
    assert torch.allclose(calls[0], torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-4)
    # C doubled: Q = 5, loss = (1.5 + 0.02 * 5) / 2 = 0.8.
    assert loss.item() == pytest.approx(0.8, abs=1e-4)


def test_unigrad_runs_in_float32_under_bfloat16_autocast():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(64, 48, generator=generator)
    target = torch.randn(64, 48, generator=generator)
    plain = unigrad_loss(prediction, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = unigrad_loss(prediction, target)
        from_bf16 = unigrad_loss(prediction.bfloat16(), target.bfloat16())
    assert autocast.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert torch.equal(autocast, plain)  # a bf16 matmul inside would not reproduce it
    exact_bf16_inputs = unigrad_loss(prediction.bfloat16().float(), target.bfloat16().float())
    assert torch.equal(from_bf16, exact_bf16_inputs)


def test_unigrad_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        unigrad_loss(torch.zeros(2, 4), torch.zeros(2, 3))


# --- fixed-count BEiT block masks ----------------------------------------------------------



@pytest.mark.parametrize(("grid", "masked", "min_block", "num_masks"),
                         [(8, 38, 4, 2000), (14, 118, 16, 300)])
def test_fill_to_target_gives_every_mask_exactly_the_count(grid, masked, min_block, num_masks):
    # SiameseIM's settings: 118 of 14 x 14 with blocks of >= 16 patches (the released
    # script), and the small-scale 38 of 8 x 8 with blocks of >= 4. BEiT's blocks are the
    # 1s, so k masked patches are mask_ratio = 1 - k / g^2.
    ratio = 1 - masked / grid**2
    plain = beit_block_mask(num_masks, grid, ratio, generator=seeded(1),
                            min_block_cells=min_block)
    filled = beit_block_mask(num_masks, grid, ratio, generator=seeded(1),
                             min_block_cells=min_block, fill_to_target=True)
    plain_counts = plain.sum(dim=(1, 2))
    assert (plain_counts <= masked).all()
    assert (plain_counts < masked).any()  # BEiT's loop alone falls short for some masks
    assert (filled.sum(dim=(1, 2)) == masked).all()
    # The top-up only adds cells: the loop's blocks are the same draws.
    assert (plain <= filled).all()
    complete = plain_counts == masked
    assert torch.equal(plain[complete], filled[complete])


def test_fill_to_target_counts_for_every_ratio_on_8x8():
    for masked in range(1, 64):
        filled = beit_block_mask(4, 8, 1 - masked / 64, generator=seeded(masked),
                                 min_block_cells=4, fill_to_target=True)
        assert filled.sum(dim=(1, 2)).tolist() == [masked] * 4, masked


def test_fill_to_target_default_is_the_plain_mask_and_draws_a_fixed_amount():
    default, explicit = seeded(5), seeded(5)
    assert torch.equal(beit_block_mask(50, 8, 0.5, generator=default),
                       beit_block_mask(50, 8, 0.5, generator=explicit, fill_to_target=False))
    assert torch.equal(default.get_state(), explicit.get_state())
    # With the top-up: the loop's one float64 draw [n, T * 10, 4] (T = 32), then one
    # rand [n, g * g], whatever the masks look like.
    filled, twin = seeded(6), seeded(6)
    beit_block_mask(50, 8, 0.5, generator=filled, fill_to_target=True)
    torch.rand(50, 320, 4, dtype=torch.float64, generator=twin)
    torch.rand(50, 64, generator=twin)
    assert torch.equal(filled.get_state(), twin.get_state())
