"""Weights & Biases logging (``train.logger=wandb``), beside TensorBoard and metrics.csv.

Optional: ``pip install 'mixmask[wandb]'``. Offline by default (``train.wandb_mode``): the
run is written under ``RUN/wandb/`` and uploaded later with ``wandb sync``, so a cluster
node without internet, or a user without an account, loses nothing. The W&B run id is
kept in ``RUN/wandb_id.txt`` so a resumed run continues the same W&B run."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from mixmask.errors import ConfigError


def require_wandb():
    """The wandb module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.logger=wandb needs Weights & Biases, which is not installed: "
                          "pip install 'mixmask[wandb]' (or leave train.logger at its "
                          "default, tensorboard).") from None
    return wandb


def open_wandb_run(out_dir: Path, config) -> Any:
    """A W&B run for this run folder: named after it, holding the resolved config."""
    wandb = require_wandb()
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    train = config.train
    return wandb.init(project=train.wandb_project, name=out_dir.name, id=run_id,
                      resume="allow", dir=str(out_dir), mode=train.wandb_mode,
                      config=config.to_dict())


def wandb_row(row: dict[str, Any]) -> tuple[dict[str, float], int]:
    """A metrics.csv row as W&B's (scalars, step): the epoch kept as a scalar, so W&B can
    plot against it too."""
    scalars = {key: value for key, value in row.items()
               if key != "step" and isinstance(value, (int, float))}
    return scalars, int(row["step"])
