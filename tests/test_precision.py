"""``train.precision=auto``: bf16 mixed precision where the device computes bf16 natively,
fp32 elsewhere (the capability queries mocked both ways), recorded where a run says what
ran; the parts that must stay fp32 under autocast do so on the CPU path too; bf16 runs are
deterministic and resume bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import ROOT
from test_engine import tiny_config

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.eval.features import extract_features
from mixmask.eval.knn import knn_top1
from mixmask.methods import BUILTIN_METHODS, PixelStats, build_method
from mixmask.ops.losses import mim as mim_losses
from mixmask.ops.losses import siamese as siamese_losses
from mixmask.ops.losses.unigrad import unigrad_loss
from mixmask.ops.lowpass import ideal_lowpass
from mixmask.ops.tensors import mixed_precision
from mixmask.train.fabric import native_bf16, resolve_precision
from mixmask.train.loop import pretrain

BF16_CPU = "bf16 mixed precision (train.precision=auto: this CPU computes bf16 natively"
FP32_CPU = "fp32 (train.precision=auto: this CPU has no native bf16 arithmetic)"


def cpu_features(monkeypatch, *, avx512_bf16: bool, amx: bool) -> None:
    """What torch's CPU-feature queries answer, as on a machine with or without them."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("avx512_bf16, amx, expected, named", [
    (True, True, "bf16", "AMX and AVX-512 BF16"),
    (True, False, "bf16", "AVX-512 BF16"),
    (False, True, "bf16", "AMX"),
    (False, False, "32", None),
])
def test_auto_on_the_cpu_is_bf16_exactly_where_the_cpu_computes_it_natively(
        monkeypatch, avx512_bf16, amx, expected, named):
    cpu_features(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    precision, sentence = resolve_precision("auto", "cpu")
    assert precision == expected
    if named is None:
        assert native_bf16("cpu") is None and sentence == FP32_CPU
    else:
        assert sentence == f"{BF16_CPU} ({named}))"


def test_a_torch_without_the_cpu_queries_falls_back_to_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_precision("auto", "cpu") == ("32", FP32_CPU)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "32")])
def test_auto_on_a_gpu_asks_for_native_bf16_not_emulated(monkeypatch, native, expected):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native  # a V100 answers True only when emulation counts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", "cuda")[0] == expected
    assert asked == [False]


@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
@pytest.mark.parametrize("explicit", ["32", "bf16", "16"])
def test_an_explicit_precision_is_kept_whatever_the_device(monkeypatch, accelerator,
                                                            explicit):
    cpu_features(monkeypatch, avx512_bf16=False, amx=False)
    assert resolve_precision(explicit, accelerator) == (
        explicit, f"train.precision={explicit} as configured")


def test_auto_is_the_default():
    assert load_config(None).train.precision == "auto"


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "32")])
def test_pretraining_prints_once_and_records_the_resolved_precision(
        tmp_path, cifar10_tarball, monkeypatch, capsys, native, expected):
    cpu_features(monkeypatch, avx512_bf16=native, amx=False)
    config = tiny_config(tmp_path, cifar10_tarball, "train.max_steps=1", "monitor.knn=false",
                         "monitor.online_probe=false", "eval.knn=false", "eval.linear=false")
    summary = pretrain(config)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == expected
    assert summary["precision"] == expected
    assert json.loads((run / "summary.json").read_text())["precision"] == expected
    said = [line for line in capsys.readouterr().out.splitlines() if "Precision:" in line]
    assert said == [f"Precision: {BF16_CPU if native else FP32_CPU}"
                    + (" (AVX-512 BF16))." if native else ".")]


# --------------------------------------------------------------------------- fp32 islands


