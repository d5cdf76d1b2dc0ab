"""Checkpoints are read as data, never as code (issue 30): a file that carries a Python
object beyond tensors, numbers, strings and containers is refused with one sentence and
nothing in it runs; a malformed one is one sentence, never a traceback; everything
mixmask writes loads with ``weights_only=True``."""

from __future__ import annotations

import copy
import io
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmask.cli import main
from mixmask.config import load_config, save_config
from mixmask.errors import CheckpointError, MixmaskError
from mixmask.methods import build_method
from mixmask.ops.optim import build_optimizer
from mixmask.runs import checkpoint as checkpoint_module
from mixmask.runs.checkpoint import read_checkpoint
from mixmask.runs.folder import build_run_method, load_run_checkpoint
from mixmask.runs.resume import RESUME_KEYS, restore_training_state
from mixmask.train.loop import pretrain

# A tiny run on the built-in synthetic images: no data files needed, seconds to train.
TINY = ["data.dataset=synthetic", "data.subset=64", "data.num_workers=0",
        "data.eval_train_subset=64", "data.eval_test_subset=32", "model.width=0.125",
        "method.name=mocov2", "method.masking=mixmask", "method.mocov2.proj_hidden_dim=32",
        "method.mocov2.queue_size=64", "train.batch_size=16", "train.epochs=1",
        "train.progress_bar=false", "train.plots=none", "monitor.knn=false",
        "monitor.online_probe=true", "eval.knn=false", "eval.linear=false",
        "eval.finetune_epochs=1", "eval.finetune_batch_size=8", "eval.linear_epochs=1"]
TINY_MAE = [*(item for item in TINY if not item.startswith("method.")), "method.name=mae",
            "model.backbone=vit_tiny", "model.patch_size=4"]


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Subprocess(_System):
    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class _Eval(_System):
    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


class _Exec(_System):
    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


PAYLOADS = {"os.system": _System, "subprocess": _Subprocess, "eval": _Eval, "exec": _Exec}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    pretrain(load_config(None, [*TINY, f"out_dir={run}"]))
    return run


def _payload_run(folder: Path, payload: str, overrides: list[str]) -> tuple[Path, Path]:
    """A run folder (config only) whose last.ckpt carries ``payload``; the marker file the
    payload would create."""
    run = folder / "run"
    config = load_config(None, [*overrides, f"out_dir={run}"])
    (run / "checkpoints").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    (run / "metrics.csv").write_text("step,epoch,loss\n1,0,4.5\n")
    marker = folder / "owned"
    torch.save({"method": PAYLOADS[payload](marker), "step": 1},
               run / "checkpoints" / "last.ckpt")
    return run, marker


COMMANDS = {
    "knn": lambda run, out: ["knn", str(run)],
    "linear": lambda run, out: ["linear", str(run), "--protocol", "cached"],
    "finetune": lambda run, out: ["finetune", str(run), "--labels", "10%"],
    "export": lambda run, out: ["export", str(run), "--format", "torchvision", "--out",
                                str(out / "r18.pth")],
    "plot": lambda run, out: ["plot", str(run)],
    "detect": lambda run, out: ["detect", str(run), "--task", "boxes"],
    "segment": lambda run, out: ["segment", str(run), "--head", "linear"],
    "reconstruct": lambda run, out: ["reconstruct", str(run), "--out", str(out / "r.png")],
    "resume": lambda run, out: ["pretrain", str(run / "config.yaml"),
                                f"resume={run / 'checkpoints' / 'last.ckpt'}",
                                f"out_dir={out / 'resumed'}"],
}


def _one_sentence(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_payload_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch,
                                                         command, payload):
    run, marker = _payload_run(tmp_path, payload, TINY_MAE if command == "reconstruct" else TINY)
    capsys.readouterr()
    assert main(COMMANDS[command](run, tmp_path)) == 2
    line = _one_sentence(capsys.readouterr().err)
    assert "not plain data" in line and "What mixmask trusts" in line, line
    assert not marker.exists()


