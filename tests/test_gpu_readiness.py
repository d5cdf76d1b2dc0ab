"""The defects a first CUDA run would hit, caught on the CPU (issue 31,
../shared/notes/gpu-readiness.md): fp16 with a GradScaler (Fabric turns a plain fp16
request into bf16 on the CPU, so this path never ran), tensors made without ``device=``,
gathers into buffers of another memory layout, and host-to-device copies that stall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.datasets import load_image_set
from mixmask.methods import PixelStats, build_method
from mixmask.ops import distributed
from mixmask.ops.optim import build_optimizer
from mixmask.train import loop, trainer
from mixmask.train.step import training_step

TINY = ["data.dataset=synthetic", "data.subset=64", "data.num_workers=0",
        "data.eval_train_subset=64", "data.eval_test_subset=32", "model.width=0.125",
        "method.mocov2.queue_size=64", "method.mocov2.proj_hidden_dim=32",
        "train.batch_size=16", "train.epochs=1", "train.log_every=1", "train.plots=none",
        "train.progress_bar=false", "monitor.knn=false", "monitor.online_probe=false",
        "eval.knn=false", "eval.linear=false"]


# --------------------------------------------------------------------------- fp16


class _Fp16:
    """The engine's Fabric with fp16 autocast and a GradScaler on the CPU, as on a GPU."""

    def __init__(self):
        self.init_scale = 2.0 ** 16
        self.scalers: list[torch.amp.GradScaler] = []

    def __call__(self, config, accelerator) -> Fabric:
        scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale)
        self.scalers.append(scaler)
        return Fabric(accelerator="cpu", devices=1,
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


@pytest.fixture
def fp16(monkeypatch) -> _Fp16:
    fabric = _Fp16()
    monkeypatch.setattr(loop, "build_fabric", fabric)
    return fabric


def _pretrain(tmp_path: Path, *overrides: str) -> dict:
    return loop.pretrain(load_config(ROOT / "configs" / "quickstart.yaml",
                                       [*TINY, f"out_dir={tmp_path / 'run'}", *overrides]))


def test_fp16_with_clipping_and_the_fused_optimizer_trains(tmp_path, fp16):
    # Fabric cannot unscale a fused optimizer's gradients before clipping them: the
    # engine runs that combination unfused (it raised NotImplementedError on step 1).
    fp16.init_scale = 2.0 ** 10
    summary = _pretrain(tmp_path, "train.grad_clip=1.0", "train.fused_optimizer=true")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0


def test_fp16_overflow_under_skip_lets_the_scaler_back_off(tmp_path, fp16):
    # Scaled gradients overflow at 2^127: the GradScaler must see it and lower its scale,
    # not a mixmask skip that returns before the optimizer step (6 of 6 steps skipped).
    fp16.init_scale = 2.0 ** 127
    summary = _pretrain(tmp_path, "train.on_nonfinite=skip", "train.epochs=2",
                        "train.fused_optimizer=false")
    assert fp16.scalers[0].get_scale() < 2.0 ** 127
    assert summary["skipped_steps"] == 0  # the loss was finite every step


def test_an_fp16_overflow_on_a_logging_step_does_not_stop_the_run(tmp_path, fp16):
    # Every step is logged and the first overflow logs an infinite grad_norm: the scaler
    # skips that update, the run goes on (it stopped as "diverged").
    fp16.init_scale = 2.0 ** 127
    summary = _pretrain(tmp_path, "train.grad_clip=1.0")
    assert summary["steps"] == 4 and fp16.scalers[0].get_scale() < 2.0 ** 127
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert any("inf" in row or "nan" in row for row in rows[1:])  # the overflow was logged
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


# --------------------------------------------------------------------------- device=


PROBES = {
    "mocov2_none": ["method.masking=none"],
    "mocov2_mixmask_beit": ["method.masking=mixmask", "method.mask.generator=beit"],
    "mocov2_mixmask_exact_count_per_sample": [
        "method.masking=mixmask", "method.mask.generator=exact_count",
        "method.mask.per_sample=true"],
    "mocov2_both": ["method.masking=both"],
    "mocov2_unmix": ["method.masking=unmix", "method.unmix.alpha=2.0"],
    "byol_erase": ["method.name=byol", "method.masking=erase"],
    "simsiam_mixmask": ["method.name=simsiam", "method.masking=mixmask"],
    "barlow_twins_mixmask": ["method.name=barlow_twins", "method.masking=mixmask"],
    "vicreg_mixmask": ["method.name=vicreg", "method.masking=mixmask"],
}
RECIPE_PROBES = ["mae_vit_tiny", "pixmim_vit_tiny", "a2mim_vit_tiny", "a2mim_r18",
                 "siameseim_vit_tiny", "siameseim_r18", "simmim_vit_tiny", "simmim_r18",
                 "dino_r18", "dino_vit_tiny", "ibot_vit_tiny"]


def _probe_step(config) -> None:
    images = load_image_set("synthetic", "", "train", subset=8)
    torch.manual_seed(0)
    method = build_method(config, PixelStats(tuple(images.mean), tuple(images.std)))
    loader = build_train_loader(images, EpochBatchSampler(len(images), 8, seed=0),
                                method.view_configs(), pipeline="cpu",
                                device=torch.device("cpu"), seed=0)
    batch = next(iter(loader))
    optimizer = build_optimizer("sgd", method.parameter_groups("sgd"), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    # Every tensor made without device= now lands on "meta" and fails against the CPU
    # tensors of the step, 0-dim ones included (CUDA would take those silently).
    torch.set_default_device("meta")
    try:
        output = training_step(method, optimizer, batch, generator, 0.0)
    finally:
        torch.set_default_device(None)
    assert output.loss.device.type == "cpu" and torch.isfinite(output.loss)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_a_siamese_step_creates_every_tensor_on_its_device(name):
    base = [item for item in TINY if not item.startswith("method.")]
    _probe_step(load_config(None, [*base, "train.batch_size=8", "method.name=mocov2",
                                   "method.mocov2.queue_size=64",
                                   "method.mocov2.proj_hidden_dim=32", *PROBES[name]]))


@pytest.mark.parametrize("recipe", RECIPE_PROBES)
def test_a_mim_step_creates_every_tensor_on_its_device(recipe):
    small = ["model.backbone=vit_tiny"] if "vit" in recipe else ["model.width=0.125"]
    _probe_step(load_config(ROOT / "configs" / "cifar10" / f"{recipe}.yaml",
                            ["data.dataset=synthetic", "train.batch_size=8", *small]))


def test_the_meta_probe_catches_a_tensor_made_without_device():
    # The probe's own check: a step that builds a constant without device= fails under it.
    torch.set_default_device("meta")
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            float((torch.ones(3) + torch.zeros(3, device="cpu")).sum())
    finally:
        torch.set_default_device(None)


# --------------------------------------------------------------------------- gathers


def test_gathers_send_and_receive_contiguous_buffers(monkeypatch):
    # NCCL's all_gather into outputs of another layout than the input scrambles them (or
    # refuses): MoCo's shuffle-BN gathers channels_last images under train.channels_last.
    layouts = []

    def all_gather(parts, tensor):
        layouts.append(tensor.is_contiguous() and all(part.is_contiguous() for part in parts))
        for part in parts:
            part.copy_(tensor)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    images = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    gathered = distributed.gather_all(images)
    assert layouts == [True]
    assert torch.equal(gathered, torch.cat([images, images]))


# --------------------------------------------------------------------------- copies


def test_siameseims_host_masks_reach_the_device_without_a_blocking_copy(monkeypatch):
    config = load_config(ROOT / "configs" / "cifar10" / "siameseim_vit_tiny.yaml",
                         ["data.dataset=synthetic", "model.backbone=vit_tiny"])
    method = build_method(config, None)
    copies = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "meta":
            copies.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    masks = method.sample_mask(4, torch.Generator().manual_seed(0), torch.device("meta"))
    assert masks.device.type == "meta" and copies == [True]


def test_a_queue_smaller_than_one_steps_keys_is_refused():
    # A symmetric loss enqueues both views' keys: 2 x batch per step; fewer slots would be
    # written twice in one step (which write wins is unspecified on CUDA).
    from mixmask.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one step's keys \\(64"):
        load_config(None, ["train.batch_size=32", "method.mocov2.queue_size=48",
                           "method.mocov2.symmetric=true"])
    load_config(None, ["train.batch_size=32", "method.mocov2.queue_size=48",
                       "method.mocov2.symmetric=false"])


def test_the_shuffle_bn_permutation_comes_from_the_step_generator(monkeypatch):
    # Under DDP the permutation came from the global CUDA generator, which checkpoints do
    # not hold, so a resumed run shuffled differently; now the step's generator draws it.
    def all_gather(parts, tensor):
        for part in parts:
            part.copy_(tensor)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: None)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    images = torch.arange(4.0).reshape(4, 1)
    seen = []

    def encode(batch):  # what the key encoder sees: the shuffled order of both "processes"
        seen.append(batch.flatten().tolist())
        return batch * 10

    global_state = torch.get_rng_state()
    keys = [distributed.shuffled_forward(encode, images, torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global stream untouched
    assert seen[0] == seen[1] and torch.equal(keys[0], keys[1])  # the same draw again
    distributed.shuffled_forward(encode, images, torch.Generator().manual_seed(8))
    assert seen[2] != seen[0]  # another stream, another shuffle


def test_the_epoch_monitors_decode_with_the_loader_workers(tmp_path, monkeypatch):
    # In the main process, a GPU run's kNN monitor decoding the evaluation images took about
    # as long as its training epoch (and every other DDP rank waited).
    calls = []
    evaluate = trainer.evaluate

    def recording(*args, **kwargs):
        calls.append(kwargs.get("num_workers", 0))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", recording)
    _pretrain(tmp_path, "monitor.knn=true", "data.num_workers=1")
    assert calls and all(workers == 1 for workers in calls), calls