def _vectors(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def _pixels_and_mask():
    prediction, target = _vectors((2, 3, 16, 16), (2, 3, 16, 16))
    mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    return prediction, target, mask


LOSSES = {
    "info_nce": lambda: siamese_losses.info_nce(*_vectors((8, 16), (8, 16), (32, 16)), 0.2),
    "byol": lambda: siamese_losses.byol_loss(*_vectors((8, 16), (8, 16))),
    "simsiam": lambda: siamese_losses.simsiam_loss(*_vectors((8, 16), (8, 16))),
    "barlow_twins": lambda: siamese_losses.barlow_twins_loss(*_vectors((8, 16), (8, 16))),
    "vicreg": lambda: siamese_losses.vicreg_loss(*_vectors((8, 16), (8, 16)))[0],
    "unigrad": lambda: unigrad_loss(*_vectors((8, 16), (8, 16))),
    "masked_mse": lambda: mim_losses.masked_mse_per_patch(
        *_vectors((2, 4, 12), (2, 4, 12)), torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]])),
    "norm_pix": lambda: mim_losses.norm_pix_target(*_vectors((2, 4, 12))),
    "masked_l1": lambda: mim_losses.masked_l1(*_pixels_and_mask()),
    "masked_focal_l1": lambda: mim_losses.masked_focal_l1(*_pixels_and_mask()),
    "a2mim_frequency": lambda: mim_losses.a2mim_frequency_loss(*_pixels_and_mask()),
    "lowpass": lambda: ideal_lowpass(_vectors((2, 3, 16, 16))[0], 4.0),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_and_filters_compute_in_float32_inside_a_cpu_bf16_autocast(name):
    """Under the training step's CPU autocast, a loss given float32 inputs returns the very
    value it returns without autocast: its matmuls, reductions and FFTs ran in float32.
    With ``autocast_off`` made a no-op the matmul losses fail (InfoNCE, Barlow Twins and
    VICReg); the elementwise ones hold nothing the CPU autocast
    lowers, and they are here so that a future matmul in them is caught."""
    outside = LOSSES[name]()
    with mixed_precision(torch.device("cpu"), "bf16"):
        inside = LOSSES[name]()
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)


def _real_views(cifar10_tarball, count: int = 16):
    """Two deterministic views of real CIFAR-10 images (normalised, and flipped) and their
    pixel statistics."""
    from mixmask.data import load_image_set

    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=count)
    images = image_set.images.float() / 255  # [N, 3, 32, 32] uint8 in memory
    mean = torch.tensor(image_set.mean).view(1, 3, 1, 1)
    std = torch.tensor(image_set.std).view(1, 3, 1, 1)
    normalised = (images - mean) / std
    return normalised, normalised.flip(3), PixelStats(image_set.mean, image_set.std)


# Every method: the five Siamese bases with MixMask, and the MIM recipes (ResNet, ViT,
# ConvMAE, ConvNeXt backbones) as their CIFAR-10 configs build them.
REAL_BATCH_CASES = {
    **{f"{base}_mixmask": (None, [f"method.name={base}", "model.width=0.125",
                                  "method.masking=mixmask", "method.mocov2.queue_size=64"])
       for base in BUILTIN_METHODS},
    **{recipe: (ROOT / "configs" / "cifar10" / f"{recipe}.yaml",
                ["model.width=0.25"] if recipe.endswith("r18") else [])
       for recipe in ("a2mim_r18", "a2mim_vit_tiny", "mae_vit_tiny", "pixmim_vit_tiny",
                      "siameseim_r18", "siameseim_vit_tiny", "convmae_tiny",
                      "mixmask_mocov2_convnext", "simmim_r18", "simmim_vit_tiny")},
}


@pytest.mark.parametrize("case", sorted(REAL_BATCH_CASES))
def test_every_method_on_a_real_batch_under_bf16_is_float32_finite_and_near_fp32(
        case, cifar10_tarball):
    """Each method's loss on real CIFAR-10 views, under the CPU's bf16 autocast (as
    ``train.precision=auto`` trains on a CPU with native bf16) against fp32: float32,
    finite, within 1%, and every gradient finite."""
    recipe, overrides = REAL_BATCH_CASES[case]
    config = load_config(recipe, ["train.batch_size=16", *overrides])
    view1, view2, stats = _real_views(cifar10_tarball)
    values = {}
    for precision in ("32", "bf16"):
        torch.manual_seed(0)
        method = build_method(config, stats).eval()  # eval-mode BN: the same statistics
        with mixed_precision(torch.device("cpu"), precision):
            output = method.training_step(Batch.from_views(view1, view2),
                                          torch.Generator().manual_seed(0))
        output.loss.backward()
        values[precision] = output.loss.detach()
        assert output.loss.dtype == torch.float32
        assert all(parameter.grad is None or bool(torch.isfinite(parameter.grad).all())
                   for parameter in method.parameters())
    assert torch.isfinite(values["bf16"])
    assert values["bf16"].item() == pytest.approx(values["32"].item(), rel=0.01)


