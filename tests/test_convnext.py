"""ConvNeXt (timm) as a backbone: the A2MIM mask token at the right stage, every Siamese
base and masking value, real CIFAR-10 steps, the evaluation commands and the timm export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import ROOT
from torch import nn

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.datasets import load_image_set
from mixmask.errors import ConfigError
from mixmask.methods import PixelStats, build_method
from mixmask.models.backbones import backbone_traits, build_backbone
from mixmask.models.convnext import build_convnext
from mixmask.runs.export import export_backbone

CIFAR10 = ROOT / "configs" / "cifar10"
BASES = ["mocov2", "byol", "simsiam", "barlow_twins", "vicreg"]
MASKINGS = ["none", "erase", "mixmask", "unmix", "both"]


def _batch(method, count: int = 8, dataset: str = "synthetic", root: str = ""):
    images = load_image_set(dataset, root, "train", subset=count)
    loader = build_train_loader(images, EpochBatchSampler(len(images), count, seed=0),
                                method.view_configs(), pipeline="cpu",
                                device=torch.device("cpu"), seed=0)
    return next(iter(loader)), images


def _method(recipe: str, *overrides: str):
    config = load_config(CIFAR10 / f"{recipe}.yaml", ["data.dataset=synthetic", *overrides])
    images = load_image_set("synthetic", "", "train", subset=8)
    torch.manual_seed(0)
    return build_method(config, PixelStats(tuple(images.mean), tuple(images.std)))


def test_the_cifar_stem_keeps_a_4x4_last_map_and_the_geometry_matches_the_traits():
    for stem, side, strides in (("cifar", 32, (1, 2, 4, 8)), ("imagenet", 224, (4, 8, 16, 32))):
        model, dim = build_convnext("convnext_atto", stem=stem)
        images = torch.randn(2, 3, side, side)
        assert model(images).shape == (2, dim) == (2, 320)
        assert model.feature_map(images).shape == (2, 320, side // strides[-1], side // strides[-1])
        assert model.stage_geometry() == (list(strides), strides[-1], [40, 80, 160, 320])
        assert backbone_traits("convnext_atto").stage_strides(stem) == (strides, strides[-1])


def test_a_width_other_than_1_is_refused_before_anything_is_built():
    with pytest.raises(ConfigError, match="widths are its own"):
        load_config(CIFAR10 / "mixmask_mocov2_convnext.yaml", ["model.width=0.5"])


def test_a2mims_mask_token_touches_only_masked_positions_before_the_last_stage():
    method = _method("a2mim_convnext")
    seen = {}
    original = method.backbone.forward_stages

    def spy(images, stage=-1, edit=None):
        def recording(features):
            out = edit(features)
            seen.update(stage=stage, before=features.detach(), after=out.detach())
            return out
        return original(images, stage, recording)

    method.backbone.forward_stages = spy
    images = torch.randn(4, 3, 32, 32)
    mask = method.sample_mask(images, torch.Generator().manual_seed(0))
    method.encode(images, mask)
    before, after = seen["before"], seen["after"]
    # Stage 3 of ConvNeXt-Atto with the CIFAR stem: after its downsampling, 320 channels
    # on the 4x4 map at stride 8, the grid the mask is drawn on.
    assert seen["stage"] == 3 and before.shape == (4, 320, 4, 4) and mask.shape == (4, 4, 4)
    assert 0 < mask.float().mean() < 1
    masked = mask[:, None].expand_as(before)
    assert torch.equal(after[~masked], before[~masked])
    # By hand: x * gamma + token at the masked positions (gamma 1e-6, A2MIM's mask_init).
    gamma = method.mask_gamma.detach().expand_as(before)
    token = method.mask_token.detach().expand_as(before)
    expected = before * gamma + token
    torch.testing.assert_close(after[masked], expected[masked])


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("base", BASES)
def test_every_siamese_base_and_masking_value_trains_on_convnext(base, masking):
    method = _method("mixmask_mocov2_convnext", f"method.name={base}",
                     f"method.masking={masking}")
    batch, _ = _batch(method)
    output = method.training_step(batch, torch.Generator().manual_seed(0), 0.0)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert [name for name, parameter in method.named_parameters()
            if parameter.requires_grad and parameter.grad is None] == []


def test_mixmask_on_convnext_learns_on_real_cifar_batches(cifar10_tarball):
    config = load_config(CIFAR10 / "mixmask_mocov2_convnext.yaml",
                         ["data.dataset=imagefolder", f"data.root={cifar10_tarball}",
                          "method.mocov2.queue_size=256", "train.batch_size=32"])
    images = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=64)
    torch.manual_seed(0)
    method = build_method(config, PixelStats(tuple(images.mean), tuple(images.std)))
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    loader = build_train_loader(images, EpochBatchSampler(len(images), 32, seed=0),
                                method.view_configs(), pipeline="cpu",
                                device=torch.device("cpu"), seed=0)
    start = {name: value.clone() for name, value in method.backbone.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for step, batch in enumerate(loader):
        output = method.training_step(batch, generator, step / 2)
        assert torch.isfinite(output.loss) and "loss_mixmask" in output.logs
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        assert [name for name, parameter in method.named_parameters()
                if parameter.requires_grad and parameter.grad is None] == []
        optimizer.step()
        method.after_optimizer_step(output, step / 2)
    changed = [name for name, value in method.backbone.state_dict().items()
               if not torch.equal(value, start[name])]
    assert len(changed) == len(start)  # every backbone tensor moved


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_the_timm_export_loads_strictly_into_timm(tmp_path, stem):
    config = SimpleNamespace(backbone="convnext_atto", stem=stem, width=1.0)
    torch.manual_seed(0)
    backbone, _ = build_backbone(config)
    result = export_backbone(backbone.state_dict(), config, "timm", tmp_path / "atto.pth")
    reference = timm.create_model("convnext_atto", num_classes=0)
    if stem == "cifar":  # the replacement the notes give
        assert "m.stem[0] = nn.Conv2d(3, 40, 3, 1, 1)" in " ".join(result["notes"])
        reference.stem[0] = nn.Conv2d(3, 40, 3, 1, 1)
    reference.load_state_dict(torch.load(tmp_path / "atto.pth", weights_only=True), strict=True)
    images = torch.randn(2, 3, 32, 32)
    backbone.eval(), reference.eval()
    torch.testing.assert_close(reference(images), backbone(images), rtol=0, atol=0)


def test_convnext_pretrains_and_every_evaluation_command_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["data.dataset=synthetic", "data.subset=64", "data.eval_train_subset=64",
            "data.eval_test_subset=32", "data.num_workers=0", "train.batch_size=16",
            "train.epochs=1", "train.progress_bar=false", "train.plots=curves",
            "method.mocov2.queue_size=64", "monitor.knn=false", "eval.linear=false",
            "eval.compare_random_init=false", "eval.linear_epochs=2",
            "eval.finetune_epochs=1", "eval.finetune_batch_size=16", f"out_dir={run}"]
    assert main(["pretrain", str(CIFAR10 / "mixmask_mocov2_convnext.yaml"), *tiny]) == 0
    assert json.loads((run / "summary.json").read_text())["backbone"] == "convnext_atto"
    assert main(["knn", str(run)]) == 0
    assert main(["linear", str(run), "--protocol", "cached"]) == 0
    assert main(["finetune", str(run), "--labels", "100%"]) == 0
    for protocol in ("knn", "linear_cached", "finetune_100pct"):
        result = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert result["backbone"] == "convnext_atto" and 0 <= result["top1"] <= 100
    assert main(["export", str(run), "--format", "timm", "--out", str(tmp_path / "x.pth")]) == 0
    assert main(["export", str(run), "--format", "torchvision", "--out",
                 str(tmp_path / "y.pth")]) == 2
    assert "convnext_atto" in capsys.readouterr().err


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_the_torchvision_export_of_convnext_tiny_loads_strictly_and_computes_the_same(
        tmp_path, stem):
    import torchvision

    config = SimpleNamespace(backbone="convnext_tiny", stem=stem, width=1.0)
    torch.manual_seed(0)
    backbone, _ = build_backbone(config)
    result = export_backbone(backbone.state_dict(), config, "torchvision", tmp_path / "t.pth")
    reference = torchvision.models.convnext_tiny()
    reference.classifier[2] = nn.Identity()  # as the notes say
    if stem == "cifar":
        assert "m.features[0][0] = nn.Conv2d(3, 96, 3, 1, 1)" in result["notes"][-1]
        reference.features[0][0] = nn.Conv2d(3, 96, 3, 1, 1)
    reference.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)
    images = torch.randn(2, 3, 64, 64)
    backbone.eval(), reference.eval()
    torch.testing.assert_close(reference(images), backbone(images))
