"""The pretraining loop, on Lightning Fabric (precision, devices, DDP, seeding).

The engine knows no method: it builds the registered class of ``method.name``
(:mod:`mixmask.methods.protocol`), loads the views that method asks for, and runs
:func:`mixmask.step.training_step` over the batches, then the online probe. Evaluation is
:func:`mixmask.eval.evaluate`. Scalars are read on the host only every
``train.log_every`` steps.
"""

from __future__ import annotations

import csv
import errno
import functools
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning.fabric import Fabric
from torch import nn

from mixmask import __version__
from mixmask.checkpoint import (
    load_optimizer_state,
    load_state,
    nonfinite_tensors,
    read_checkpoint,
    set_random_state,
)
from mixmask.collapse import CollapseWatch, embedding_std
from mixmask.config import Config, save_config
from mixmask.data import UNLABELED, EpochBatchSampler, ImageSet, build_train_loader
from mixmask.data.loaders import worker_error_message
from mixmask.data.splits import EvalData, load_eval_data, load_split
from mixmask.errors import CheckpointError, ConfigError, DatasetError, MixmaskError
from mixmask.eval import evaluate
from mixmask.methods import PixelStats, build_method
from mixmask.methods.registry import method_class
from mixmask.optim import build_optimizer
from mixmask.profiling import StepProfiler
from mixmask.runtime import keep_freed_cpu_memory
from mixmask.step import all_finite, set_learning_rate, training_step
from mixmask.wandb_log import open_wandb_run, require_wandb, wandb_row

PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
# What a resume reads from a checkpoint (the evaluation commands need only "method").
RESUME_KEYS = ("method", "optimizer", "epoch", "step", "generator")
_STATE_FINITE = "_state_finite"  # the finite-state flag, read with each logged row


class TrainingDiverged(MixmaskError):
    """The loss, the weights or the buffers became NaN or infinite."""


class RunStopped(MixmaskError):
    """SIGINT or SIGTERM stopped the run at a step boundary; its last.ckpt is saved."""


# --------------------------------------------------------------------------- helpers


def learning_rate(config: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then (per step) cosine decay to train.min_lr at the end of
    train.epochs, a constant, or steps of x train.lr_gamma at the epochs of
    train.lr_milestones (mmcv's StepLrUpdaterHook, by epoch, as A2MIM's ViT recipe)."""
    train = config.train
    base = train.lr * (train.batch_size / 256 if train.scale_lr_by_batch else 1.0)
    warmup = int(train.warmup_epochs * steps_per_epoch)
    total = train.epochs * steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    if train.schedule == "constant":
        return base
    if train.schedule == "step":
        epoch = step / steps_per_epoch
        return base * train.lr_gamma ** sum(epoch >= milestone
                                            for milestone in train.lr_milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return train.min_lr + (base - train.min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * min(1.0, progress)))


def check_out_dir(out_dir: Path) -> None:
    """A clear error, before any work, for an out_dir that is a file or cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder; choose another out_dir.")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir} lies under {existing}, which is a file, not a "
                          "folder; choose another out_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir} cannot be written ({existing} is read-only or "
                          "not yours); choose another out_dir.")


