"""Resuming a pretraining run: which checkpoint, whether it fits the config, and loading
every part of it (networks, optimizers, random streams, per-process states) checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixmask.config import Config
from mixmask.errors import CheckpointError
from mixmask.runs.checkpoint import (
    load_optimizer_state,
    load_state,
    nonfinite_tensors,
    read_checkpoint,
    set_random_state,
)

# What a resume reads from a checkpoint (the evaluation commands need only "method").
RESUME_KEYS = ("method", "optimizer", "epoch", "step", "generator")


def resume_checkpoint(config: Config) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume == "auto":
        path = Path(config.out_dir) / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint {path} does not exist.")
    return path


def rank_state(method: nn.Module, generator: torch.Generator) -> dict[str, Any]:
    """What differs between DDP processes and must resume per process: the device
    generator and the state of modules flagged ``per_process_state`` (host generators)."""
    return {"generator": generator.get_state(),
            "modules": {name: module.get_extra_state() for name, module in method.named_modules()
                        if getattr(module, "per_process_state", False)}}


def _restorerank_state(rank_state: dict[str, Any], method: nn.Module,
                        generator: torch.Generator, path: Path) -> None:
    set_random_state(generator, rank_state["generator"], path)
    modules = dict(method.named_modules())
    for name, module_state in rank_state["modules"].items():
        if not getattr(modules.get(name), "per_process_state", False):
            raise CheckpointError(f"checkpoint {path} holds a per-process state for "
                                  f"{name!r}, which this model has no generator for.")
        try:
            modules[name].set_extra_state(module_state)
        except Exception:  # noqa: BLE001 - a foreign value in a checked structure
            raise CheckpointError(f"checkpoint {path} holds a per-process state for {name!r} "
                                  "that does not fit it.") from None


def restore_training_state(path: Path, config: Config, modules: dict[str, nn.Module | None],
                           optimizers: dict[str, Any], generator: torch.Generator, *,
                           world_size: int, rank: int, say=print) -> dict[str, Any]:
    """Load a pretraining checkpoint into the run's networks (``modules``: "method",
    "probe"), optimizers ("optimizer", "probe_optimizer") and device generator, every part
    checked first (:mod:`mixmask.runs.checkpoint`); returns the counters to continue from
    (epoch, step, skipped_steps, wall_time_s)."""
    checkpoint = read_checkpoint(path, required=RESUME_KEYS)
    check_compatible(checkpoint, config, path)
    bad = nonfinite_tensors(checkpoint["method"])
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite values ({len(bad)} tensors, e.g. "
            f"{bad[0]}); it comes from a diverged run: resume from an earlier checkpoint "
            "(resume=PATH) or start a new out_dir.")
    for key, module in modules.items():
        if module is not None and key in checkpoint:
            load_state(module, checkpoint[key], path)
    for key, optimizer in optimizers.items():
        if optimizer is not None and key in checkpoint:
            load_optimizer_state(optimizer, checkpoint[key], path, key.replace("_", " "))
    set_random_state(generator, checkpoint["generator"], path)
    rank_states = checkpoint.get("rank_states")
    if rank_states is not None and len(rank_states) == world_size:
        _restorerank_state(rank_states[rank], modules["method"], generator, path)
    elif rank_states is not None:
        say(f"Note: the checkpoint was saved by {len(rank_states)} processes and this run "
            f"has {world_size}: every process continues from process 0's random "
            "streams, so the masks and views differ from an uninterrupted run.")
    return {"epoch": checkpoint["epoch"], "step": checkpoint["step"],
            "skipped_steps": checkpoint.get("skipped_steps", 0),
            "wall_time_s": checkpoint.get("wall_time_s", 0.0)}


def check_compatible(checkpoint: dict[str, Any], config: Config, path: Path) -> None:
    saved = checkpoint.get("config", {})
    for section, key in (("method", "name"), ("model", "backbone"), ("model", "width"),
                         ("model", "stem")):
        saved_section = saved.get(section)
        old = saved_section.get(key) if isinstance(saved_section, dict) else None
        new = getattr(getattr(config, section), key)
        if old is not None and old != new:
            raise CheckpointError(f"checkpoint {path} was trained with {section}.{key}={old}, "
                                  f"but the config says {new}; start a new out_dir instead.")