@pytest.mark.parametrize("name", [*BUILTIN_METHODS, "simclr", "mocov3", "dino"])
def test_siamese_heads_run_in_float32_under_bf16_while_the_backbone_autocasts(name):
    """Under a CPU bf16 autocast the backbone's output is bf16 and the projector's and
    predictor's (and the target network's head's) are float32: their rounding to bf16
    before a temperature-scaled loss cost SimCLR about 4 kNN points (docs/performance.md).
    A head left under autocast returns bf16 here."""
    heads = {"dino": ["method.dino.proj_hidden_dim=32", "method.dino.bottleneck_dim=16",
                      "method.dino.num_prototypes=32"]}.get(
        name, [f"method.{name}.proj_hidden_dim=32", f"method.{name}.proj_output_dim=16"])
    config = load_config(None, [f"method.name={name}", "model.width=0.125",
                                "train.batch_size=8", "method.mocov2.queue_size=64", *heads])
    torch.manual_seed(0)
    method = build_method(config)
    images = torch.randn(8, 3, 32, 32)
    with mixed_precision(torch.device("cpu"), "bf16"):
        embedding = method.embed(images)
        targets = (method.target_embeddings([images, images], [1], torch.Generator())
                   if method.has_target_network else {})
    assert embedding.features.dtype == torch.bfloat16
    assert embedding.projection.dtype == embedding.output.dtype == torch.float32
    assert all(target.dtype == torch.float32 for target in targets.values())


def test_bf16_features_come_back_float32_and_the_knn_reads_them_outside_autocast(
        cifar10_tarball):
    """Feature extraction autocasts the forward only: float32 features near the fp32 ones
    (cosine > 0.99 per image), and the kNN over them agrees with the fp32 kNN."""
    from mixmask.data import load_image_set

    torch.manual_seed(0)
    method = build_method(load_config(None, ["model.width=0.125"]))
    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=200)
    images, _, _ = _real_views(cifar10_tarball, 200)
    dataset = torch.utils.data.TensorDataset(images, torch.tensor(image_set.labels))
    found = {precision: extract_features(method, dataset, device=torch.device("cpu"),
                                         encode=method.features, precision=precision)
             for precision in ("32", "bf16")}
    (fp32, labels), (bf16, _) = found["32"], found["bf16"]
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    top1 = {precision: knn_top1(features[:150], labels[:150], features[150:], labels[150:],
                                num_classes=10, k=20, temperature=0.1)
            for precision, (features, _) in found.items()}
    assert abs(top1["bf16"] - top1["32"]) <= 6.0  # 3 of 50 test images may flip


# --------------------------------------------------------------------------- exactness


def test_bf16_training_is_deterministic_and_resumes_bit_for_bit(tmp_path, cifar10_tarball):
    """Same seed, same machine: two straight bf16 runs give identical weights, and a run
    stopped mid-epoch (step 3 of 8) and resumed gives them too, bit for bit."""
    quiet = ("monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
             "eval.linear=false", "train.precision=bf16", "train.epochs=2")
    for name in ("a", "b"):
        pretrain(tiny_config(tmp_path / name, cifar10_tarball, *quiet))
    pretrain(tiny_config(tmp_path / "c", cifar10_tarball, *quiet, "train.max_steps=3"))
    assert pretrain(tiny_config(tmp_path / "c", cifar10_tarball, *quiet,
                                "resume=auto"))["steps"] == 8
    weights = {name: torch.load(tmp_path / name / "run/checkpoints/last.ckpt",
                                weights_only=True)["method"] for name in "abc"}
    assert yaml.safe_load((tmp_path / "a/run/config.yaml").read_text())["train"][
        "precision"] == "bf16"
    # rtol = atol = 0: bit for bit, nested states (the queue, generators) included.
    torch.testing.assert_close(weights["b"], weights["a"], rtol=0, atol=0)
    torch.testing.assert_close(weights["c"], weights["a"], rtol=0, atol=0)
