"""train.logger=wandb: the run's rows reach Weights & Biases (a stand-in module records
the calls; wandb itself is an optional extra), offline by default, and a missing wandb is
one sentence and exit 2 before anything is written."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

from mixmask.cli import main

RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
TINY = ["data.dataset=synthetic", "data.subset=32", "data.num_workers=0", "model.width=0.125",
        "method.mocov2.proj_hidden_dim=32", "method.mocov2.queue_size=64",
        "train.batch_size=16", "train.epochs=1", "train.log_every=1",
        "train.progress_bar=false", "train.plots=none", "monitor.knn=false",
        "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
        "eval.compare_random_init=false", "train.logger=wandb"]


class _FakeRun:
    def __init__(self, calls, **settings):
        self.calls, calls["init"] = calls, settings
        calls["log"], calls["finished"] = [], False

    def log(self, scalars, step):
        self.calls["log"].append((step, dict(scalars)))

    def finish(self):
        self.calls["finished"] = True


def _fake_wandb(calls) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.init = lambda **settings: _FakeRun(calls, **settings)
    return module


def test_every_metrics_row_reaches_wandb_offline(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    run = tmp_path / "run"
    assert main(["pretrain", RECIPE, *TINY, f"out_dir={run}"]) == 0
    init = calls["init"]
    assert (init["mode"], init["project"], init["name"], init["dir"]) == (
        "offline", "mixmask", "run", str(run))
    assert init["config"]["train"]["logger"] == "wandb"
    assert init["id"] == (run / "wandb_id.txt").read_text()
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [step for step, _ in calls["log"]] == [int(row["step"]) for row in rows]
    first_step, first = calls["log"][0]
    assert first["loss"] == float(rows[0]["loss"]) and "step" not in first
    assert calls["finished"]


def test_missing_wandb_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run = tmp_path / "run"
    assert main(["pretrain", RECIPE, *TINY, f"out_dir={run}"]) == 2
    error = capsys.readouterr().err
    assert "pip install 'mixmask[wandb]'" in error and "Traceback" not in error
    assert not run.exists()
