"""What every evaluation on a frozen backbone starts from: the run's resolved config, a
checkpoint (or the random init), the labelled splits, the pretrained method on its device,
centre-crop features of each split, and the header every ``RUN/eval/<protocol>.json``
carries (the docs' Evaluation page, docs/evaluation.md: what each result file holds)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from mixmask.config import Config
from mixmask.data.progress import image_progress
from mixmask.data.splits import EvalData
from mixmask.errors import ConfigError
from mixmask.eval.features import extract_features
from mixmask.runs.folder import (
    evaluation_sets,
    load_run_checkpoint,
    load_run_config,
    pretrained_method,
)
from mixmask.train.fabric import (
    device_name,
    resolve_accelerator,
    settle_precision,
    versions,
)


def result_header(config: Config, run: Path, protocol: str, description: str,
                  checkpoint_path: Path | None, checkpoint: dict[str, Any] | None, device,
                  wall_time_s: float) -> dict[str, Any]:
    """The fields every protocol result starts with: what was evaluated, how, where."""
    return {
        "protocol": protocol, "description": description,
        "checkpoint": None if checkpoint_path is None else str(checkpoint_path),
        "pretrain_step": None if checkpoint is None else checkpoint.get("step"),
        "run": str(run), "method": config.method.name,
        "masking": config.method.axis.masking if config.method.axis is not None else "none",
        "backbone": config.model.backbone, "dataset": config.data.dataset,
        "wall_time_s": wall_time_s, "device": device_name(device), "versions": versions(),
        "seed": config.train.seed,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bad_images(eval_data: EvalData) -> dict[str, Any]:
    """The evaluation sets' unreadable files (skipped, each replaced by its readable
    neighbour: ImageSet.load_item), as summary.json reports the training split's."""
    files = [*eval_data.train.image_set.skipped_files(), *eval_data.test.image_set.skipped_files()]
    return {"bad_images": len(files), "bad_image_files": files[:100]}


def print_line(console: Console | None, message: str) -> None:
    """One line on the rich console, or stdout without one."""
    (console.print if console is not None else print)(message)


@dataclass
class FrozenRun:
    """A run's pretrained method, frozen, ready to encode its labelled splits."""

    run: Path
    config: Config
    checkpoint_path: Path | None
    checkpoint: dict[str, Any] | None
    eval_data: EvalData
    device: torch.device
    method: torch.nn.Module
    console: Console | None

    @classmethod
    def open(cls, run: Path, overrides: list[str], *, checkpoint: str | None = None,
             protocol_file: str | None = None, console: Console | None = None,
             from_scratch: bool = False) -> FrozenRun:
        """``from_scratch``: the random init of ``train.seed`` instead of a checkpoint (the
        floor a pretrained backbone is read against)."""
        if from_scratch and checkpoint:
            raise ConfigError("--from-scratch evaluates the random init of train.seed; it "
                              "takes no --checkpoint.")
        config = load_run_config(run, overrides, protocol_file)
        checkpoint_path, content = ((None, None) if from_scratch
                                    else load_run_checkpoint(run, checkpoint))
        eval_data = evaluation_sets(config)
        accelerator = resolve_accelerator(config.train.device)
        settle_precision(config, accelerator)  # the run's own, unless overridden
        device = torch.device(accelerator)
        method = pretrained_method(config, eval_data, checkpoint_path, content, device)
        return cls(run, config, checkpoint_path, content, eval_data, device, method, console)

    def encode(self, dataset, what: str) -> tuple[Tensor, Tensor]:
        """Features [N, D] and labels [N] of a labelled dataset of normalised images."""
        with image_progress(f"features ({what})", len(dataset),
                            enabled=self.config.train.progress_bar,
                            console=self.console) as advance:
            return extract_features(self.method, dataset, device=self.device,
                                    num_workers=self.config.data.num_workers,
                                    encode=self.method.features, progress=advance,
                                    precision=self.config.train.precision)

    def split_features(self, *, train: bool = True) -> tuple[Tensor, ...]:
        """(train features, train labels, test features, test labels), or only the test
        pair when ``train`` is False."""
        out: list[Tensor] = []
        if train:
            out.extend(self.encode(self.eval_data.train, "train"))
        out.extend(self.encode(self.eval_data.test, "test"))
        return tuple(out)

    @property
    def from_scratch(self) -> bool:
        return self.checkpoint_path is None

    def result_name(self, protocol: str) -> str:
        """``RUN/eval/<name>.json``: the protocol, ``_scratch`` for the random init."""
        return protocol + ("_scratch" if self.from_scratch else "")

    def header(self, protocol: str, description: str, wall_time_s: float) -> dict[str, Any]:
        init = (f"random init (train.seed={self.config.train.seed})" if self.from_scratch
                else f"pretrained ({self.checkpoint_path.name}, step "
                     f"{self.checkpoint.get('step')})")
        return {**result_header(self.config, self.run, protocol, description,
                                self.checkpoint_path, self.checkpoint, self.device,
                                wall_time_s), **bad_images(self.eval_data),
                "from_scratch": self.from_scratch, "init": init}