def resolve_accelerator(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu.")
    return device


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


def _disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    # torch.save reports a full disk as OSError(ENOSPC) or as one of its writer's
    # RuntimeErrors ("iostream error", "unexpected pos"): judged by the free space left.
    return (getattr(error, "errno", None) == errno.ENOSPC
            or shutil.disk_usage(folder).free < needed)


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (its size on disk, roughly)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _rank_state(method: nn.Module, generator: torch.Generator) -> dict[str, Any]:
    """What differs between DDP processes and must resume per process: the device
    generator and the state of modules flagged ``per_process_state`` (host generators)."""
    return {"generator": generator.get_state(),
            "modules": {name: module.get_extra_state() for name, module in method.named_modules()
                        if getattr(module, "per_process_state", False)}}


def _restore_rank_state(rank_state: dict[str, Any], method: nn.Module,
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


def versions() -> dict[str, str]:
    import lightning
    import torchvision

    return {"mixmask": __version__, "python": platform.python_version(),
            # str(): torch's version is a TorchVersion, which the safe loader refuses.
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "lightning": str(lightning.__version__)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class MetricsLog:
    """metrics.csv (one row per logged step or epoch; columns grow as keys appear) and
    TensorBoard scalars."""

    def __init__(self, out_dir: Path, enabled: bool, resumed_at_step: int | None = None,
                 wandb_run=None):
        self.path = out_dir / "metrics.csv"
        self.wandb_run = wandb_run  # mixmask.wandb_log: Weights & Biases, when asked for
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


def build_fabric(config: Config, accelerator: str, processes: int) -> Fabric:
    """The run's Fabric: devices, precision, DDP (one place, so a test can hand the engine
    another precision plugin, e.g. fp16 with a GradScaler on the CPU)."""
    return Fabric(accelerator=accelerator, devices=config.train.devices,
                  num_nodes=config.train.num_nodes,
                  precision=PRECISIONS[config.train.precision],
                  strategy="ddp" if processes > 1 else "auto")


def grad_scaler(fabric: Fabric):
    """The GradScaler of fp16 mixed precision, or None: under it a step's gradients are
    scaled, and their overflow is the scaler's to handle (it skips that update and lowers
    the scale)."""
    return getattr(getattr(fabric, "_precision", None), "scaler", None)


def pretrain(config: Config, *, console=None) -> dict[str, Any] | None:
    """Pretrain as the config says; returns the summary also written to summary.json
    (None in DDP processes other than global rank 0)."""
    accelerator = resolve_accelerator(config.train.device)
    processes = config.train.devices * config.train.num_nodes
    if config.train.sync_batchnorm and accelerator != "cuda" and processes > 1:
        raise ConfigError("train.sync_batchnorm=true needs CUDA GPUs (torch's SyncBatchNorm "
                          "runs on GPUs only); drop it for CPU processes.")
    fabric = build_fabric(config, accelerator, processes)
    fabric.launch()
    if accelerator == "cpu" and config.train.keep_cpu_memory:
        keep_freed_cpu_memory()
    out_dir = Path(config.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    check_out_dir(out_dir)
    resume_path = resume_checkpoint(config)
    if resume_path is None and (checkpoint_dir / "last.ckpt").is_file():
        raise ConfigError(f"{out_dir} already holds a run. Continue it with resume=auto, or "
                          "choose another out_dir (or delete that folder) to start afresh.")
    say = _printer(fabric, console)
    if config.train.logger == "wandb":
        require_wandb()  # before anything is written
    # The data is checked before anything is written, so a mistake leaves no run folder.
    train_set = load_split(config, "pretrain", config.data.subset)
    if train_set.bad_files:
        say(f"Warning: skipped {len(train_set.bad_files)} unreadable image files of the "
            f"training split (e.g. {train_set.bad_files[0]}); summary.json lists them.")
    if len(train_set) < config.train.batch_size:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than one batch "
                          f"(train.batch_size={config.train.batch_size}).")
    for warning in method_class(config.method.name).data_warnings(config, len(train_set)):
        say(warning)
    if fabric.is_global_zero:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            # A save killed by a full disk leaves its .partial file; it would keep the disk full.
            for partial in checkpoint_dir.glob("*.partial"):
                partial.unlink()
            save_config(config, out_dir / "config.yaml")
            provenance = getattr(config, "provenance", None)
            if provenance is not None:
                (out_dir / "recipe.yaml").write_text(yaml.safe_dump(provenance, sort_keys=False))
        except OSError as error:
            raise ConfigError(f"cannot write the run folder {out_dir}: {error.strerror or error}; "
                              "choose another out_dir.") from None
    fabric.seed_everything(config.train.seed)

    sampler = EpochBatchSampler(len(train_set), config.train.batch_size,
                                seed=config.train.seed, rank=fabric.global_rank,
                                world_size=fabric.world_size)
    steps_per_epoch = len(train_set) // config.train.batch_size

    eval_data, no_eval_reason = (None, "monitors are off")
    if config.monitor.knn or config.monitor.online_probe or config.eval.knn or config.eval.linear:
        eval_data, no_eval_reason = load_eval_data(config)
    if eval_data is None:
        say(f"Note: kNN and linear-probe monitors are skipped: {no_eval_reason}.")

    torch.manual_seed(config.train.seed)  # the same initial weights as the random-init baseline
    pixel_stats = PixelStats(tuple(train_set.mean), tuple(train_set.std))
    method = build_method(config, pixel_stats)
    loader = build_train_loader(train_set, sampler, method.view_configs(),
                                pipeline=config.data.pipeline, device=fabric.device,
                                seed=config.train.seed, rank=fabric.global_rank,
                                num_workers=config.data.num_workers,
                                channels_last=config.train.channels_last)
    if config.train.sync_batchnorm and fabric.world_size > 1:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if config.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if config.train.compile:
        compile_networks(method, config)
    train = config.train
    # Fabric clips fp16 gradients after unscaling them itself, which a fused optimizer
    # (it unscales inside its own step) does not allow: that combination runs unfused.
    fused = train.fused_optimizer and not (grad_scaler(fabric) is not None
                                           and train.grad_clip > 0)
    if train.fused_optimizer and not fused:
        say("Note: fp16 with gradient clipping runs the unfused optimizer (the gradients are "
            "unscaled before clipping, which a fused optimizer cannot take).")
    optimizer = build_optimizer(
        train.optimizer, method.parameter_groups(train.optimizer), lr=train.lr,
        momentum=train.momentum, weight_decay=train.weight_decay, betas=train.betas,
        eta=train.lars_eta, clip_lr=train.lars_clip_lr, fused=fused)
    method, optimizer = fabric.setup(method, optimizer)
    probe, probe_optimizer = None, None
    if config.monitor.online_probe and eval_data is not None:
        probe = nn.Linear(method.feature_dim, eval_data.num_classes)
        probe_optimizer = torch.optim.SGD(probe.parameters(), lr=config.monitor.probe_lr,
                                          momentum=0.9)
        probe, probe_optimizer = fabric.setup(probe, probe_optimizer)
    generator = torch.Generator(device=fabric.device)
    generator.manual_seed(config.train.seed * 1_000 + fabric.global_rank)

    state = {"method": method, "optimizer": optimizer, "epoch": 0, "step": 0,
             "skipped_steps": 0}
    if probe is not None:
        state.update(probe=probe, probe_optimizer=probe_optimizer)
    elapsed_before = 0.0
    if resume_path is not None:
        modules = {"method": method.module, "probe": probe.module if probe is not None else None}
        optimizers = {"optimizer": optimizer, "probe_optimizer": probe_optimizer}
        restored = restore_training_state(resume_path, config, modules, optimizers, generator,
                                          world_size=fabric.world_size,
                                          rank=fabric.global_rank, say=say)
        elapsed_before = restored.pop("wall_time_s")
        state.update(restored)
        say(f"Resumed from {resume_path} at epoch {state['epoch']}, step {state['step']}.")

    wandb_run = (open_wandb_run(out_dir, config)
                 if config.train.logger == "wandb" and fabric.is_global_zero else None)
    metrics = MetricsLog(out_dir, fabric.is_global_zero,
                         state["step"] if resume_path is not None else None, wandb_run)
    run = _Run(config=config, fabric=fabric, method=method, optimizer=optimizer, probe=probe,
               probe_optimizer=probe_optimizer, generator=generator, loader=loader,
               sampler=sampler, steps_per_epoch=steps_per_epoch, eval_data=eval_data,
               metrics=metrics, state=state, checkpoint_dir=checkpoint_dir, say=say,
               pixel_stats=pixel_stats, elapsed_before=elapsed_before,
               resumed_from=resume_path, train_set=train_set)
    try:
        with _StopSignals() as stop:
            run.stop = stop
            run.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: out now, mid-step, so nothing is saved
        kept = (f"the last checkpoint, {run.last_good[0]} (step {run.last_good[1]}), is kept"
                if run.last_good else "no checkpoint was saved")
        raise MixmaskError(f"interrupted twice, during step {state['step'] + 1}: stopped "
                           f"without saving; {kept}. Continue with resume=auto.") from None
    finally:
        metrics.close()
    return run.finish()


class _StopSignals:
    """SIGINT and SIGTERM (Ctrl-C; what SLURM and Kubernetes send) ask the loop to stop at
    the next step boundary, where the run's state is whole, so the checkpoint saved there
    resumes exactly; a second SIGINT interrupts at once. Outside the main thread (where
    Python cannot install handlers) signals keep their default behaviour."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def compile_networks(method: nn.Module, config: Config) -> None:
    """torch.compile each network of the method (backbone, heads, EMA copies) in place, so
    parameter names and checkpoints stay as without compilation. Masks, mixes and losses
    stay eager: they are a few cheap elementwise ops with data-dependent shapes."""
    import torch._dynamo

    backend = config.train.compile_backend
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"train.compile_backend={backend!r} is not a torch.compile backend; "
                          f"use one of: {', '.join(sorted(known))}.")
    options = {"backend": backend}
    if backend == "inductor":
        options["mode"] = config.train.compile_mode
    for network in method.children():
        if any(True for _ in network.parameters()):  # not parameter-free helpers
            network.compile(**options)


def restore_training_state(path: Path, config: Config, modules: dict[str, nn.Module | None],
                           optimizers: dict[str, Any], generator: torch.Generator, *,
                           world_size: int, rank: int, say=print) -> dict[str, Any]:
    """Load a pretraining checkpoint into the run's networks (``modules``: "method",
    "probe"), optimizers ("optimizer", "probe_optimizer") and device generator, every part
    checked first (:mod:`mixmask.checkpoint`); returns the counters to continue from
    (epoch, step, skipped_steps, wall_time_s)."""
    checkpoint = read_checkpoint(path, required=RESUME_KEYS)
    _check_compatible(checkpoint, config, path)
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
        _restore_rank_state(rank_states[rank], modules["method"], generator, path)
    elif rank_states is not None:
        say(f"Note: the checkpoint was saved by {len(rank_states)} processes and this run "
            f"has {world_size}: every process continues from process 0's random "
            "streams, so the masks and views differ from an uninterrupted run.")
    return {"epoch": checkpoint["epoch"], "step": checkpoint["step"],
            "skipped_steps": checkpoint.get("skipped_steps", 0),
            "wall_time_s": checkpoint.get("wall_time_s", 0.0)}


def _check_compatible(checkpoint: dict[str, Any], config: Config, path: Path) -> None:
    saved = checkpoint.get("config", {})
    for section, key in (("method", "name"), ("model", "backbone"), ("model", "width"),
                         ("model", "stem")):
        saved_section = saved.get(section)
        old = saved_section.get(key) if isinstance(saved_section, dict) else None
        new = getattr(getattr(config, section), key)
        if old is not None and old != new:
            raise CheckpointError(f"checkpoint {path} was trained with {section}.{key}={old}, "
                                  f"but the config says {new}; start a new out_dir instead.")


def _printer(fabric: Fabric, console):
    def say(message: str) -> None:
        if fabric.is_global_zero:
            (console.print if console is not None else print)(message)
    return say


class _Run:
    """State of one pretraining run; the loop itself is in fit/_train_epoch."""

    def __init__(self, *, config: Config, fabric: Fabric, method, optimizer, probe,
                 probe_optimizer, generator: torch.Generator, loader, sampler,
                 steps_per_epoch: int, eval_data: EvalData | None, metrics: MetricsLog,
                 state: dict, checkpoint_dir: Path, say, pixel_stats: PixelStats,
                 elapsed_before: float = 0.0, resumed_from: Path | None = None,
                 train_set: ImageSet | None = None):
        self.config, self.fabric, self.method, self.optimizer = config, fabric, method, optimizer
        # Fabric's clipping unscales fp16 gradients first; no host read (the norm is logged).
        self.clip_gradients = None
        if config.train.grad_clip > 0:
            self.clip_gradients = functools.partial(
                fabric.clip_gradients, method, optimizer, max_norm=config.train.grad_clip,
                error_if_nonfinite=False)
        self.probe, self.probe_optimizer, self.generator = probe, probe_optimizer, generator
        self.scaled_gradients = grad_scaler(fabric) is not None
        self.loader, self.sampler, self.steps_per_epoch = loader, sampler, steps_per_epoch
        self.eval_data, self.metrics, self.state = eval_data, metrics, state
        self.checkpoint_dir, self.say, self.pixel_stats = checkpoint_dir, say, pixel_stats
        # The newest checkpoint known to hold a finite state: (path, step), or None.
        self.last_good = None if resumed_from is None else (resumed_from, state["step"])
        # Every floating tensor a checkpoint saves, checked for NaN/inf before each save and
        # at each logging step (one fused reduction, read with the logged scalars).
        modules = [method] + ([probe] if probe is not None else [])
        self.state_tensors = [tensor for module in modules
                              for tensor in (*module.parameters(), *module.buffers())
                              if tensor.is_floating_point()]
        self.train_images, self.train_seconds = 0, 0.0
        self.elapsed_before, self.started = elapsed_before, time.perf_counter()
        self.stop: _StopSignals | None = None  # set by pretrain()
        # The online probe is reported only once it has trained (a method may give no
        # probe features).
        self.probe_trained = resumed_from is not None and probe is not None
        self.last_epoch_metrics: dict[str, float] = {}
        # The files it skips as unreadable go to summary.json; whether it holds unlabelled
        # images (STL-10's pretraining split) decides whether the probe checks for labels.
        self.train_set = train_set
        self.unlabelled_in_train = train_set is not None and (
            train_set.labels is None or bool((train_set.labels < 0).any()))
        self._pending_log = None  # (step, lr, names, values, ready event): see _log_step
        # The test features' spread is one measure over the whole test set: one low value
        # is collapse (the training batches' spread needs COLLAPSE_PATIENCE logs).
        self.collapse = CollapseWatch(dims={"test_feature_std": method.module.feature_dim},
                                      patience={"test_feature_std": 1})
        train = config.train
        self.profiler = (StepProfiler(Path(config.out_dir) / "profile", fabric.device,
                                      train.profile_start_step, train.profile_steps)
                         if train.profile_steps and fabric.is_global_zero else None)

    @property
    def total_steps(self) -> int:
        total = self.config.train.epochs * self.steps_per_epoch
        return min(total, self.config.train.max_steps) if self.config.train.max_steps else total

    def fit(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        show = self.fabric.is_global_zero and self.config.train.progress_bar
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), disable=not show,
                      transient=False) as progress:
            task = progress.add_task("pretrain", total=self.total_steps,
                                     completed=self.state["step"], status="")
            while self.state["step"] < self.total_steps:
                epoch = self.state["step"] // self.steps_per_epoch
                self.state["epoch"] = epoch
                self.sampler.set_epoch(epoch, self.state["step"] % self.steps_per_epoch)
                progress.update(task, description=f"epoch {epoch + 1}/{self.config.train.epochs}")
                stopping = self._train_epoch(progress, task)
                epoch_done = self.state["step"] % self.steps_per_epoch == 0
                if epoch_done:
                    self.state["epoch"] = epoch + 1
                    self._end_of_epoch(epoch + 1, progress, task)
                if stopping:
                    if not epoch_done:  # the epoch's end saved it otherwise
                        self.save_checkpoint("last.ckpt")
                    path = self.checkpoint_dir / "last.ckpt"
                    raise RunStopped(
                        f"stopped by {self._stop_signal()} after step {self.state['step']}; "
                        f"saved {path}. Continue with resume=auto (same out_dir): it resumes "
                        "exactly where this run stopped.")
        if self.profiler is not None:  # the run ended inside the profiled window
            self._report_profile(self.profiler.close(self.state["step"]))
        self.save_checkpoint("last.ckpt")

    def _stop_signal(self) -> str | None:
        return None if self.stop is None else self.stop.received

    def _stop_requested(self, step: int) -> bool:
        """Whether to stop after ``step`` steps. Under DDP every process must stop at the
        same step: the flag is agreed on at logging steps (one small all-reduce)."""
        if self.fabric.world_size == 1:
            return self._stop_signal() is not None
        if step % self.config.train.log_every and step % self.steps_per_epoch:
            return False
        flag = torch.tensor(float(self._stop_signal() is not None), device=self.fabric.device)
        return bool(self.fabric.all_reduce(flag, reduce_op="max") > 0)

    def _train_epoch(self, progress, task) -> bool:
        """Train until the epoch ends (or the run does); True when a stop signal ended it
        early, at a step boundary."""
        config, fabric, method = self.config, self.fabric, self.method
        stopping = False
        start = time.perf_counter()
        images_seen = 0
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except DatasetError as error:  # an unreadable image: stop here, whole, and save
                self._flush_log(progress, task)
                self.save_checkpoint("last.ckpt")
                raise DatasetError(
                    f"{worker_error_message(error)} The run was saved at step "
                    f"{self.state['step']} ({self.checkpoint_dir / 'last.ckpt'}); continue it "
                    "with resume=auto once the file is fixed.") from None
            step = self.state["step"]
            if step >= self.total_steps:
                break
            lr = learning_rate(config, step, self.steps_per_epoch)
            set_learning_rate(self.optimizer, lr)
            if self.profiler is not None:
                self.profiler.before_step(step)
            output = training_step(method, self.optimizer, batch, self.generator,
                                   step / self.total_steps, backward=fabric.backward,
                                   channels_last=config.train.channels_last,
                                   skip_nonfinite=config.train.on_nonfinite == "skip",
                                   clip_gradients=self.clip_gradients,
                                   scaled_gradients=self.scaled_gradients)
            logs = dict(output.logs)
            if output.skipped:
                self.state["skipped_steps"] += 1
            elif (self.probe is not None and output.features is not None
                    and self._any_labelled(batch.labels)):
                self.probe_trained = True
                # The mean over this process's labelled images (the sum over none is 0, not
                # the NaN of a mean over none, when another process holds the labels).
                labelled = (batch.labels != UNLABELED).sum().clamp(min=1)
                probe_loss = F.cross_entropy(self.probe(output.features), batch.labels,
                                             ignore_index=UNLABELED, reduction="sum") / labelled
                fabric.backward(probe_loss)
                self.probe_optimizer.step()
                self.probe_optimizer.zero_grad(set_to_none=True)
                logs["probe_loss"] = probe_loss.detach()
            images_seen += batch.size * fabric.world_size
            self.state["step"] = step + 1
            if self.profiler is not None:
                self._report_profile(self.profiler.after_step(step + 1))
            progress.advance(task)
            if ((step + 1) % config.train.log_every == 0 or step + 1 == self.total_steps
                    or (step + 1) % self.steps_per_epoch == 0):
                self._add_collapse_monitor(output, logs)
                self._log_step(step + 1, lr, logs, progress, task)
            every = config.train.checkpoint_every_steps
            if (every and (step + 1) % every == 0 and (step + 1) % self.steps_per_epoch
                    and step + 1 < self.total_steps):
                self._flush_log(progress, task)
                self.save_checkpoint("last.ckpt")
            if step + 1 < self.total_steps and self._stop_requested(step + 1):
                stopping = True
                break
        self._flush_log(progress, task)  # before any checkpoint: a NaN loss is caught first
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)
        self.train_seconds += time.perf_counter() - start
        self.train_images += images_seen
        return stopping

    def _any_labelled(self, labels: torch.Tensor) -> bool:
        """Whether any process's batch holds a labelled image, so the online probe has
        something to learn from. Read on the host, and agreed on under DDP (every process
        skips the same probe steps), so only training sets with unlabelled images (STL-10
        mixes 100k of them with its 5k labelled ones) pay for it."""
        if not self.unlabelled_in_train:
            return True
        found = (labels != UNLABELED).any().float()
        if self.fabric.world_size > 1:
            found = self.fabric.all_reduce(found, reduce_op="max")
        return bool(found > 0)

    def _report_profile(self, summary: dict | None) -> None:
        if summary is None:
            return
        busy = summary["busy_fraction"]
        self.say(f"Profiled {summary['steps']} steps from step {summary['first_step']}: busy "
                 f"{'n/a' if busy is None else f'{100 * busy:.1f}%'} of the window "
                 f"({summary['busy_of']}); trace in {self.profiler.out_dir}.")

    def _add_collapse_monitor(self, output, logs: dict[str, torch.Tensor]) -> None:
        """The spread of the step's backbone features and projector outputs
        (:mod:`mixmask.collapse`), as device tensors read with the other scalars."""
        for name, embeddings in (("feature_std", output.features),
                                 ("embedding_std", output.embedding)):
            if embeddings is not None and len(embeddings) > 1:
                logs[name] = embedding_std(embeddings)
                self.collapse.dims.setdefault(name, embeddings.flatten(1).shape[1])

    def _log_step(self, step: int, lr: float, logs: dict[str, torch.Tensor], progress,
                  task) -> None:
        """Queue a step's scalars: on CUDA they are copied to the host asynchronously and
        read at the next logging step (or the epoch's end), so logging never stalls the
        device; the previous queued row is written now."""
        names = [*logs, _STATE_FINITE]
        values = torch.stack([*(logs[name].detach().float() for name in logs),
                              self._state_finite().float()])
        ready = None
        if values.device.type == "cuda":
            values = values.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._flush_log(progress, task)
        self._pending_log = (step, lr, names, values, ready)

    def _flush_log(self, progress=None, task=None) -> None:
        """Write the queued row, if any; a non-finite loss stops the run here."""
        if self._pending_log is None:
            return
        step, lr, names, values, ready = self._pending_log
        self._pending_log = None
        if ready is not None:
            ready.synchronize()
        row = dict(zip(names, values.tolist(), strict=True))
        state_finite = row.pop(_STATE_FINITE) == 1.0
        # The loss first: a non-finite loss is usually why the weights went too. Only the
        # loss terms: an fp16 overflow step logs an infinite grad_norm that the GradScaler
        # handles (it skips that update), and non-finite weights are the state flag's.
        losses = [value for name, value in row.items() if name.startswith("loss")]
        if (self.config.train.on_nonfinite == "stop"
                and not all(math.isfinite(value) for value in losses)):
            raise self._diverged(step, f"the loss became {row.get('loss')}")
        if not state_finite:
            raise self._diverged(step, "the weights or buffers hold NaN or infinity")
        epoch = round(step / self.steps_per_epoch, 3)  # fractional: where in the schedule
        self.metrics.log({"step": step, "epoch": epoch, "lr": lr, **row})
        self._watch_collapse({"step": step, **row})
        if progress is not None:
            progress.update(task, status=f"loss {row['loss']:.3f}")

    def _watch_collapse(self, row: dict[str, Any]) -> None:
        warning = self.collapse.add(row["step"], row)
        if warning and self.fabric.is_global_zero:
            self.say(warning)

    def _state_finite(self) -> torch.Tensor:
        """0-dim bool on the device: every saved tensor finite, on every process."""
        finite = all_finite(self.state_tensors).to(self.fabric.device)
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite.float(), reduce_op="min") == 1.0
        return finite

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        if self.last_good is None:
            where = ("No checkpoint had been saved yet, so nothing is kept; lower train.lr, use "
                     "train.precision=32, set train.on_nonfinite=skip, or check the data, then "
                     "start again (delete the run folder or choose another out_dir).")
        else:
            path, good_step = self.last_good
            where = (f"The last good checkpoint is {path} (step {good_step}); lower train.lr, "
                     "use train.precision=32, set train.on_nonfinite=skip, or check the data, "
                     "then continue with resume=auto.")
        return TrainingDiverged(f"training diverged by step {step}: {what}. {where}")

    def _end_of_epoch(self, epoch: int, progress, task) -> None:
        config = self.config
        row: dict[str, Any] = {"step": self.state["step"], "epoch": epoch}
        last = epoch == config.train.epochs or self.state["step"] >= self.total_steps
        if self.eval_data is not None and (config.monitor.knn or self.probe_trained) and (
                epoch % config.monitor.knn_every == 0 or last) and self.fabric.is_global_zero:
            # Decoded by loader workers (as at the end of the run): in the main process, a
            # GPU run's monitor would take about as long as its training epoch.
            row.update(evaluate(self.method.module, self.eval_data, config, self.fabric.device,
                                knn=config.monitor.knn, linear=False,
                                probe=self.probe.module if self.probe_trained else None,
                                num_workers=min(config.data.num_workers, 2),
                                show_progress=config.train.progress_bar, progress=progress))
        if self.train_seconds > 0:
            row["images_per_s"] = self.train_images / self.train_seconds
        # Wall time since the run started (data loading, training, monitors): time-to-accuracy.
        row["wall_time_s"] = self.elapsed_before + time.perf_counter() - self.started
        self.last_epoch_metrics = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        self.metrics.log(row)
        self._watch_collapse(row)
        shown = ", ".join(f"{key} {value:.1f}" if abs(value) >= 1 else f"{key} {value:.3g}"
                          for key, value in row.items() if key not in ("step", "epoch"))
        if self.fabric.is_global_zero:
            progress.console.print(f"epoch {epoch}: {shown}")
        every = config.train.checkpoint_every
        if every and epoch % every == 0:
            self.save_checkpoint(f"epoch={epoch}.ckpt")
        self.save_checkpoint("last.ckpt")

    def save_checkpoint(self, name: str) -> None:
        """Save the run's state; never from a non-finite state (then the run stops)."""
        fabric = self.fabric
        if not bool(self._state_finite()):
            raise self._diverged(self.state["step"],
                                 "the weights or buffers hold NaN or infinity")
        content = {
            "method": self.method.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.state["epoch"], "step": self.state["step"],
            "skipped_steps": self.state["skipped_steps"],
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(), "versions": versions(),
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.started,
        }
        rank_state = _rank_state(self.method.module, self.generator)
        if fabric.world_size > 1:  # every process's random streams, for an exact resume
            rank_states = [None] * fabric.world_size
            torch.distributed.all_gather_object(rank_states, rank_state)
        else:
            rank_states = [rank_state]
        content["rank_states"] = rank_states
        if self.probe is not None:
            content["probe"] = self.probe.module.state_dict()
            content["probe_optimizer"] = self.probe_optimizer.state_dict()
        if fabric.is_global_zero:
            path = self.checkpoint_dir / name
            partial = path.with_suffix(".partial")
            try:
                torch.save(content, partial)
                os.replace(partial, path)  # a killed save never leaves a truncated last.ckpt
            except (OSError, RuntimeError) as error:
                partial.unlink(missing_ok=True)
                if not _disk_full(error, path.parent, _tensor_bytes(content)):
                    raise
                raise CheckpointError(self._disk_full_message(path, content)) from None
        self.last_good = (self.checkpoint_dir / name, self.state["step"])
        fabric.barrier()

    def _skipped_files(self) -> list[str]:
        """The training split's unreadable files: left out when loading, or met by the
        DataLoader workers (flags in shared memory, merged over DDP processes, which read
        different files)."""
        if self.train_set is None:
            return []
        flags = self.train_set.read_failures
        if flags is not None and self.fabric.world_size > 1:
            flags = self.fabric.all_reduce(flags.to(self.fabric.device, torch.float32),
                                           reduce_op="max")
        return self.train_set.skipped_files(flags)

    def _disk_full_message(self, path: Path, content: dict[str, Any]) -> str:
        needed = _tensor_bytes(content)
        free = shutil.disk_usage(path.parent).free
        kept = (f"the last good checkpoint, {self.last_good[0]} (step {self.last_good[1]}), is "
                "intact" if self.last_good else "no earlier checkpoint exists")
        return (f"no space left on the disk of {path.parent} to save {path.name} at step "
                f"{self.state['step']}: it needs about {needed / 2**20:.0f} MiB and "
                f"{free / 2**20:.0f} MiB are free. Free some space, then continue with "
                f"resume=auto; {kept}.")

    def finish(self) -> dict[str, Any] | None:
        config, fabric = self.config, self.fabric
        bad_files = self._skipped_files()
        summary: dict[str, Any] = {
            "method": config.method.name,
            "masking": config.method.axis.masking if config.method.axis is not None else "none",
            "dataset": config.data.dataset, "backbone": config.model.backbone,
            "epochs": self.state["epoch"], "steps": self.state["step"], "seed": config.train.seed,
        }
        summary.update(self.last_epoch_metrics)
        if self.eval_data is not None and fabric.is_global_zero and (
                config.eval.knn or config.eval.linear):
            self.say("Evaluating the pretrained backbone...")
            workers = min(config.data.num_workers, 2)
            summary.update(evaluate(self.method.module, self.eval_data, config, fabric.device,
                                    knn=config.eval.knn, linear=config.eval.linear,
                                    num_workers=workers,
                                    show_progress=config.train.progress_bar))
            if config.eval.compare_random_init:
                self.say("Evaluating the randomly initialised backbone (same seed)...")
                torch.manual_seed(config.train.seed)
                random_method = build_method(config, self.pixel_stats).to(fabric.device)
                random = evaluate(random_method, self.eval_data, config, fabric.device,
                                  knn=config.eval.knn, linear=config.eval.linear,
                                  num_workers=workers,
                                  show_progress=config.train.progress_bar)
                summary.update({f"{key}_random_init": value for key, value in random.items()})
        summary["wall_time_s"] = self.elapsed_before + time.perf_counter() - self.started
        summary["images_per_s"] = (self.train_images / self.train_seconds
                                   if self.train_seconds else None)
        summary["skipped_steps"] = self.state["skipped_steps"]
        if "test_feature_std" in summary:  # the end-of-run evaluation's test features
            self._watch_collapse({"step": self.state["step"],
                                  "test_feature_std": summary["test_feature_std"]})
        summary.update({name: self.collapse.last[name] for name in self.collapse.last})
        summary["collapsed"] = self.collapse.collapsed
        summary["collapse_dims"] = dict(self.collapse.dims)  # d of 1/sqrt(d), the spread
        summary["bad_images"] = len(bad_files)
        summary["bad_image_files"] = bad_files[:100]
        if bad_files:
            self.say(f"Warning: {len(bad_files)} unreadable image files were skipped (e.g. "
                     f"{bad_files[0]}); summary.json lists them under bad_image_files.")
        summary["versions"] = versions()
        summary["device"] = device_name(fabric.device)
        summary["world_size"] = fabric.world_size
        if self.profiler is not None and self.profiler.summary is not None:
            summary["profile"] = self.profiler.summary
        if not fabric.is_global_zero:
            return None  # other DDP processes report nothing
        (Path(config.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        self._write_plots()
        return summary

    def _write_plots(self) -> None:
        """RUN/plots/*.png; a plot that cannot be drawn costs a note, never the run."""
        if self.config.train.plots == "none":
            return
        from mixmask.plots import write_plots

        try:
            written, skipped = write_plots(Path(self.config.out_dir),
                                           representation=self.config.train.plots == "all")
        except Exception as error:  # noqa: BLE001 - optional work never fails a saved run
            # The run itself is finished and saved; a picture is not worth failing it.
            # (A crash in a plotting library happens in a child process: an error here.)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.say(f"Note: some plots were not written: {first_line}")
            return
        if written:
            self.say(f"Plots: {', '.join(path.name for path in written)} in "
                     f"{written[0].parent}.")
        if skipped:
            self.say(f"Note: {skipped}")
