"""Progress bars (rich) with images/s and ETA for the long steps outside pretraining's own
bar: feature extraction, linear and finetune epochs. Off (``train.progress_bar=false``),
nothing is drawn; the callers print one plain line per epoch either way."""

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


class _ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} img/s")


@contextlib.contextmanager
def image_progress(description: str, total: int, *, enabled: bool,
                   console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A bar over ``total`` images; yields ``advance(images)``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  _ImagesPerSecond(), TimeRemainingColumn(), console=console,
                  disable=not enabled, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda images: progress.advance(task, images)
