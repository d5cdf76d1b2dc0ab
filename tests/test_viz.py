"""Tests for mixmask.pictures.masks: the gallery's layout and pixels, against independent
calculations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import seeded
from PIL import Image

from mixmask.config import load_config
from mixmask.methods.siamese.masking_axis import MaskingAxisConfig
from mixmask.pictures.masks import (
    GALLERY_PADDING,
    GALLERY_ROWS,
    LABEL_WIDTH,
    mask_gallery,
    save_mask_gallery,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
COUNT, SIZE = 8, 32



def normalised_views() -> torch.Tensor:
    """Raw pixels in [0, 1] (so the display clipping never acts), then normalised."""
    raw = torch.rand(COUNT, 3, SIZE, SIZE, generator=seeded(42))
    return (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def cell(grid, row: int, column: int, size: int = SIZE):
    """The pixels of one cell of a make_grid layout (channel-first tensor or HWC array)."""
    top = GALLERY_PADDING + row * (size + GALLERY_PADDING)
    left = GALLERY_PADDING + column * (size + GALLERY_PADDING)
    if isinstance(grid, torch.Tensor):
        return grid[:, top : top + size, left : left + size]
    return grid[top : top + size, left : left + size]


def method_config(**mask) -> MaskingAxisConfig:
    config = MaskingAxisConfig()
    for key, value in mask.items():
        setattr(config.mask, key, value)
    return config


def gallery(config=None, seed: int = 0) -> torch.Tensor:
    return mask_gallery(
        normalised_views(),
        pixel_mean=MEAN,
        pixel_std=STD,
        method_config=config or method_config(),
        generator=seeded(seed),
    )


def test_gallery_layout_and_original_row():
    grid = gallery()
    rows = len(GALLERY_ROWS)
    assert grid.shape == (
        3,
        rows * (SIZE + GALLERY_PADDING) + GALLERY_PADDING,
        COUNT * (SIZE + GALLERY_PADDING) + GALLERY_PADDING,
    )
    assert grid.min() >= 0 and grid.max() <= 1
    raw = torch.rand(COUNT, 3, SIZE, SIZE, generator=seeded(42))
    for i in range(COUNT):
        assert torch.allclose(cell(grid, 0, i), raw[i], atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixed_row_is_the_formula_of_the_shown_mask_and_originals(per_sample):
    grid = gallery(method_config(per_sample=per_sample, mode="block", mask_ratio=0.5))
    masks = []
    for i in range(COUNT):
        mask_cell = cell(grid, 1, i)
        assert set(mask_cell.unique().tolist()) <= {0.0, 1.0}
        assert (mask_cell == mask_cell[:1]).all()  # grey: the same in every channel
        keep = mask_cell[:1]
        masks.append(keep)
        assert keep.mean().item() == 0.5  # 32 of the 8 x 8 cells kept
        original, partner = cell(grid, 0, i), cell(grid, 0, COUNT - 1 - i)
        expected = keep * original + (1 - keep) * partner
        assert torch.allclose(cell(grid, 2, i), expected, atol=1e-6)
        # The switched row holds the mix in which image i is the partner.
        assert torch.equal(cell(grid, 3, i), cell(grid, 2, COUNT - 1 - i))
    distinct = len({tuple(mask.flatten().tolist()) for mask in masks})
    assert distinct == (COUNT if per_sample else 1)


def test_erase_and_unmix_rows():
    grid = gallery()
    for i in range(COUNT):
        original, partner = cell(grid, 0, i), cell(grid, 0, COUNT - 1 - i)
        # Erase (defaults: discrete grid, ratio 0.5, noise): half of the pixels replaced.
        changed = (cell(grid, 4, i) != original).any(dim=0).float().mean().item()
        assert 0.45 <= changed <= 0.5
        # Un-Mix: a Mixup with one lambda, or a CutMix box copied from the partner.
        unmixed = cell(grid, 5, i)
        from_partner = (unmixed - partner).abs() < 1e-6
        from_self = (unmixed - original).abs() < 1e-6
        if not (from_partner | from_self).all():
            lam = ((unmixed - partner) * (original - partner)).sum() / (
                (original - partner) ** 2
            ).sum()
            assert torch.allclose(unmixed, lam * original + (1 - lam) * partner, atol=1e-5)


def test_a_method_config_draws_the_gallery_of_its_masking_axis():
    # The run's `method` section (what show-masks and the report pass) and its axis alone
    # give the same gallery; a method without an axis is refused.
    config = load_config(None, ["method.name=byol", "method.mask.mode=discrete"])
    assert torch.equal(gallery(config.method), gallery(config.method.axis))
    assert not torch.equal(gallery(config.method), gallery(method_config()))
    with pytest.raises(ValueError, match="no masking axis"):
        gallery(load_config(None, ["method.name=mae", "model.backbone=vit_tiny"]).method)


def test_gallery_follows_the_erase_and_unmix_config():
    config = method_config()
    config.erase.fill = "zero"
    config.unmix.p_mixup = 1.0
    grid = gallery(config)
    lams = []
    for i in range(COUNT):
        erased = cell(grid, 4, i)
        black = (erased.abs() < 1e-6).all(dim=0).float().mean().item()
        assert black >= 0.5  # at least the erased half is raw black
        # Mixup only: one lambda for the whole row.
        original, partner = cell(grid, 0, i), cell(grid, 0, COUNT - 1 - i)
        unmixed = cell(grid, 5, i)
        lam = ((unmixed - partner) * (original - partner)).sum() / ((original - partner) ** 2).sum()
        assert torch.allclose(unmixed, lam * original + (1 - lam) * partner, atol=1e-5)
        lams.append(lam.item())
    assert max(lams) - min(lams) < 1e-4


def test_gallery_is_deterministic_and_rejects_odd_batches():
    assert torch.equal(gallery(seed=3), gallery(seed=3))
    assert not torch.equal(gallery(seed=3), gallery(seed=4))
    with pytest.raises(ValueError, match="even"):
        mask_gallery(
            normalised_views()[:7],
            pixel_mean=MEAN,
            pixel_std=STD,
            method_config=method_config(),
            generator=seeded(),
        )


def test_saved_png_has_the_expected_size_and_mixed_pixels(tmp_path):
    path = save_mask_gallery(
        normalised_views(),
        tmp_path / "nested" / "gallery.png",
        pixel_mean=MEAN,
        pixel_std=STD,
        method_config=method_config(),
        generator=seeded(0),
    )
    assert path.is_file()
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        width = COUNT * (SIZE + GALLERY_PADDING) + GALLERY_PADDING + LABEL_WIDTH
        height = len(GALLERY_ROWS) * (SIZE + GALLERY_PADDING) + GALLERY_PADDING
        assert picture.size == (width, height)
        pixels = np.asarray(picture).astype(np.int32)
    labels, grid = pixels[:, :LABEL_WIDTH], pixels[:, LABEL_WIDTH:]
    assert (labels < 128).any()  # some label text was drawn
    expected = np.rint(gallery(seed=0).permute(1, 2, 0).numpy() * 255)
    assert np.abs(grid - expected).max() == 0
    # The decoded mixed row is, pixel for pixel, the original or its partner.
    for i in range(COUNT):
        keep = cell(grid, 1, i)[..., :1] == 255
        original, partner = cell(grid, 0, i), cell(grid, 0, COUNT - 1 - i)
        assert np.array_equal(cell(grid, 2, i), np.where(keep, original, partner))


def test_unlabelled_png_is_the_bare_gallery(tmp_path):
    path = save_mask_gallery(
        normalised_views(),
        tmp_path / "bare.png",
        pixel_mean=MEAN,
        pixel_std=STD,
        method_config=method_config(),
        generator=seeded(0),
        labels=False,
    )
    with Image.open(path) as picture:
        assert picture.size == (COUNT * (SIZE + 2) + 2, len(GALLERY_ROWS) * (SIZE + 2) + 2)


def test_show_masks_cli_writes_the_gallery_of_a_config(tmp_path, capsys, cifar10_tarball):
    from mixmask.cli import main

    out = tmp_path / "gallery.png"
    config = "configs/cifar100/byol_both_r18.yaml"
    code = main(["show-masks", config, "data.dataset=cifar10", f"data.root={cifar10_tarball}",
                 "--out", str(out), "--num-images", "6"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as picture:
        width, height = picture.size
    assert width == LABEL_WIDTH + 6 * (SIZE + GALLERY_PADDING) + GALLERY_PADDING
    assert height == len(GALLERY_ROWS) * (SIZE + GALLERY_PADDING) + GALLERY_PADDING


def test_show_masks_cli_rejects_an_odd_count(tmp_path, capsys):
    from mixmask.cli import main

    code = main(["show-masks", "configs/quickstart.yaml", "data.dataset=synthetic",
                 "--out", str(tmp_path / "g.png"), "--num-images", "5"])
    assert code == 2
    assert "even number" in capsys.readouterr().err
