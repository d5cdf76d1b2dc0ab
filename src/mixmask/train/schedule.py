"""Learning-rate schedules: pretraining's (per step) and finetuning's (per epoch or step)."""

from __future__ import annotations

import math

from mixmask.config import Config


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


def weight_decay(config: Config, step: int, steps_per_epoch: int) -> float:
    """train.weight_decay, or with train.weight_decay_end >= 0 DINO's cosine_scheduler for
    it (``utils.py``, no warm-up): from train.weight_decay at step 0 towards
    train.weight_decay_end at the end of train.epochs."""
    train = config.train
    if train.weight_decay_end < 0:
        return train.weight_decay
    progress = step / max(1, train.epochs * steps_per_epoch)
    return train.weight_decay_end + 0.5 * (train.weight_decay - train.weight_decay_end) * (
        1.0 + math.cos(math.pi * progress))


def cosine_epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch (evaluate.py):
    the lr of epoch ``epoch`` (0-based)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def warmup_cosine_lr(peak: float, floor: float, epoch: float, *, warmup_epochs: float,
                     epochs: float) -> float:
    """MAE's ``util/lr_sched.py: adjust_learning_rate`` at a fractional epoch (it is called
    every step with ``step / steps_per_epoch + epoch``): linear from 0 over the warm-up,
    then a half-cosine from ``peak`` to ``floor``."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step_lr(base: float, iteration: int, *, iterations: int, warmup_iterations: int,
                   warmup_factor: float, milestones: tuple[float, ...], gamma: float) -> float:
    """detectron2's ``WarmupMultiStepLR`` (linear warm-up) at ``iteration`` (0-based):
    ``base`` x ``gamma`` per milestone passed (milestones as fractions of ``iterations``),
    times a factor rising linearly from ``warmup_factor`` at 0 to 1 at
    ``warmup_iterations``."""
    passed = sum(iteration >= round(fraction * iterations) for fraction in milestones)
    lr = base * gamma ** passed
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def poly_lr(base: float, iteration: int, *, iterations: int, power: float,
            floor: float = 0.0) -> float:
    """mmsegmentation's ``PolyLR`` (by iteration): ``(base - floor) x (1 - it / its) **
    power + floor``."""
    return (base - floor) * (1 - iteration / iterations) ** power + floor
