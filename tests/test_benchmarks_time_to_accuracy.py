"""Smoke tests of benchmarks/time_to_accuracy.py on tiny runs, and of its --peer lightly
comparison (the lightly parts skip where lightly, a benchmark-only package, is absent)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from helpers import ROOT
from scripts import load_script

from mixmask.config import load_config
from mixmask.train.fabric import native_bf16


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


# --------------------------------------------------------------------------- --peer lightly

TINY = ["model.width=0.125", "train.batch_size=16", "method.mocov2.queue_size=64",
        "method.mocov2.proj_hidden_dim=32", "data.num_workers=0", "train.device=cpu"]


def test_peer_lightly_without_lightly_exits_2_with_one_sentence(monkeypatch, capsys):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy.py", "--peer", "lightly"])
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message == benchmark.LIGHTLY_MISSING and "pip install" in message
    assert "\n" not in message


def test_lightly_moco_v2_trains_a_few_steps_on_real_cifar_and_measures_knn(cifar10_tarball):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    config = load_config(benchmark.CONFIG, [*TINY, f"data.root={cifar10_tarball}",
                                            "data.subset=64", "data.eval_train_subset=64",
                                            "data.eval_test_subset=32"])
    row = benchmark.lightly_moco_v2(config, budget_s=1e6, max_steps=3, num_workers=0)
    assert row["pipeline"] == "lightly MoCo v2"
    assert row["steps"] == 3 and row["epochs"] == pytest.approx(3 / 4)  # 64 images / 16
    assert math.isfinite(row["knn_top1"]) and 0 <= row["knn_top1"] <= 100
    assert row["images_per_s"] > 0 and math.isfinite(row["last_loss"])
    assert 0 < row["train_s"] <= row["wall_s"]


def test_a_budget_stops_a_mixmask_run_at_a_step_boundary_with_its_checkpoint(tmp_path):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    config = load_config(benchmark.CONFIG, [
        *TINY, *benchmark.PEER_TRAINING_ONLY, "data.dataset=synthetic", "data.subset=64",
        "data.eval_train_subset=32", "data.eval_test_subset=16", "train.epochs=50",
        "train.progress_bar=false", f"out_dir={tmp_path / 'run'}"])
    handler_before = signal.getsignal(signal.SIGTERM)
    # A zero budget: the stop is sent as soon as the engine's handler is in place.
    row = benchmark.mixmask_run(config, "mixmask MixMask", budget_s=0.0)
    assert row["stopped_by_budget"] is True
    assert 1 <= row["steps"] < 50 * 4  # stopped long before the schedule's end
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert math.isfinite(row["knn_top1"]) and row["images_per_s"] > 0
    # The process's SIGTERM handler is back to what it was.
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_peer_lightly_prints_the_table_and_writes_the_json(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setattr(sys, "argv", [
        "time_to_accuracy.py", "--peer", "lightly", "--budget-s", "1e6", "--out", str(tmp_path),
        *TINY, "data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
        "data.eval_test_subset=16", "train.max_steps=2"])
    benchmark.main()
    shown = capsys.readouterr().out
    result = json.loads((tmp_path / "lightly_seed0.json").read_text())
    pipelines = ["lightly MoCo v2", "mixmask MoCo v2", "mixmask MixMask"]
    assert [row["pipeline"] for row in result["rows"]] == pipelines
    assert all(name in shown for name in pipelines) and "kNN top-1" in shown
    assert all(row["steps"] == 2 and row["epochs"] == 1.0 for row in result["rows"])
    assert all(math.isfinite(row["knn_top1"]) for row in result["rows"])
    # One epoch of two steps: one point per kNN curve, at the final weights' kNN; lightly
    # in fp32, ours as train.precision=auto resolved it here.
    assert all(len(row["curve"]) == 1 and row["curve"][0]["knn_top1"] == row["knn_top1"]
               for row in result["rows"])
    expected = [("32", "bf16" if native_bf16("cpu") else "32")[pipeline != pipelines[0]]
                for pipeline in pipelines]
    assert [row["precision"] for row in result["rows"]] == expected
    assert result["comparison"]["target_knn"] == min(
        result["rows"][0]["knn_top1"], result["rows"][1]["knn_top1"])
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert result["machine"]["versions"]["lightly"]
    assert result["settings"]["knn"] == {"k": 200, "temperature": 0.1, "bank_images": 32,
                                         "test_images": 16}


def test_the_peer_comparison_reads_both_curves_as_the_hand_values():
    """Time to the kNN both reach (the lower final kNN, first epoch at or above it) and
    lightly's kNN after ours' training time, on hand-made curves."""
    benchmark = load_script("benchmarks/time_to_accuracy.py")

    def row(name, points, precision):
        return {"pipeline": name, "precision": precision,
                "curve": [{"epoch": i + 1.0, "train_s": t, "knn_top1": k}
                          for i, (t, k) in enumerate(points)]}
    lightly = row("lightly MoCo v2", [(100, 20.0), (200, 30.0), (300, 35.0), (400, 36.0)], "32")
    ours = row("mixmask MoCo v2", [(70, 21.0), (140, 29.0), (210, 34.0), (280, 35.5)], "bf16")
    found = benchmark.peer_comparison([lightly, ours])
    # Both reach 35.5: lightly at its 4th epoch (400 s), ours at its 4th (280 s).
    assert found["target_knn"] == 35.5
    assert (found["lightly_s"], found["ours_s"]) == (400, 280)
    assert found["speedup"] == pytest.approx(400 / 280)
    # After ours' 280 s lightly had finished 2 epochs: kNN 30.
    assert found["lightly_knn_at_ours_time"] == 30.0 and found["ours_precision"] == "bf16"
    assert benchmark.peer_comparison([lightly]) is None


def test_summarise_tabulates_every_seed_with_mean_and_spread(tmp_path):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    for seed, (speedup, knn) in enumerate([(1.4, 35.0), (1.6, 37.0)]):
        rows = [{"pipeline": "lightly MoCo v2", "precision": "32", "images_per_s": 100.0,
                 "knn_top1": knn, "train_s": 200.0}]
        comparison = {"target_knn": knn, "lightly_s": 140.0 * speedup, "ours_s": 140.0,
                      "speedup": speedup, "ours_knn": knn, "lightly_knn_at_ours_time": None}
        (tmp_path / f"lightly_seed{seed}.json").write_text(json.dumps(
            {"settings": {"seed": seed}, "rows": rows, "comparison": comparison}))
    table = benchmark.summarise_peer(tmp_path)
    assert "| lightly MoCo v2 | 32 | 100.00 ± 0.00 | 36.00 ± 1.41 | 200.00 ± 0.00 |" in table
    assert "| speed-up at equal kNN (lightly time / ours) | 1.50 ± 0.14 |" in table
    assert "| lightly: kNN after as much training time | - |" in table
