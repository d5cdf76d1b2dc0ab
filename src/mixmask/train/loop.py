"""Pretraining, on Lightning Fabric (precision, devices, DDP, seeding): :func:`pretrain`.

The engine knows no method: it builds the registered class of ``method.name``
(:mod:`mixmask.methods.protocol`), loads the views that method asks for, and hands the
parts to a :class:`~mixmask.train.trainer.Trainer`, which runs
:func:`mixmask.train.step.training_step` over the batches, then the online probe.
Evaluation is :func:`mixmask.eval.evaluate`; the pictures of a run are the CLI's
(:mod:`mixmask.pictures`), drawn after :func:`pretrain` returns.

:func:`pretrain` is four steps, in an order that keeps runs reproducible (each draws from
the global random streams in turn): :func:`check` (nothing written yet), the run folder,
:func:`build_parts`, :func:`resume` and the trainer's fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from mixmask.config import Config
from mixmask.data import EpochBatchSampler, ImageSet, build_train_loader
from mixmask.data.splits import load_eval_data, load_split
from mixmask.errors import ConfigError, MixmaskError
from mixmask.methods import PixelStats, build_method
from mixmask.methods.registry import method_class
from mixmask.ops.optim import build_optimizer
from mixmask.runs.folder import check_out_dir, start_run_folder
from mixmask.runs.resume import restore_training_state, resume_checkpoint
from mixmask.train.fabric import (
    build_fabric,
    compile_networks,
    grad_scaler,
    printer,
    resolve_accelerator,
    settle_precision,
)
from mixmask.train.metrics_log import MetricsLog
from mixmask.train.runtime import keep_freed_cpu_memory
from mixmask.train.signals import StopSignals
from mixmask.train.trainer import Parts, RunStopped, Trainer, TrainingDiverged
from mixmask.train.wandb_log import open_wandb_run, require_wandb

__all__ = ["RunStopped", "TrainingDiverged", "build_parts", "check", "pretrain", "resume"]


def pretrain(config: Config, *, console=None) -> dict[str, Any] | None:
    """Pretrain as the config says; returns the summary also written to summary.json
    (None in DDP processes other than global rank 0)."""
    accelerator = resolve_accelerator(config.train.device)
    if config.train.sync_batchnorm and accelerator != "cuda" and config.train.processes > 1:
        raise ConfigError("train.sync_batchnorm=true needs CUDA GPUs (torch's SyncBatchNorm "
                          "runs on GPUs only); drop it for CPU processes.")
    precision = settle_precision(config, accelerator)  # before config.yaml records it
    fabric = build_fabric(config, accelerator)
    fabric.launch()
    if accelerator == "cpu" and config.train.keep_cpu_memory:
        keep_freed_cpu_memory()
    say = printer(fabric, console)
    say(f"Precision: {precision}.")
    resume_path, train_set = check(config, say)
    out_dir = Path(config.out_dir)
    if fabric.is_global_zero:
        start_run_folder(config, out_dir)
    fabric.seed_everything(config.train.seed)
    parts = build_parts(config, fabric, train_set, say)
    state, elapsed_before = resume(config, fabric, parts, resume_path, say)
    wandb_run = (open_wandb_run(out_dir, config)
                 if config.train.logger == "wandb" and fabric.is_global_zero else None)
    metrics = MetricsLog(out_dir, fabric.is_global_zero,
                         state["step"] if resume_path is not None else None, wandb_run)
    trainer = Trainer(config, fabric, parts, state, metrics, say, elapsed_before=elapsed_before,
                      resumed_from=resume_path)
    try:
        with StopSignals() as stop:
            trainer.stop = stop
            trainer.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: out now, mid-step, so nothing is saved
        kept = (f"the last checkpoint, {trainer.last_good[0]} (step {trainer.last_good[1]}), "
                "is kept" if trainer.last_good else "no checkpoint was saved")
        raise MixmaskError(f"interrupted twice, during step {state['step'] + 1}: stopped "
                           f"without saving; {kept}. Continue with resume=auto.") from None
    finally:
        metrics.close()
    return trainer.finish()


def check(config: Config, say) -> tuple[Path | None, ImageSet]:
    """Everything that can be wrong before a run writes anything: the out_dir, a run
    already there, the logger, the training data. Returns the checkpoint to resume from
    (or None) and the loaded training split."""
    out_dir = Path(config.out_dir)
    check_out_dir(out_dir)
    resume_path = resume_checkpoint(config)
    if resume_path is None and (out_dir / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"{out_dir} already holds a run. Continue it with resume=auto, or "
                          "choose another out_dir (or delete that folder) to start afresh.")
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
    return resume_path, train_set


def build_parts(config: Config, fabric: Fabric, train_set: ImageSet, say) -> Parts:
    """The run's sampler, evaluation sets, method (with its views' loader), optimizer,
    online probe and step generator, set up on Fabric."""
    train = config.train
    sampler = EpochBatchSampler(len(train_set), train.batch_size, seed=train.seed,
                                rank=fabric.global_rank, world_size=fabric.world_size)
    eval_data, no_eval_reason = (None, "monitors are off")
    if config.monitor.knn or config.monitor.online_probe or config.eval.knn or config.eval.linear:
        eval_data, no_eval_reason = load_eval_data(config)
    if eval_data is None:
        say(f"Note: kNN and linear-probe monitors are skipped: {no_eval_reason}.")

    torch.manual_seed(train.seed)  # the same initial weights as the random-init baseline
    pixel_stats = PixelStats(tuple(train_set.mean), tuple(train_set.std))
    method = build_method(config, pixel_stats)
    loader = build_train_loader(train_set, sampler, method.view_configs(),
                                pipeline=config.data.pipeline, device=fabric.device,
                                seed=train.seed, rank=fabric.global_rank,
                                num_workers=config.data.num_workers,
                                channels_last=train.channels_last)
    if train.sync_batchnorm and fabric.world_size > 1:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if train.compile:
        compile_networks(method, config)
    # Fabric clips fp16 gradients after unscaling them itself, which a fused optimizer
    # (it unscales inside its own step) does not allow: that combination runs unfused.
    fused = train.fused_optimizer and not (grad_scaler(fabric) is not None
                                           and train.grad_clip > 0)
    if train.fused_optimizer and not fused:
        say("Note: fp16 with gradient clipping runs the unfused optimizer (the gradients are "
            "unscaled before clipping, which a fused optimizer cannot take).")
    if train.optimizer == "sgd" and getattr(method, "drops_gradients", False):
        # Parameters whose gradients the method drops at first (DINO's prototypes in epoch
        # 1) get their first gradient after the others have momentum buffers, a mix torch's
        # fused SGD refuses: the multi-tensor update (the same update) runs instead.
        fused = False
    optimizer = build_optimizer(
        train.optimizer, method.parameter_groups(train.optimizer), lr=train.lr,
        momentum=train.momentum, weight_decay=train.weight_decay, betas=train.betas,
        eta=train.lars_eta, clip_lr=train.lars_clip_lr, fused=fused)
    method, optimizer = fabric.setup(method, optimizer)
    parts = Parts(train_set=train_set, sampler=sampler,
                  steps_per_epoch=len(train_set) // train.batch_size, eval_data=eval_data,
                  pixel_stats=pixel_stats, method=method, optimizer=optimizer, loader=loader,
                  generator=torch.Generator(device=fabric.device))
    if config.monitor.online_probe and eval_data is not None:
        probe = nn.Linear(method.feature_dim, eval_data.num_classes)
        probe_optimizer = torch.optim.SGD(probe.parameters(), lr=config.monitor.probe_lr,
                                          momentum=0.9)
        parts.probe, parts.probe_optimizer = fabric.setup(probe, probe_optimizer)
    parts.generator.manual_seed(train.seed * 1_000 + fabric.global_rank)
    return parts


def resume(config: Config, fabric: Fabric, parts: Parts, resume_path: Path | None, say
           ) -> tuple[dict[str, Any], float]:
    """The counters to start from (epoch, step, skipped steps) and the wall time already
    spent: zeros for a new run, else the checkpoint's, its state loaded into ``parts``."""
    state = {"method": parts.method, "optimizer": parts.optimizer, "epoch": 0, "step": 0,
             "skipped_steps": 0}
    if parts.probe is not None:
        state.update(probe=parts.probe, probe_optimizer=parts.probe_optimizer)
    if resume_path is None:
        return state, 0.0
    modules = {"method": parts.method.module,
               "probe": parts.probe.module if parts.probe is not None else None}
    optimizers = {"optimizer": parts.optimizer, "probe_optimizer": parts.probe_optimizer}
    restored = restore_training_state(resume_path, config, modules, optimizers,
                                      parts.generator, world_size=fabric.world_size,
                                      rank=fabric.global_rank, say=say)
    elapsed_before = restored.pop("wall_time_s")
    state.update(restored)
    say(f"Resumed from {resume_path} at epoch {state['epoch']}, step {state['step']}.")
    return state, elapsed_before
