"""Profile a window of training steps: a trace to read in Perfetto, and how busy the
device was (``train.profile_steps``).

Busy share: the part of the window during which the device ran at least one kernel, copy
or memset (overlapping ones counted once), over the window from the first one's start to
the last one's end. On a GPU this is what "GPU busy" means in the speed targets: the gaps
are time the GPU waited for the host (Python, kernel launches, data, host-device syncs).
On the CPU the same share is taken over torch's operators: the rest of the window is
Python and framework overhead between them.

On CUDA only device activity is recorded (no CPU operator events), so the profiler adds
little host work to the steps it measures. (Without a GPU, torch's Kineto profiler logs a
harmless "gpuGetDeviceCount failed" line when the window closes.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

# Chrome-trace categories (torch.profiler / Kineto) of work on the device, and of torch's
# operators on the CPU.
GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
CPU_CATEGORIES = frozenset({"cpu_op"})


def busy_fraction(intervals: Iterable[tuple[float, float]]) -> float | None:
    """Share of the span [first start, last end] covered by at least one (start, end)
    interval; overlapping and nested intervals count once. None without intervals or for a
    span of zero length."""
    ordered = sorted((start, end) for start, end in intervals if end >= start)
    if not ordered:
        return None
    span_start = ordered[0][0]
    span_end = max(end for _, end in ordered)
    if span_end <= span_start:
        return None
    covered = 0.0
    run_start, run_end = ordered[0]
    for start, end in ordered[1:]:
        if start > run_end:  # a gap: close the current run of overlapping intervals
            covered += run_end - run_start
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    covered += run_end - run_start
    return covered / (span_end - span_start)


def trace_intervals(trace: dict, categories: frozenset[str]) -> list[tuple[float, float]]:
    """(start, end) in microseconds of the complete events of these categories in a Chrome
    trace (the JSON torch.profiler's ``export_chrome_trace`` writes)."""
    intervals = []
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and str(event.get("cat", "")).lower() in categories:
            start = float(event["ts"])
            intervals.append((start, start + float(event.get("dur", 0.0))))
    return intervals


class StepProfiler:
    """torch.profiler over training steps [start_step, start_step + steps): writes
    ``out_dir/trace.json`` and ``out_dir/summary.json`` when the window closes."""

    def __init__(self, out_dir: Path, device: torch.device, start_step: int, steps: int):
        self.out_dir, self.device = Path(out_dir), device
        self.start_step, self.end_step = start_step, start_step + steps
        self._profiler: torch.profiler.profile | None = None
        self._first_step = 0
        self.summary: dict | None = None

    def before_step(self, step: int) -> None:
        """Call before running step ``step`` (0-based global step)."""
        if self._profiler is None and self.summary is None and (
                self.start_step <= step < self.end_step):
            activity = (torch.profiler.ProfilerActivity.CUDA if self.device.type == "cuda"
                        else torch.profiler.ProfilerActivity.CPU)
            self._synchronize()  # earlier steps' work stays out of the window
            self._profiler = torch.profiler.profile(activities=[activity])
            self._profiler.start()
            self._first_step = step

    def after_step(self, steps_done: int) -> dict | None:
        """Call after a step, with the number of steps done; returns the summary when this
        step closed the window."""
        if self._profiler is not None and steps_done >= self.end_step:
            return self.close(steps_done)
        return None

    def close(self, steps_done: int) -> dict | None:
        """Stop early (the run ended inside the window); the summary covers the steps run."""
        if self._profiler is None:
            return None
        self._synchronize()
        self._profiler.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace_path = self.out_dir / "trace.json"
        self._profiler.export_chrome_trace(str(trace_path))
        self._profiler = None
        trace = json.loads(trace_path.read_text())
        on_gpu = self.device.type == "cuda"
        intervals = trace_intervals(trace, GPU_CATEGORIES if on_gpu else CPU_CATEGORIES)
        busy = busy_fraction(intervals)
        span_us = (max(end for _, end in intervals) - min(start for start, _ in intervals)
                   if intervals else None)
        steps = steps_done - self._first_step
        self.summary = {
            "first_step": self._first_step, "steps": steps, "device": str(self.device),
            "busy_fraction": busy,
            "busy_of": ("GPU kernels, copies and memsets" if on_gpu else "torch CPU operators"),
            "window_s": span_us / 1e6 if span_us is not None else None,
            "seconds_per_step": span_us / 1e6 / steps if span_us is not None and steps else None,
            "trace": trace_path.name,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return self.summary

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
