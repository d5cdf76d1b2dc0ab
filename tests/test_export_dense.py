"""mixmask.runs.export's formats for dense transfer and self-describing files: ``vitdet``
loads strictly into timm's ViT with equal features and under ViTDet's names, ``safetensors``
round-trips every backbone family bit-exactly with its description, and the refusals
(non-ViTs for ViTDet, ConvNeXt for detectron2, unreadable files) are one sentence."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mixmask
from mixmask.config import ModelConfig, load_config, save_config
from mixmask.errors import MixmaskError
from mixmask.models.backbones import build_backbone
from mixmask.runs.export import (
    ExportError,
    export_backbone,
    load_safetensors_backbone,
)

timm_vit = pytest.importorskip("timm.models.vision_transformer")

VIT_TINY = (192, 12, 3)  # embed_dim, depth, num_heads (mixmask.models.vit.VIT_ARCHS)
CONFIGS = {
    "resnet18": ModelConfig(backbone="resnet18", stem="cifar", width=0.25),
    "convnext_atto": ModelConfig(backbone="convnext_atto", stem="cifar"),
    "vit_tiny": ModelConfig(backbone="vit_tiny", patch_size=4),
    "convvit_tiny": ModelConfig(backbone="convvit_tiny", stem="cifar"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU forwards: one intra-op thread avoids oversubscribing shared cores, and the
    results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_looking(config: ModelConfig, seed: int = 0) -> nn.Module:
    """Our backbone at 32 px with every stored float tensor perturbed (LayerNorm and BN
    affines, BN running statistics included), so that a tensor swapped, dropped or left
    at its init changes the eval-mode output."""
    torch.manual_seed(seed)
    model, _ = build_backbone(config, image_size=32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.mul_(0.75 + 0.5 * noise).add_(0.01 * (noise - 0.5))
    return model.eval()


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_one_sentence(error: BaseException) -> None:
    message = str(error)
    assert isinstance(error, MixmaskError) and "\n" not in message
    assert message.endswith(".") and ". " not in message.rstrip("."), message


# -- vitdet ----------------------------------------------------------------------------------
def vitdet_net_names(depth: int) -> set[str]:
    """detectron2's ViT (detectron2/modeling/backbone/vit.py) parameters that a pretrained
    ViT fills, written out from its module tree: PatchEmbed.proj, pos_embed, and per block
    norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 (the relative-position tables,
    rel_pos_h / rel_pos_w, start at zero and are in no pretrained checkpoint)."""
    names = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    for block in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{block}.{layer}.weight", f"blocks.{block}.{layer}.bias"}
    return names


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vitdet_model_loads_strictly_into_timm_s_vit_with_equal_features(tmp_path, global_pool):
    config = ModelConfig(backbone="vit_tiny", patch_size=4, global_pool=global_pool)
    ours = trained_looking(config)
    before = {key: tensor.clone() for key, tensor in ours.state_dict().items()}
    out = tmp_path / "vit_tiny_vitdet.pth"
    report = export_backbone(ours.state_dict(), config, "vitdet", out, image_size=32)
    assert report["format"] == "vitdet" and report["out"] == str(out)
    assert not (tmp_path / "vit_tiny_vitdet.pth.partial").exists()

    payload = torch.load(out, weights_only=True)
    assert payload["matching_heuristics"] is True and payload["__author__"] == "mixmask"
    model = payload["model"]
    assert report["tensors"] == len(model) == len(before)
    for key, tensor in before.items():  # unchanged, and the run's tensors not mutated
        assert model[key].dtype == tensor.dtype and torch.equal(model[key], tensor), key
        assert torch.equal(ours.state_dict()[key], tensor), key
    assert model["pos_embed"].shape == (1, 1 + 8 * 8, 192)  # the cls row included

    embed_dim, depth, num_heads = VIT_TINY
    theirs = timm_vit.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        class_token=True, num_classes=0, global_pool=global_pool,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    incompatible = theirs.load_state_dict(model, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    theirs.eval()
    batch = images()
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch), ours(batch), rtol=0, atol=0)

    # ViTDet's ViT: every name it loads is in the file with the shape it has for
    # pretrain_img_size=32, patch_size=4 (suffix matching adds backbone.net.).
    for name in vitdet_net_names(depth):
        assert name in model, name
    assert model["patch_embed.proj.weight"].shape == (embed_dim, 3, 4, 4)


def test_vitdet_notes_give_the_config_keys_and_the_run_s_normalisation(tmp_path):
    from mixmask.methods import PixelStats

    config = CONFIGS["vit_tiny"]
    ours, _ = build_backbone(config, image_size=32)
    out = tmp_path / "v.pth"
    stats = PixelStats((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    # No image_size: the ViT's patch grid in pos_embed gives it (the CLI passes none).
    report = export_backbone(ours.state_dict(), config, "vitdet", out, pixel_stats=stats)
    notes = " ".join(report["notes"])
    for key in (f"train.init_checkpoint = '{out}'", "model.backbone.net.embed_dim = 192",
                "model.backbone.net.depth = 12", "model.backbone.net.num_heads = 3",
                "model.backbone.net.patch_size = 4",
                "model.backbone.net.pretrain_img_size = 32", "pretrain_use_cls_token=True",
                "model.pixel_mean = [127.5, 102.0, 76.5]",
                "model.pixel_std = [51.0, 63.75, 76.5]", "scale_factors"):
        assert key in notes, key
    without = export_backbone(ours.state_dict(), config, "vitdet", out)
    assert any("must be the run's normalisation" in note for note in without["notes"])


@pytest.mark.parametrize("backbone", ["resnet18", "convvit_tiny"])
def test_vitdet_refuses_a_backbone_that_is_not_a_vit_in_one_sentence(tmp_path, backbone):
    config = CONFIGS[backbone]
    model, _ = build_backbone(config, image_size=32)
    with pytest.raises(ExportError, match="vitdet export holds the ViTs") as caught:
        export_backbone(model.state_dict(), config, "vitdet", tmp_path / "x.pth")
    assert "vit_tiny" in str(caught.value) and repr(backbone) in str(caught.value)
    assert_one_sentence(caught.value)
    vit = CONFIGS["vit_tiny"]
    model, _ = build_backbone(vit, image_size=32)
    with pytest.raises(ExportError, match=r"name it x\.pth") as caught:
        export_backbone(model.state_dict(), vit, "vitdet", tmp_path / "x.pkl")
    assert_one_sentence(caught.value)
    assert not list(tmp_path.iterdir())


# -- detectron2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, instead", [("convnext_atto", "--format timm"),
                                               ("vit_tiny", "--format vitdet")])
def test_detectron2_refuses_a_convnext_or_a_vit_pointing_to_other_formats(
        tmp_path, backbone, instead):
    config = ModelConfig(backbone=backbone, stem="imagenet", patch_size=4)
    model, _ = build_backbone(config, image_size=32)
    with pytest.raises(ExportError, match=f"detectron2's core has no {backbone} backbone") \
            as caught:
        export_backbone(model.state_dict(), config, "detectron2", tmp_path / "x.pkl")
    message = str(caught.value)
    assert "--format safetensors" in message and instead in message and "res2" in message
    assert_one_sentence(caught.value)
    assert not list(tmp_path.iterdir())


# -- safetensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", list(CONFIGS))
def test_safetensors_round_trips_bit_exactly_with_its_description(tmp_path, backbone):
    config = CONFIGS[backbone]
    ours = trained_looking(config)
    out = tmp_path / f"{backbone}.safetensors"
    report = export_backbone(ours.state_dict(), config, "safetensors", out, image_size=32)
    assert report["format"] == "safetensors" and report["out"] == str(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{backbone}.json",
                                                                  f"{backbone}.safetensors"]

    loaded, description = load_safetensors_backbone(out)
    theirs, original = loaded.state_dict(), ours.state_dict()
    assert set(theirs) == set(original) and report["tensors"] == len(original)
    for key, tensor in original.items():
        assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), key
    loaded.eval()
    batch = images()
    with torch.no_grad():
        assert torch.equal(loaded(batch), ours(batch))

    token_stride = {"vit_tiny": 4, "convvit_tiny": 4}.get(backbone, 0)
    assert description == {
        "mixmask_format_version": 1, "architecture": backbone, "stem": config.stem,
        "width": config.width, "patch_size": token_stride, "image_size": 32,
        "global_pool": config.global_pool, "mixmask_version": mixmask.__version__}
    # The JSON beside it holds the same fields; the file's metadata holds them as strings.
    assert json.loads(out.with_suffix(".json").read_text()) == description
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == {key: str(value) for key, value in description.items()}


def test_safetensors_records_what_the_weights_show_when_no_image_size_is_given(tmp_path):
    vit = CONFIGS["vit_tiny"]
    model, _ = build_backbone(vit, image_size=32)
    export_backbone(model.state_dict(), vit, "safetensors", tmp_path / "vit.safetensors")
    assert json.loads((tmp_path / "vit.json").read_text())["image_size"] == 32  # 8x8 of 4 px
    resnet = CONFIGS["resnet18"]
    model, _ = build_backbone(resnet)
    export_backbone(model.state_dict(), resnet, "safetensors", tmp_path / "r18")
    assert json.loads((tmp_path / "r18.json").read_text())["image_size"] is None  # any size
    loaded, description = load_safetensors_backbone(tmp_path / "r18")
    assert description["image_size"] is None and description["width"] == 0.25


def test_unreadable_or_undescribed_files_are_one_sentence_export_errors(tmp_path):
    config = CONFIGS["resnet18"]
    model, _ = build_backbone(config)
    good = tmp_path / "r18.safetensors"
    export_backbone(model.state_dict(), config, "safetensors", good)
    data = good.read_bytes()
    cases = {"truncated.safetensors": data[:-100], "garbage.safetensors": b"not tensors" * 9,
             "empty.safetensors": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    bare = tmp_path / "bare.safetensors"  # a valid file, without mixmask's metadata
    save_file(load_file(good), bare)
    metadata = dict(json.loads(good.with_suffix(".json").read_text()))
    unknown = tmp_path / "unknown.safetensors"
    save_file(load_file(good), unknown,
              metadata={key: str(value) if value is not None else ""
                        for key, value in {**metadata, "architecture": "resnet9000"}.items()})
    wrong = tmp_path / "wrong.safetensors"  # the metadata says imagenet: conv1 is 7x7 there
    save_file(load_file(good), wrong,
              metadata={key: str(value) if value is not None else ""
                        for key, value in {**metadata, "stem": "imagenet"}.items()})
    expected = {"truncated.safetensors": "not a readable safetensors file",
                "garbage.safetensors": "not a readable safetensors file",
                "empty.safetensors": "not a readable safetensors file",
                "missing.safetensors": "does not exist",
                "bare.safetensors": "has no mixmask metadata",
                "unknown.safetensors": "'resnet9000' backbone, which this mixmask does not",
                "wrong.safetensors": "conv1.weight has shape"}
    for name, message in expected.items():
        with pytest.raises(ExportError, match=message) as caught:
            load_safetensors_backbone(tmp_path / name)
        assert_one_sentence(caught.value)


def test_an_out_ending_in_json_is_refused(tmp_path):
    config = CONFIGS["resnet18"]
    model, _ = build_backbone(config)
    with pytest.raises(ExportError, match="r18.safetensors") as caught:
        export_backbone(model.state_dict(), config, "safetensors", tmp_path / "r18.json")
    assert_one_sentence(caught.value)
    assert not list(tmp_path.iterdir())


# -- the command -----------------------------------------------------------------------------
def test_export_command_writes_vitdet_and_safetensors_files_of_a_mae_run(tmp_path, capsys):
    from mixmask.cli import main
    from mixmask.methods import build_method

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config(None, ["method.name=mae", "model.backbone=vit_tiny",
                                "model.patch_size=4", "method.mae.decoder_depth=1",
                                "method.mae.decoder_dim=64", "method.mae.decoder_heads=2",
                                "data.augmentation=mae", f"out_dir={run}"])
    save_config(config, run / "config.yaml")
    torch.manual_seed(1)
    method = build_method(config)
    torch.save({"method": method.state_dict(), "step": 3}, run / "checkpoints" / "last.ckpt")

    vitdet = tmp_path / "mae_vitdet.pth"
    assert main(["export", str(run), "--format", "vitdet", "--out", str(vitdet)]) == 0
    printed = capsys.readouterr().out
    assert "ViTDet's ViT" in printed and "pretrain_img_size = 32" in printed
    model = torch.load(vitdet, weights_only=True)["model"]
    for key, tensor in method.backbone.state_dict().items():
        assert torch.equal(model[key], tensor), key

    weights = tmp_path / "mae.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(weights)]) == 0
    loaded, description = load_safetensors_backbone(weights)
    assert description["image_size"] == 32 and description["architecture"] == "vit_tiny"
    loaded.eval(), method.backbone.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images()), method.backbone(images()))

    capsys.readouterr()
    assert main(["export", str(run), "--format", "detectron2", "--out",
                 str(tmp_path / "x.pkl")]) == 2
    err = capsys.readouterr().err
    assert "--format vitdet" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
