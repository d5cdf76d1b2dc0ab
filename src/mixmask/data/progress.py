"""Progress bars (rich) with a rate and ETA for every long step: dataset unpacking and
decoding, feature extraction (evaluation commands and pretraining's kNN monitor), linear
and finetune epochs. Off (``train.progress_bar=false``, or ``mixmask --quiet``), nothing
is drawn; the callers print one plain line per epoch either way."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Items per second in the step's own unit (img/s, MB/s)."""

    def __init__(self, unit: str, scale: float = 1.0):
        super().__init__()
        self.unit, self.scale = unit, scale

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:  # rich needs two updates for its own estimate
            speed = task.completed / task.elapsed
        return Text("" if speed is None else f"{speed / self.scale:,.0f} {self.unit}/s")


class _Size(ProgressColumn):
    """Done / total in the step's unit (whole MB for byte counts)."""

    def __init__(self, unit: str, scale: float):
        super().__init__()
        self.unit, self.scale = unit, scale

    def render(self, task) -> Text:
        total = "?" if task.total is None else f"{task.total / self.scale:,.0f}"
        return Text(f"{task.completed / self.scale:,.0f}/{total} {self.unit}")


@contextlib.contextmanager
def image_progress(description: str, total: int, *, enabled: bool,
                   console: Console | None = None, progress: Progress | None = None,
                   unit: str = "img") -> Iterator[Callable[[int], None]]:
    """A bar over ``total`` items; yields ``advance(items)``.

    ``progress``: a live display already on screen (pretraining's bar); the bar is added
    to it as a task and removed at the end, since rich shows one live display at a time.
    ``unit="MB"`` counts bytes and shows megabytes."""
    if progress is not None:
        # status: the field pretraining's bar shows (its loss); empty for this task.
        task = progress.add_task(description, total=total, visible=enabled, status="")
        try:
            yield lambda items: progress.advance(task, items)
        finally:
            progress.remove_task(task)
        return
    scale = 1e6 if unit == "MB" else 1.0
    size = MofNCompleteColumn() if unit == "img" else _Size(unit, scale)
    with Progress(TextColumn("{task.description}"), BarColumn(), size, _Rate(unit, scale),
                  TimeRemainingColumn(), console=console, disable=not enabled,
                  transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda items: bar.advance(task, items)
