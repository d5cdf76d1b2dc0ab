"""mixmask.runs.export: each format loads strictly into its library's model with equal outputs,
detectron2's names follow its ResNet scheme, refusals are clear, writes are atomic."""

from __future__ import annotations

import dataclasses
import errno
import pickle

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from mixmask.config import ModelConfig, load_config
from mixmask.errors import MixmaskError
from mixmask.methods import build_method
from mixmask.models.backbones import build_backbone
from mixmask.runs.export import ExportError, backbone_state, export_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU forwards: one intra-op thread is ~50x faster than two when the cores are
    shared (thread oversubscription), and the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_looking_backbone(backbone: str, stem: str, seed: int = 0) -> nn.Module:
    """Our backbone with random BN affine and running statistics, so that a wrong or
    missing BN tensor changes the eval-mode output."""
    torch.manual_seed(seed)
    model, _ = build_backbone(ModelConfig(backbone=backbone, stem=stem, width=1.0))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.fixture(scope="module")
def resnet50_imagenet() -> nn.Module:
    return trained_looking_backbone("resnet50", "imagenet")


def images(size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, backbone: str, stem: str, fmt: str, out, **config):
    model_config = ModelConfig(backbone=backbone, stem=stem, **config)
    return export_backbone(backbone_state_of(model), model_config, fmt, out)


def backbone_state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def assert_same_tensors(loaded: dict, original: dict) -> None:
    assert set(loaded) == set(original)
    for key, tensor in original.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


# -- torchvision -----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_imagenet_stem_loads_strictly_into_torchvision_with_equal_outputs(
        backbone, tmp_path, resnet50_imagenet):
    ours = resnet50_imagenet if backbone == "resnet50" else trained_looking_backbone(
        backbone, "imagenet")
    out = tmp_path / f"{backbone}.pt"
    report = export(ours, backbone, "imagenet", "torchvision", out)
    assert report["format"] == "torchvision"
    assert report["target"] == f"torchvision.models.{backbone}()"
    assert report["out"] == str(out) and not (tmp_path / f"{backbone}.pt.partial").exists()

    state = torch.load(out, weights_only=True)
    assert report["tensors"] == len(state)
    assert_same_tensors(state, ours.state_dict())
    theirs = getattr(torchvision.models, backbone)()
    # torchvision's fc is the one key the file lacks (pretraining has no classifier).
    assert set(theirs.state_dict()) - set(state) == {"fc.weight", "fc.bias"}
    theirs.fc = nn.Identity()
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    batch = images()
    with torch.no_grad():
        assert torch.equal(theirs(batch), ours(batch))  # pooled features [B, D]


def test_cifar_stem_loads_into_torchvision_with_the_documented_snippet(tmp_path):
    ours = trained_looking_backbone("resnet18", "cifar")
    out = tmp_path / "r18_cifar.pt"
    report = export(ours, "resnet18", "cifar", "torchvision", out)
    snippet = ("m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); "
               "m.maxpool = nn.Identity(); m.fc = nn.Identity()")
    assert any(snippet in note for note in report["notes"])

    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    m.eval()
    batch = images(size=32)
    with torch.no_grad():
        assert torch.equal(m(batch), ours(batch))


def test_backbone_state_is_the_online_backbone_without_heads_or_ema_copies():
    config = load_config(None, ["method.name=mocov2", "model.backbone=resnet18",
                                "model.width=1.0", "model.stem=cifar"])
    method = build_method(config)
    state = backbone_state(method)
    assert set(state) == set(method.backbone.state_dict())
    for key, tensor in method.backbone.state_dict().items():
        assert state[key] is tensor or torch.equal(state[key], tensor)
    assert not any(key.startswith(("target", "projector", "fc.")) for key in state)
    with torch.no_grad():  # the online network, not the EMA target
        method.backbone.conv1.weight.add_(1.0)
    assert not torch.equal(backbone_state(method)["conv1.weight"],
                           method.target_backbone.state_dict()["conv1.weight"])


