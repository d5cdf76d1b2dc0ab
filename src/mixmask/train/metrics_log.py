"""metrics.csv, TensorBoard and (when asked for) Weights & Biases: one row per logged step
or epoch."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from mixmask.errors import MixmaskError
from mixmask.train.wandb_log import wandb_row


class MetricsLog:
    """metrics.csv (one row per logged step or epoch; columns grow as keys appear) and
    TensorBoard scalars."""

    def __init__(self, out_dir: Path, enabled: bool, resumed_at_step: int | None = None,
                 wandb_run=None):
        self.path = out_dir / "metrics.csv"
        self.wandb_run = wandb_run  # mixmask.train.wandb_log: Weights & Biases, when asked for
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and resumed_at_step is not None and self.path.is_file():
            # Keep the history up to the checkpoint; rows logged after it (by a run killed
            # before its next checkpoint) are logged again by the resumed run.
            with self.path.open() as handle:
                self.rows = [row for row in csv.DictReader(handle)
                             if _logged_step(row) <= resumed_at_step]
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        columns = list(dict.fromkeys(key for entry in self.rows for key in entry))
        try:
            with self.path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)
        except OSError as error:
            raise MixmaskError(f"cannot write {self.path}: {error.strerror or error}. Free some "
                               "space (or fix the folder), then continue with resume=auto."
                               ) from None
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])
        if self.wandb_run is not None:
            scalars, step = wandb_row(row)
            self._wandb("log", lambda: self.wandb_run.log(scalars, step=step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self._wandb("close", self.wandb_run.finish)

    def _wandb(self, what: str, call) -> None:
        """A logger is optional: its failure is one note, and it is dropped for the rest of
        the run (metrics.csv and TensorBoard hold every row)."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a third-party logger never fails a run
            self.wandb_run = None
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"Note: Weights & Biases failed to {what} ({first_line}); it is off for the "
                  "rest of the run, metrics.csv has every row.", file=sys.stderr)


def _logged_step(row: dict[str, str]) -> float:
    """A metrics.csv row's step; a row without a readable one (a file edited elsewhere)
    sorts after every checkpoint, so a resume drops it."""
    try:
        return float(row["step"])
    except (KeyError, TypeError, ValueError):
        return math.inf


# --------------------------------------------------------------------------- training