def test_the_payload_test_fails_under_the_old_loader(tmp_path, capsys, monkeypatch):
    # The same check with torch.load's weights_only forced off (the loader before issue 30):
    # the payload runs, so the test above can tell a safe loader from an unsafe one.
    run, marker = _payload_run(tmp_path, "os.system", TINY)
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load",
                        lambda *args, **kwargs: real_load(*args, **{**kwargs,
                                                                    "weights_only": False}))
    main(["knn", str(run)])
    assert marker.exists()


def test_every_checkpoint_written_loads_with_the_safe_loader(trained_run, tmp_path):
    torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert main(["finetune", str(trained_run), "--labels", "10%"]) == 0
    torch.load(trained_run / "eval" / "finetune_10pct" / "last.ckpt", weights_only=True)


def test_a_checkpoint_of_an_earlier_version_still_loads(trained_run, tmp_path):
    # Before issue 30 the versions held torch.__version__ itself, a TorchVersion: the one
    # global the loader allows beyond its defaults.
    from torch.torch_version import TorchVersion

    content = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    content["versions"]["torch"] = TorchVersion(torch.__version__)
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    with pytest.raises(Exception, match="TorchVersion"):
        torch.load(old, weights_only=True)  # the plain safe loader refuses it
    assert read_checkpoint(old)["versions"]["torch"] == torch.__version__


# --------------------------------------------------------------------------- malformed


def _restore(path: Path, run: Path) -> None:
    """Everything resume and the evaluation commands do with a checkpoint's content."""
    config = load_config(run / "config.yaml", [])
    torch.manual_seed(0)
    method = build_method(config, None)
    probe = torch.nn.Linear(method.feature_dim, 10)
    train = config.train
    optimizer = build_optimizer(train.optimizer, method.parameter_groups(train.optimizer),
                                lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay, betas=train.betas,
                                eta=train.lars_eta, clip_lr=train.lars_clip_lr, fused=False)
    probe_optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    restore_training_state(path, config, {"method": method, "probe": probe},
                           {"optimizer": optimizer, "probe_optimizer": probe_optimizer},
                           torch.Generator(), world_size=1, rank=0, say=lambda text: None)
    # A restored optimizer must also survive its first step.
    method.zero_grad()
    for param in method.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    checkpoint_path, content = load_run_checkpoint(run, str(path))
    build_run_method(config, None, checkpoint_path, content)


def _outcome(path: Path, run: Path) -> str:
    """"ok" or the one sentence of a CheckpointError; any other exception fails the test."""
    try:
        _restore(path, run)
    except MixmaskError as error:
        message = str(error)
        assert "\n" not in message and message, message
        return message
    return "ok"


@pytest.fixture(scope="module")
def checkpoint_bytes(trained_run) -> bytes:
    return (trained_run / "checkpoints" / "last.ckpt").read_bytes()


def test_the_unchanged_checkpoint_restores(trained_run, checkpoint_bytes, tmp_path):
    path = tmp_path / "same.ckpt"
    path.write_bytes(checkpoint_bytes)
    assert _outcome(path, trained_run) == "ok"


HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=15, deadline=None, suppress_health_check=HEALTH)
@given(fraction=st.floats(0.0, 0.999))
def test_a_truncated_checkpoint_is_one_sentence(trained_run, checkpoint_bytes, tmp_path,
                                                fraction):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(checkpoint_bytes[:int(len(checkpoint_bytes) * fraction)])
    assert _outcome(path, trained_run) != "ok"


@settings(max_examples=30, deadline=None, suppress_health_check=HEALTH)
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.9999), st.integers(1, 255)), min_size=1,
                      max_size=8))