# -- timm ------------------------------------------------------------------------------------
def test_imagenet_stem_loads_strictly_into_timm_with_num_classes_0(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    ours = trained_looking_backbone("resnet18", "imagenet")
    out = tmp_path / "r18_timm.pt"
    report = export(ours, "resnet18", "imagenet", "timm", out)
    assert report["target"] == "timm.create_model('resnet18', num_classes=0)"
    theirs = timm.create_model("resnet18", num_classes=0)
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    theirs.eval()
    batch = images()
    with torch.no_grad():
        # timm pools with its own SelectAdaptivePool2d: same mean, maybe another order.
        torch.testing.assert_close(theirs(batch), ours(batch), rtol=1e-5, atol=1e-6)


def test_cifar_stem_loads_into_timm_with_the_snippet(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    ours = trained_looking_backbone("resnet18", "cifar")
    out = tmp_path / "r18_cifar_timm.pt"
    export(ours, "resnet18", "cifar", "timm", out)
    m = timm.create_model("resnet18", num_classes=0)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    m.eval()
    batch = images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(m(batch), ours(batch), rtol=1e-5, atol=1e-6)


# -- detectron2 ------------------------------------------------------------------------------
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def detectron2_r50_names() -> set[str]:
    """detectron2's ResNet-50 state-dict names, written out from its module tree
    (detectron2/modeling/backbone/resnet.py): BasicStem.conv1 with a norm; stages res2-res5
    of BottleneckBlocks conv1-3, each a Conv2d with a norm; a shortcut Conv2d + norm in the
    first block of each stage (channel or stride change). BN tensors as in nn.BatchNorm2d,
    num_batches_tracked included (kept, as MoCo's conversion keeps every key)."""
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{t}" for t in BN_TENSORS}
    for stage, blocks in zip(("res2", "res3", "res4", "res5"), (3, 4, 6, 3), strict=True):
        for block in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
            for conv in convs:
                names.add(f"{stage}.{block}.{conv}.weight")
                names |= {f"{stage}.{block}.{conv}.norm.{t}" for t in BN_TENSORS}
    return names


def test_detectron2_r50_has_detectron2_names_and_the_original_values(tmp_path,
                                                                        resnet50_imagenet):
    out = tmp_path / "r50.pkl"
    report = export(resnet50_imagenet, "resnet50", "imagenet", "detectron2", out)
    assert report["target"] == "detectron2 R50-C4 (MoCo conversion)"
    with open(out, "rb") as handle:
        payload = pickle.load(handle)
    assert payload["matching_heuristics"] is True
    assert payload["__author__"] == "mixmask"
    model = payload["model"]
    assert set(model) == detectron2_r50_names()
    assert report["tensors"] == len(model) == len(resnet50_imagenet.state_dict())

    # Values: each equal to its torchvision-named original, mapped by hand here.
    ours = resnet50_imagenet.state_dict()
    pairs = {"stem.conv1.weight": "conv1.weight",
             "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
             "res2.0.shortcut.norm.bias": "layer1.0.downsample.1.bias",
             "res3.3.conv3.norm.weight": "layer2.3.bn3.weight",
             "res4.5.conv2.weight": "layer3.5.conv2.weight",
             "res5.2.conv1.norm.num_batches_tracked": "layer4.2.bn1.num_batches_tracked"}
    for theirs_key, our_key in pairs.items():
        assert isinstance(model[theirs_key], np.ndarray)
        assert np.array_equal(model[theirs_key], ours[our_key].numpy())
        assert model[theirs_key].dtype == ours[our_key].numpy().dtype
    # And all of them, as a multiset of exact arrays (no tensor altered, only renamed).
    def fingerprints(arrays):
        return sorted((a.shape, a.dtype.str, a.tobytes()) for a in arrays)
    assert fingerprints(model.values()) == fingerprints(t.numpy() for t in ours.values())


def test_detectron2_r18_is_exported_with_a_note_on_fpn(tmp_path):
    ours = trained_looking_backbone("resnet18", "imagenet")
    report = export(ours, "resnet18", "imagenet", "detectron2", tmp_path / "r18.pkl")
    with open(tmp_path / "r18.pkl", "rb") as handle:
        model = pickle.load(handle)["model"]
    # detectron2's BasicBlock: conv1, conv2 (each with a norm) and a shortcut where shape
    # changes: res3-res5 block 0, not res2 (64 -> 64 channels, stride 1).
    assert "res2.0.shortcut.weight" not in model and "res3.0.shortcut.norm.bias" in model
    assert "res5.1.conv2.norm.weight" in model and not any("conv3" in key for key in model)
    assert any("FPN" in note for note in report["notes"])


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["torchvision", "timm", "detectron2"])  # the fixed-width ones
def test_width_other_than_1_is_refused(fmt, tmp_path):
    config = ModelConfig(backbone="resnet18", stem="cifar", width=0.5)
    model, _ = build_backbone(config)
    with pytest.raises(ExportError, match="model.width=0.5"):
        export_backbone(model.state_dict(), config, fmt, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_refusals_are_mixmask_errors_with_one_sentence(tmp_path):
    model = trained_looking_backbone("resnet18", "cifar")
    state = model.state_dict()
    cifar = ModelConfig(backbone="resnet18", stem="cifar")
    with pytest.raises(ExportError, match="7x7") as caught:
        export_backbone(state, cifar, "detectron2", tmp_path / "x.pkl")
    assert isinstance(caught.value, MixmaskError) and "\n" not in str(caught.value)
    with pytest.raises(ExportError, match="vit_small"):
        vit = dataclasses.replace(cifar, backbone="vit_small")
        export_backbone(state, vit, "torchvision", tmp_path / "x.pt")
    with pytest.raises(ExportError, match="--format"):
        export_backbone(state, cifar, "onnx", tmp_path / "x.onnx")
    # Weights that do not match the config (stem or depth) are refused before writing.
    imagenet = ModelConfig(backbone="resnet18", stem="imagenet")
    with pytest.raises(ExportError, match="conv1.weight has shape"):
        export_backbone(state, imagenet, "torchvision", tmp_path / "x.pt")
    with pytest.raises(ExportError, match="not a resnet34"):
        export_backbone(state, dataclasses.replace(cifar, backbone="resnet34"), "timm",
                        tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# -- atomic writes ---------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    model = trained_looking_backbone("resnet18", "cifar")
    out = tmp_path / "r18.pt"
    out.write_bytes(b"old")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ExportError, match="No space left on device"):
        export(model, "resnet18", "cifar", "torchvision", out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pt"]

    # A failure after the partial file is written (the rename) removes it too.
    monkeypatch.setattr("mixmask.runs.export.os.replace", full_disk)
    with pytest.raises(ExportError, match="could not write"):
        export(model, "resnet18", "cifar", "timm", out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pt"]


def test_an_unwritable_folder_is_an_export_error(tmp_path):
    # A regular file where the folder should be: unwritable even for root (chmod is not).
    (tmp_path / "not_a_folder").write_bytes(b"")
    model = trained_looking_backbone("resnet18", "cifar")
    with pytest.raises(ExportError, match="could not write"):
        export(model, "resnet18", "cifar", "torchvision", tmp_path / "not_a_folder" / "r.pt")


# -- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pascal_voc_R_50_C4_24k_moco.yaml", "coco_R_50_C4_1x_moco.yaml"])
def test_transfer_configs_set_what_moco_s_conversion_needs(name):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "transfer" / "detectron2"
    config = yaml.safe_load((folder / name).read_text())
    base = yaml.safe_load((folder / config["_BASE_"]).read_text())
    assert config["MODEL"]["PIXEL_MEAN"] == [123.675, 116.280, 103.530]
    assert config["MODEL"]["PIXEL_STD"] == [58.395, 57.120, 57.375]
    assert config["INPUT"]["FORMAT"] == "RGB"
    assert config["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
    assert base["MODEL"]["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert base["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
