"""No bad checkpoint is ever called good, every stop resumes exactly, and user mistakes
get one sentence and exit code 2: real runs on real CIFAR-10 images, real signals."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import ROOT
from torch import nn

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.errors import CheckpointError, ConfigError
from mixmask.methods import Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.runs.checkpoint import nonfinite_tensors
from mixmask.train.loop import pretrain

TINY = {
    "method": {"name": "mocov2", "masking": "mixmask",
               "mocov2": {"proj_hidden_dim": 64, "queue_size": 256, "symmetric": False}},
    "data": {"subset": 128, "num_workers": 0, "eval_train_subset": 128,
             "eval_test_subset": 64},
    "model": {"width": 0.125},
    "train": {"batch_size": 32, "epochs": 4, "progress_bar": False, "log_every": 1,
              "checkpoint_every": 1, "plots": "curves"},
    "monitor": {"knn": False, "online_probe": False},
    "eval": {"knn": False, "linear": False},
}


def write_config(tmp_path: Path, root: Path, **sections) -> Path:
    raw = {key: dict(value) for key, value in TINY.items()}
    raw["data"]["root"] = str(root)
    raw["out_dir"] = str(tmp_path / "run")
    for section, values in sections.items():
        # A method section replaces the default one (its keys belong to that method).
        raw[section] = dict(values) if section == "method" else {**raw[section], **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def checkpoint_files(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("*"))


def test_divergence_after_a_checkpoint_names_it_and_writes_nothing_non_finite(
        tmp_path, capsys, cifar10_tarball):
    # Warm-up from a small lr to a huge one: epoch 1 trains, then the weights blow up.
    config = write_config(tmp_path, cifar10_tarball,
                          train={"lr": 1e5, "warmup_epochs": 3, "epochs": 4})
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "training diverged by step" in err and "Traceback" not in err
    assert f"The last good checkpoint is {run / 'checkpoints' / 'last.ckpt'} (step 4)" in err
    files = checkpoint_files(run)
    assert [path.name for path in files] == ["epoch=1.ckpt", "last.ckpt"]
    for path in files:
        assert nonfinite_tensors(torch.load(path, weights_only=True)["method"]) == []


def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path, capsys,
                                                             cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, train={"lr": 1e5, "epochs": 2},
                          data={"subset": 640})  # 20 steps per epoch: diverges in epoch 1
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    assert "No checkpoint had been saved yet" in err and "Traceback" not in err
    assert checkpoint_files(tmp_path / "run") == []


@dataclass
class FlakyLossConfig:
    nan_every: int = 3  # every third step's loss is NaN


@register_method("flaky_loss")
class FlakyLoss(Method):
    """A one-view regression whose loss is NaN on every ``nan_every``-th call: a stand-in
    for the occasional bad batch that ``train.on_nonfinite=skip`` is for. (The count is a
    plain attribute: a skipped step restores the buffers its forward changed.)"""

    config_class = FlakyLossConfig
    num_views = 1

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        self.head = nn.Linear(self.feature_dim, 3)
        self.calls = 0

    def training_step(self, batch, generator, progress=0.0):
        images = batch.views[0]
        features = self.backbone(images)
        loss = F.mse_loss(self.head(features), images.mean(dim=(2, 3)))
        self.calls += 1
        if self.calls % self.run_config.method.params.nan_every == 0:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach()}, features.detach())


def test_skip_mode_drops_non_finite_steps_and_counts_them(tmp_path, capsys, cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, method={"name": "flaky_loss"},
                          train={"on_nonfinite": "skip", "epochs": 3, "lr": 0.01})
    assert main(["pretrain", str(config)]) == 0
    run = tmp_path / "run"
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped_steps"] == 4  # steps 3, 6, 9, 12
    assert "4 non-finite steps skipped" in capsys.readouterr().out
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert nonfinite_tensors(state["method"]) == [] and state["skipped_steps"] == 4
    # The same method in stop mode ends at its first NaN.
    (tmp_path / "stop").mkdir()
    stop = write_config(tmp_path / "stop", cifar10_tarball, method={"name": "flaky_loss"},
                        train={"epochs": 3, "lr": 0.01})
    assert main(["pretrain", str(stop)]) == 2
    assert "the loss became nan" in capsys.readouterr().err


def test_evaluation_and_resume_refuse_a_non_finite_checkpoint(tmp_path, capsys,
                                                              cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, train={"epochs": 1})
    assert main(["pretrain", str(config)]) == 0
    run = tmp_path / "run"
    content = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    content["method"]["backbone.bn1.running_var"][0] = float("nan")
    bad = tmp_path / "bad.ckpt"
    torch.save(content, bad)
    assert main(["knn", str(run), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "non-finite values" in err and "backbone.bn1.running_var" in err
    with pytest.raises(CheckpointError, match="non-finite values"):
        pretrain(load_config(config, [f"resume={bad}", f"out_dir={tmp_path / 'other'}"]))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"garbage")
    assert main(["knn", str(run), "--checkpoint", str(corrupt)]) == 2
    assert "--checkpoint PATH" in capsys.readouterr().err


def test_a_checkpoint_of_another_head_size_names_the_keys_and_shapes(tmp_path, capsys,
                                                                     cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, train={"epochs": 1})
    assert main(["pretrain", str(config)]) == 0
    assert main(["knn", str(tmp_path / "run"), "method.mocov2.proj_output_dim=16"]) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "projector.2.weight (128, 64) vs (16, 64)" in err
    assert main(["knn", str(tmp_path / "run"), "method.name=byol"]) == 2
    err = capsys.readouterr().err
    assert "missing keys: projector.1.weight" in err and "unexpected keys: queue" in err


@pytest.mark.parametrize("override", ["train.lr=-0.1", "train.weight_decay=-1",
                                      "train.momentum=1.5", "train.epochs=0",
                                      "eval.linear_lr=0", "monitor.knn_temperature=0",
                                      "train.betas=[0.9, 1.2]", "train.checkpoint_every_steps=-1"])
def test_numeric_ranges_are_validated_before_anything_is_written(tmp_path, capsys, override):
    assert main(["pretrain", "configs/quickstart.yaml", override,
                 f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_dataset_writes_no_run_folder(tmp_path, cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, train={"batch_size": 256})
    with pytest.raises(ConfigError, match="fewer than one batch"):
        pretrain(load_config(config))
    assert not (tmp_path / "run").exists()


def _read_rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    timing = ("images_per_s", "wall_time_s")
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_stops_at_a_step_boundary_and_resumes_exactly(
        tmp_path, cifar10_tarball, signum):
    """Ctrl-C (SIGINT to the whole process group, DataLoader workers included) or SIGTERM
    mid-epoch: the run saves at the next step boundary and exits 2; resume=auto then ends
    with the uninterrupted run's weights, bit for bit, and its metrics rows."""
    sections = dict(data={"subset": 320, "num_workers": 1},  # 10 steps per epoch
                    train={"epochs": 2, "checkpoint_every": 0},
                    monitor={"knn": True, "online_probe": True, "knn_every": 1})
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = write_config(reference_dir, cifar10_tarball, **sections)
    pretrain(load_config(reference))

    stopped_dir = tmp_path / "stopped"
    stopped_dir.mkdir()
    config = write_config(stopped_dir, cifar10_tarball, **sections)
    run = stopped_dir / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([sys.executable, "-m", "mixmask.cli", "pretrain", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) > 4:  # past step 3
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # as a terminal's Ctrl-C: every process of the group
    else:
        process.send_signal(signum)
    _out, err = process.communicate(timeout=240)
    assert process.returncode == 2, err
    assert f"stopped by {signal.Signals(signum).name} after step" in err
    assert "Traceback" not in err
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 3 <= saved["step"] < 20 and saved["step"] % 10, saved["step"]  # mid-epoch

    pretrain(load_config(config, ["resume=auto"]))
    expected = torch.load(reference_dir / "run" / "checkpoints" / "last.ckpt",
                          weights_only=True)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for part in ("method", "probe"):
        for name, value in expected[part].items():
            if torch.is_tensor(value):
                assert torch.equal(final[part][name], value), (part, name)
    assert torch.equal(final["generator"], expected["generator"])
    assert _read_rows(run) == _read_rows(reference_dir / "run")


def test_checkpoint_every_steps_saves_mid_epoch_and_resumes(tmp_path, cifar10_tarball,
                                                             monkeypatch):
    import mixmask.train.trainer

    saves = []
    original = mixmask.train.trainer.Trainer.save_checkpoint

    def recording(run, name):
        saves.append((name, run.state["step"]))
        original(run, name)

    monkeypatch.setattr(mixmask.train.trainer.Trainer, "save_checkpoint", recording)
    config = write_config(tmp_path, cifar10_tarball,
                          train={"epochs": 2, "checkpoint_every_steps": 3, "max_steps": 7,
                                 "checkpoint_every": 0})
    pretrain(load_config(config))  # 4 steps per epoch, stopped at step 7
    assert saves == [("last.ckpt", 3), ("last.ckpt", 4), ("last.ckpt", 6), ("last.ckpt", 7)]
    summary = pretrain(load_config(config, ["resume=auto", "train.max_steps=0"]))
    assert summary["steps"] == 8 and saves[-1] == ("last.ckpt", 8)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped with the reason elsewhere)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'no root'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_one_sentence_and_leaves_no_partial_file(tmp_path, small_disk, capsys,
                                                                cifar10_tarball):
    config = write_config(tmp_path, cifar10_tarball, train={"epochs": 1})
    run = small_disk / "run"
    assert main(["pretrain", str(config), f"out_dir={run}", "train.log_every=100"]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "MiB are free" in err and "Traceback" not in err
    assert list((run / "checkpoints").glob("*")) == []  # no .partial left to fill the disk


def test_an_out_dir_that_is_a_file_or_read_only_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out_dir in (a_file, a_file / "run"):
        assert main(["pretrain", "configs/quickstart.yaml", f"out_dir={out_dir}"]) == 2
        err = capsys.readouterr().err
        assert "is a file, not a folder" in err and "Traceback" not in err
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                             str(read_only)], capture_output=True)
    if result.returncode != 0:
        read_only.chmod(0o500)
        if os.access(read_only, os.W_OK):  # root ignores modes: no read-only folder here
            pytest.skip("no read-only folder can be made here (root, no mount)")
    try:
        assert main(["pretrain", "configs/quickstart.yaml",
                     f"out_dir={read_only / 'run'}"]) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False, capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_under_torchrun_train_as_two_local_processes(tmp_path):
    """Multi-node DDP on the existing engine: two torchrun invocations (--nnodes 2, one
    gloo process each, rendezvous on localhost) with train.num_nodes=2 train the model that
    train.devices=2 trains on one node, to float tolerance (torchrun sets one OpenMP thread
    per process, so CPU reductions may round differently)."""
    common = ["configs/quickstart.yaml", "model.width=0.125", "method.mocov2.proj_hidden_dim=64",
              "method.mocov2.queue_size=256", "train.batch_size=32", "data.num_workers=0",
              "train.progress_bar=false", "data.dataset=synthetic", "data.subset=128",
              "train.epochs=1", "train.device=cpu", "eval.linear=false", "eval.knn=false",
              "monitor.knn=false", "monitor.online_probe=false", "train.plots=curves"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = _free_port()
    nodes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "mixmask.cli",
         "pretrain", *common, "train.num_nodes=2", f"out_dir={tmp_path / 'nodes'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    local = subprocess.run([str(Path(sys.executable).with_name("mixmask")), "pretrain", *common,
                            "train.devices=2", f"out_dir={tmp_path / 'local'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    import json

    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    multi = torch.load(tmp_path / "nodes/checkpoints/last.ckpt", weights_only=True)["method"]
    single = torch.load(tmp_path / "local/checkpoints/last.ckpt", weights_only=True)["method"]
    for name, value in single.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(multi[name], value, rtol=1e-3, atol=1e-3, msg=name)


def test_sync_batchnorm_on_cpu_processes_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "configs/quickstart.yaml", "train.device=cpu", "train.devices=2",
                 "train.sync_batchnorm=true", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "needs CUDA GPUs" in err and "Traceback" not in err


def test_a_corrupt_image_met_in_training_is_one_sentence_and_the_run_is_saved(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images" / "train" / "only"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(96):  # over 96 px: the files stay on disk, decoded by the workers
        pixels = torch.randint(0, 255, (100, 100, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index:03d}.png")
    (folder / "050.png").write_bytes(b"not a png")  # met in epoch 1, after some steps
    config = write_config(tmp_path, tmp_path / "images",
                          data={"dataset": "imagefolder", "num_workers": 1, "subset": 0,
                                "image_size": 32},
                          train={"epochs": 2, "batch_size": 8})
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Could not read image" in err and "050.png" in err
    assert "Traceback" not in err and "worker" not in err
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["step"] < 12 and f"saved at step {saved['step']}" in err


def test_every_unreadable_small_image_is_named_at_once(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images" / "train" / "only"
    folder.mkdir(parents=True)
    for index in range(8):
        Image.new("RGB", (32, 32), (index * 30, 0, 0)).save(folder / f"{index}.png")
    for index in (2, 5):
        (folder / f"{index}.png").write_bytes(b"broken")
    config = write_config(tmp_path, tmp_path / "images", data={"dataset": "imagefolder"})
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 images could not be read" in err and "2.png" in err and "5.png" in err