def test_flipped_bytes_are_one_sentence_or_a_harmless_load(trained_run, checkpoint_bytes,
                                                           tmp_path, flips):
    data = bytearray(checkpoint_bytes)
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(bytes(data))
    _outcome(path, trained_run)


def _paths(value, prefix=()):
    """Every (nested) key path of a checkpoint's mappings and lists, leaves included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


WRONG_KINDS = [7, -3, 2.5, float("nan"), "seven", True, None, [1, "a"], {"nested": {"x": 1}},
               torch.zeros(3), torch.ones(2, 2, dtype=torch.int64), (1, 2)]


@pytest.fixture(scope="module")
def checkpoint_content(checkpoint_bytes) -> dict:
    return torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(data=st.data())
def test_fields_of_the_wrong_kind_are_one_sentence_or_a_harmless_load(
        trained_run, checkpoint_content, tmp_path, data):
    paths = [path for path in _paths(checkpoint_content) if path]
    # Top-level keys are most of what a wrong file gets wrong: draw them as often as the rest.
    top = [path for path in paths if len(path) == 1]
    key_path = data.draw(st.one_of(st.sampled_from(top), st.sampled_from(paths)))
    replacement = data.draw(st.sampled_from(WRONG_KINDS))
    content = copy.deepcopy(checkpoint_content)
    parent = content
    for key in key_path[:-1]:
        parent = parent[key]
    if isinstance(parent, tuple):
        return  # immutable (betas): replaced through its own key path's parent instead
    parent[key_path[-1]] = replacement
    path = tmp_path / "wrong.ckpt"
    torch.save(content, path)
    _outcome(path, trained_run)


@pytest.mark.parametrize("key, value, expected", [
    ("step", "seven", "'step' should be an integer"),
    ("method", [1, 2], "'method' should be a state dict"),
    ("optimizer", {"state": {}}, "'optimizer' should be an optimizer state"),
    ("generator", torch.zeros(4), "'generator' should be a random-number state"),
    ("rank_states", [{"generator": 3}], "'rank_states' should be a list of per-process"),
])
def test_a_field_of_the_wrong_kind_is_named(trained_run, checkpoint_content, tmp_path, key,
                                            value, expected):
    content = dict(checkpoint_content, **{key: value})
    path = tmp_path / "wrong.ckpt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path, required=RESUME_KEYS)


def test_an_optimizer_state_of_other_shapes_is_refused_before_the_first_step(
        trained_run, checkpoint_content, tmp_path):
    content = copy.deepcopy(checkpoint_content)
    first = next(iter(content["optimizer"]["state"]))
    content["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3, 3)
    path = tmp_path / "shapes.ckpt"
    torch.save(content, path)
    assert "has shape (3, 3)" in _outcome(path, trained_run)


def test_a_generator_state_from_another_device_type_is_one_sentence(
        trained_run, checkpoint_content, tmp_path):
    # A CUDA generator's state is 16 bytes; a CPU run cannot continue its streams.
    content = dict(checkpoint_content, generator=torch.zeros(16, dtype=torch.uint8))
    path = tmp_path / "cuda.ckpt"
    torch.save(content, path)
    assert "saved on another device type" in _outcome(path, trained_run)


def test_a_cifar_batch_file_with_a_payload_is_never_unpickled(tmp_path):
    # CIFAR's python batches are pickles; torchvision unpickles them only after their MD5
    # matches the official release, so a crafted file is "corrupt" and runs nothing.
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    from mixmask.data.datasets import load_image_set
    from mixmask.errors import DatasetError

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    marker = tmp_path / "owned"
    for file_name, _ in tv_cifar.CIFAR10.train_list + tv_cifar.CIFAR10.test_list:
        (base / file_name).write_bytes(pickle.dumps(_System(marker)))
    (base / "batches.meta").write_bytes(pickle.dumps(_System(marker)))
    with pytest.raises(DatasetError, match="not found or is corrupt"):
        load_image_set("cifar10", str(tmp_path), "test")
    assert not marker.exists()
