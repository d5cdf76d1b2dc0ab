"""Profiling a window of training steps: the busy share, the trace parsing, the engine hook."""

import json
import random

import pytest
import torch

from mixmask.config import load_config
from mixmask.errors import ConfigError
from mixmask.train.loop import pretrain
from mixmask.train.profiling import (
    CPU_CATEGORIES,
    GPU_CATEGORIES,
    StepProfiler,
    busy_fraction,
    trace_intervals,
)


def test_busy_fraction_on_hand_computed_cases():
    # Span 0-6; covered: [0, 3] (two overlapping) and [5, 6] (with one nested inside): 4 / 6.
    assert busy_fraction([(5, 6), (0, 2), (5.5, 5.8), (1, 3)]) == pytest.approx(4 / 6)
    assert busy_fraction([(2, 7)]) == 1.0
    assert busy_fraction([(0, 1), (1, 2)]) == 1.0  # touching: no gap
    assert busy_fraction([(0, 1), (9, 10)]) == pytest.approx(0.2)
    assert busy_fraction([]) is None
    assert busy_fraction([(3, 3)]) is None  # a zero-length span


def test_busy_fraction_matches_counting_covered_grid_cells():
    rng = random.Random(0)
    for _ in range(50):
        intervals = []
        for _ in range(rng.randint(1, 12)):
            start = rng.randrange(0, 200)
            intervals.append((start, start + rng.randrange(0, 40)))
        first = min(start for start, _ in intervals)
        last = max(end for _, end in intervals)
        if last == first:
            continue
        # Integer endpoints: unit cell [t, t + 1) is busy iff some interval covers it.
        covered = sum(any(start <= t and t + 1 <= end for start, end in intervals)
                      for t in range(first, last))
        assert busy_fraction(intervals) == pytest.approx(covered / (last - first))


def test_trace_intervals_keeps_complete_events_of_the_categories():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "conv", "ts": 100.0, "dur": 20.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 130, "dur": 5},
        {"ph": "X", "cat": "Kernel", "name": "relu", "ts": 140, "dur": 1},  # case-insensitive
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90, "dur": 3},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 95, "dur": 4},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 150},  # instant: no duration
        {"ph": "M", "name": "process_name"},
    ]}
    assert trace_intervals(trace, GPU_CATEGORIES) == [(100.0, 120.0), (130.0, 135.0),
                                                      (140.0, 141.0)]
    assert trace_intervals(trace, CPU_CATEGORIES) == [(95.0, 99.0)]
    assert trace_intervals({}, GPU_CATEGORIES) == []


def test_step_profiler_records_only_its_window_on_the_cpu(tmp_path):
    profiler = StepProfiler(tmp_path / "profile", torch.device("cpu"), start_step=2, steps=3)
    x = torch.randn(64, 64)
    summary = None
    for step in range(8):
        profiler.before_step(step)
        # Before the window: cos; inside: sin; after: tanh. Only sin may be in the trace.
        op = torch.cos if step < 2 else torch.sin if step < 5 else torch.tanh
        for _ in range(5):
            x = op(x @ x.T / 64)
        summary = profiler.after_step(step + 1) or summary
    assert summary is not None and summary == profiler.summary
    assert summary["first_step"] == 2 and summary["steps"] == 3
    assert 0 < summary["busy_fraction"] <= 1 and summary["busy_of"] == "torch CPU operators"
    assert summary["window_s"] > 0
    names = {event.get("name") for event in json.loads(
        (tmp_path / "profile" / "trace.json").read_text())["traceEvents"]}
    assert "aten::sin" in names and "aten::cos" not in names and "aten::tanh" not in names
    assert json.loads((tmp_path / "profile" / "summary.json").read_text()) == summary


TINY = ["data.dataset=synthetic", "data.subset=64", "train.batch_size=16", "model.width=0.125",
        "method.mocov2.proj_hidden_dim=32", "method.mocov2.queue_size=64",
        "method.masking=mixmask", "data.num_workers=0", "train.progress_bar=false",
        "monitor.knn=false", "monitor.online_probe=false", "eval.knn=false"]


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_pretrain_profiles_the_configured_steps(tmp_path, pipeline):
    config = load_config(None, [*TINY, f"data.pipeline={pipeline}", "train.epochs=2",
                                "train.profile_start_step=1", "train.profile_steps=2",
                                f"out_dir={tmp_path / 'run'}"])
    summary = pretrain(config)
    profile = json.loads((tmp_path / "run" / "profile" / "summary.json").read_text())
    assert profile["first_step"] == 1 and profile["steps"] == 2
    assert 0 < profile["busy_fraction"] <= 1
    assert summary["profile"] == profile and summary["steps"] == 8
    names = {event.get("name") for event in json.loads(
        (tmp_path / "run" / "profile" / "trace.json").read_text())["traceEvents"]}
    assert "aten::convolution" in names


def test_a_run_that_ends_inside_the_window_reports_the_steps_it_ran(tmp_path):
    config = load_config(None, [*TINY, "train.epochs=1", "train.profile_start_step=2",
                                "train.profile_steps=100", f"out_dir={tmp_path / 'run'}"])
    summary = pretrain(config)
    assert summary["profile"]["first_step"] == 2 and summary["profile"]["steps"] == 2


def test_profiling_is_off_by_default_and_validated():
    assert load_config(None).train.profile_steps == 0  # test_engine: no profile/ folder then
    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_config(None, ["train.profile_steps=-1"])
