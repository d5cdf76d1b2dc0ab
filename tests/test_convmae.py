"""ConvMAE (arXiv 2205.03892): the hybrid encoder's masked convolution, mask counts and
multi-scale fusion, checked by perturbation and by hand; its recipes pretrain, evaluate
and draw their pictures."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT, seeded
from torch import nn

from mixmask.cli import main
from mixmask.models.convvit import ConvBlock, build_convvit
from mixmask.ops.token_masks import mae_random_masking

CIFAR10 = ROOT / "configs" / "cifar10"


def encoder_and_masking(batch: int = 3):
    torch.manual_seed(0)
    model, _ = build_convvit("convvit_tiny", stem="cifar", image_size=32)
    keep, mask, _ = mae_random_masking(batch, 64, 0.75, seeded(1))
    return model, keep, mask


def masked_pixels(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, 32, 32] bool: the 4x4 px cells of the masked stage-3 tokens."""
    cells = mask.view(-1, 1, 8, 8).bool()
    return cells.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def perturbed(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=seeded(7)) * 5
    return torch.where(masked_pixels(mask), noise, images)


def test_masked_pixels_do_not_reach_the_visible_tokens():
    model, keep, mask = encoder_and_masking()
    images = torch.randn(3, 3, 32, 32, generator=seeded(2))
    with torch.no_grad():
        clean = model.forward_visible(images, keep)
        changed = model.forward_visible(perturbed(images, mask), keep)
    assert clean.shape == (3, 16, 192)
    torch.testing.assert_close(changed, clean, rtol=0, atol=1e-6)


def test_the_leak_test_fails_without_the_masked_convolution(monkeypatch):
    # The same check on a variant whose conv blocks ignore the visible map: masked content
    # spreads through the 5x5 depthwise convolutions into visible tokens.
    forward = ConvBlock.forward
    monkeypatch.setattr(ConvBlock, "forward", lambda self, x, visible=None: forward(self, x))
    model, keep, mask = encoder_and_masking()
    images = torch.randn(3, 3, 32, 32, generator=seeded(2))
    with torch.no_grad():
        clean = model.forward_visible(images, keep)
        changed = model.forward_visible(perturbed(images, mask), keep)
    assert (changed - clean).abs().max() > 1e-2


def test_each_sample_keeps_the_same_count_at_every_stage():
    model, keep, mask = encoder_and_masking(batch=5)
    assert keep.shape == (5, 16) and mask.sum(dim=1).tolist() == [48.0] * 5
    seen = []
    forward = ConvBlock.forward

    def recording(self, features, visible=None):
        seen.append(visible.clone())
        return forward(self, features, visible)

    ConvBlock.forward = recording
    try:
        with torch.no_grad():
            model.forward_visible(torch.randn(5, 3, 32, 32), keep)
    finally:
        ConvBlock.forward = forward
    # Stage 1 at 32x32 (4x4 cells per token), stage 2 at 16x16 (2x2 cells): 16 tokens kept.
    assert [tuple(map.shape) for map in seen] == [(5, 1, 32, 32)] * 2 + [(5, 1, 16, 16)] * 2
    assert seen[0].sum(dim=(1, 2, 3)).tolist() == [16 * 16.0] * 5
    assert seen[2].sum(dim=(1, 2, 3)).tolist() == [16 * 4.0] * 5
    assert torch.equal(seen[0].bool(), ~masked_pixels(mask))


def test_the_fusion_adds_stage_1_and_2_at_exactly_the_visible_tokens():
    model, keep, _ = encoder_and_masking()
    images = torch.randn(3, 3, 32, 32, generator=seeded(3))
    maps, normed = {}, {}
    hooks = [model.stage1_fusion.register_forward_hook(lambda m, i, o: maps.__setitem__(1, o)),
             model.stage2_fusion.register_forward_hook(lambda m, i, o: maps.__setitem__(2, o)),
             model.norm.register_forward_hook(lambda m, i, o: normed.__setitem__("in", i[0]))]
    with torch.no_grad():
        model.forward_visible(images, keep)
        with_fusion, fusion_maps = normed["in"], dict(maps)
        for fusion in (model.stage1_fusion, model.stage2_fusion):
            nn.init.zeros_(fusion.weight), nn.init.zeros_(fusion.bias)
        model.forward_visible(images, keep)
        without = normed["in"]
    for hook in hooks:
        hook.remove()
    # By hand: each fusion map on the 8x8 grid, read at the kept tokens (row-major).
    rows = torch.arange(3)[:, None]
    expected = sum(fusion_maps[stage].flatten(2).transpose(1, 2)[rows, keep]
                   for stage in (1, 2))
    torch.testing.assert_close(with_fusion - without, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stem, side, tokens", [("cifar", 32, 64), ("imagenet", 224, 196)])
def test_the_geometries_give_the_stage_3_grid(stem, side, tokens):
    model, dim = build_convvit("convvit_tiny", stem=stem, image_size=side)
    assert model.forward_tokens(torch.randn(1, 3, side, side)).shape == (1, tokens, dim)
    assert model.patch_size == (4 if stem == "cifar" else 16)


def test_convmae_pretrains_evaluates_and_draws_its_pictures(tmp_path):
    run = tmp_path / "run"
    tiny = ["data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
            "data.eval_test_subset=16", "data.num_workers=0", "train.batch_size=16",
            "train.epochs=1", "train.progress_bar=false", "train.plots=curves",
            "method.mae.decoder_depth=1", "eval.linear=false", "monitor.knn=false",
            "eval.compare_random_init=false", "eval.finetune_epochs=1",
            "eval.finetune_batch_size=16"]
    assert main(["pretrain", str(CIFAR10 / "pixmim_convmae_tiny.yaml"), *tiny,
                 f"out_dir={run}"]) == 0
    assert json.loads((run / "summary.json").read_text())["backbone"] == "convvit_tiny"
    assert main(["knn", str(run)]) == 0
    assert main(["finetune", str(run), "--labels", "100%"]) == 0
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert main(["show-masks", str(CIFAR10 / "convmae_tiny.yaml"), "data.dataset=synthetic",
                 "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "r.png").is_file() and (tmp_path / "m.png").is_file()
