"""Smoke test of benchmarks/time_to_accuracy.py on a tiny synthetic run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_accuracy_writes_the_per_epoch_curve(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"),
               "data.dataset=synthetic", "data.subset=32", "train.epochs=2", "model.width=0.125",
               "train.batch_size=16", "data.eval_train_subset=32", "data.eval_test_subset=16",
               "data.num_workers=0", "method.mocov2.proj_hidden_dim=32",
               "--budget-s", "1e6", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "within 1000000 s" in completed.stdout
    result = json.loads((tmp_path / "cpu_seed0.json").read_text())
    assert [row["epoch"] for row in result["epochs"]] == [1.0, 2.0]
    walls = [row["wall_time_s"] for row in result["epochs"]]
    assert 0 < walls[0] < walls[1]
    assert all(0 <= row["knn_top1"] <= 100 for row in result["epochs"])
    assert result["reached"]["epoch"] == 2.0
