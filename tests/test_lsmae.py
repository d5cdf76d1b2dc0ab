"""Long-sequence MAE (arXiv 2210.07224): the mask unit decoupled from the patch, checked
against independent calculations; its recipes pretrain and draw their pictures."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, seeded
from PIL import Image

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.datasets import load_image_set
from mixmask.methods import PixelStats, build_method
from mixmask.ops.token_masks import mae_random_masking, num_kept

CIFAR10 = ROOT / "configs" / "cifar10"


@pytest.mark.parametrize("side, unit, ratio", [(16, 2, 0.75), (16, 4, 0.6), (8, 2, 0.5),
                                               (28, 2, 0.75)])
def test_every_mask_is_a_union_of_whole_units_and_the_kept_count_is_exact(side, unit, ratio):
    keep, mask, restore = mae_random_masking(6, side * side, ratio, seeded(1), mask_unit=unit)
    units = (side // unit) ** 2
    kept = int(units * (1 - ratio)) * unit * unit  # MAE's truncation, per unit
    assert keep.shape == (6, kept)
    assert (mask == 0).sum(dim=1).tolist() == [kept] * 6
    # Each k x k block is all kept or all masked.
    blocks = mask.view(6, side // unit, unit, side // unit, unit).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(6, units, unit * unit)
    assert ((blocks == 0).all(dim=2) | (blocks == 1).all(dim=2)).all()
    # keep holds exactly the unmasked patches; restore undoes the shuffle.
    assert torch.equal(mask.gather(1, keep), torch.zeros_like(keep, dtype=mask.dtype))
    order = torch.cat([keep, torch.argsort(mask, dim=1, stable=True)[:, kept:]], dim=1)
    assert torch.equal(order.gather(1, restore).sort(dim=1).values,
                       torch.arange(side * side).expand(6, -1))


def test_the_draws_differ_between_samples_and_are_not_always_the_same_units():
    _, mask, _ = mae_random_masking(64, 256, 0.75, seeded(2), mask_unit=2)
    assert len({tuple(row.tolist()) for row in mask}) == 64
    # Every unit position is masked in some samples and kept in others.
    per_unit = mask.view(64, 8, 2, 8, 2)[:, :, 0, :, 0].mean(dim=0)
    assert ((per_unit > 0) & (per_unit < 1)).all()


def test_a_unit_of_one_patch_is_maes_own_random_masking():
    # MAE's random_masking, written out: argsort of uniform noise, the first K kept.
    generator = seeded(3)
    noise = torch.rand(4, 64, generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    keep, mask, restore = mae_random_masking(4, 64, 0.75, seeded(3))
    assert torch.equal(keep, shuffle[:, :num_kept(64, 0.75)])
    assert torch.equal(restore, torch.argsort(shuffle, dim=1))
    assert mask.sum().item() == 4 * 48


def test_a_unit_that_does_not_divide_the_grid_is_refused():
    with pytest.raises(ValueError, match="mask_unit"):
        mae_random_masking(2, 64, 0.75, seeded(), mask_unit=3)


@pytest.mark.parametrize("recipe", ["lsmae_vit_tiny", "pixmim_lsmae_vit_tiny"])
def test_a_step_of_each_recipe_masks_whole_units_of_the_256_token_sequence(recipe):
    config = load_config(CIFAR10 / f"{recipe}.yaml", ["data.dataset=synthetic"])
    images = load_image_set("synthetic", "", "train", subset=8)
    torch.manual_seed(0)
    method = build_method(config, PixelStats(tuple(images.mean), tuple(images.std)))
    assert method.grid == 16 and method.params.mask_unit == 2
    loader = build_train_loader(images, EpochBatchSampler(8, 8, seed=0), method.view_configs(),
                                pipeline="cpu", device=torch.device("cpu"), seed=0)
    batch = next(iter(loader))
    output = method.training_step(batch, seeded(), 0.0)
    assert torch.isfinite(output.loss)
    views = method.masked_views(batch.views[0], seeded())
    # 4x4 px mask units at 32 px: the pixel mask is constant on each 4x4 cell.
    cells = views.mask[:, 0].view(8, 8, 4, 8, 4)
    assert (cells.all(dim=(2, 4)) | (~cells).all(dim=(2, 4))).all()
    assert views.mask[:, 0].float().mean().item() == pytest.approx(0.75)


def test_lsmae_pretrains_and_draws_its_pictures(tmp_path):
    run = tmp_path / "run"
    tiny = ["data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
            "data.eval_test_subset=16", "data.num_workers=0", "train.batch_size=16",
            "train.epochs=1", "train.progress_bar=false", "train.plots=curves",
            "method.mae.decoder_depth=1", "eval.linear=false", "monitor.knn=false",
            "eval.compare_random_init=false"]
    assert main(["pretrain", str(CIFAR10 / "pixmim_lsmae_vit_tiny.yaml"), *tiny,
                 f"out_dir={run}"]) == 0
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert main(["show-masks", str(CIFAR10 / "lsmae_vit_tiny.yaml"), "data.dataset=synthetic",
                 "--out", str(tmp_path / "m.png")]) == 0
    for name in ("r.png", "m.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
