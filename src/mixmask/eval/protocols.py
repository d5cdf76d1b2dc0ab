"""The evaluation commands on a run folder: ``mixmask knn | linear | finetune``.

Each loads the run's resolved config (``config.yaml``, then an optional protocol file from
``configs/eval/``, then ``key=value`` overrides), a checkpoint of the run, and writes one
``RUN/eval/<protocol>.json`` that names its protocol beside its numbers, so results of
different protocols never overwrite each other and ``mixmask results`` can tabulate them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mixmask.config import Config
from mixmask.data.progress import image_progress
from mixmask.errors import ConfigError
from mixmask.eval.accuracy import EpochRecord
from mixmask.eval.data import (
    LABEL_FRACTIONS,
    AugmentedLabelled,
    classifier_train_transform,
    label_subset,
)
from mixmask.eval.finetune import Classifier, FinetuneSchedule, finetune
from mixmask.eval.frozen_run import FrozenRun, bad_images, print_line, result_header
from mixmask.eval.knn import knn_accuracy
from mixmask.eval.linear import linear_moco, train_linear_probe
from mixmask.methods import PixelStats
from mixmask.runs.folder import (
    build_run_method,
    evaluation_sets,
    load_run_checkpoint,
    load_run_config,
    write_result,
)
from mixmask.train.fabric import build_fabric, resolve_accelerator
from mixmask.train.signals import GivenStop, StopSignals

PROTOCOL_DESCRIPTIONS = {
    "knn": "weighted kNN (InstDisc): k={k}, t={t}, cosine similarity, centre-crop features",
    "linear_moco": "linear, MoCo protocol: frozen backbone (BN eval), per-epoch augmentation, "
                   "SGD lr {lr} m0.9 wd {wd}, {epochs} epochs, steps at {steps}",
    "linear_cached": "linear on cached standardised centre-crop features: SGD lr {lr} m0.9, "
                     "{epochs} epochs, steps at {steps}",
    "finetune": "finetune (Barlow Twins semi-supervised recipe): {labels} labels, "
                "lr backbone {lr_backbone} / head {lr_head}, wd {wd}, {epochs} epochs cosine, "
                "{init}",
    "finetune_mae": "finetune (MAE main_finetune.py recipe): {labels} labels, AdamW lr {lr} "
                    "(blr {blr} x {batch}/256), layer decay {layer_decay}, wd {wd}, "
                    "{warmup} warm-up + cosine of {epochs} epochs, {init}",
}


# --------------------------------------------------------------------------- the run


# --------------------------------------------------------------------------- kNN


def run_knn(run: Path, overrides: list[str], *, checkpoint: str | None = None,
            protocol_file: str | None = None, console: Console | None = None
            ) -> tuple[Path, dict[str, Any]]:
    frozen = FrozenRun.open(run, overrides, checkpoint=checkpoint,
                            protocol_file=protocol_file, console=console)
    started = time.perf_counter()
    train_features, train_labels, test_features, test_labels = frozen.split_features()
    k, t = frozen.config.eval.knn_k, frozen.config.eval.knn_temperature
    accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels,
                            num_classes=frozen.eval_data.num_classes, k=k, temperature=t)
    description = PROTOCOL_DESCRIPTIONS["knn"].format(k=k, t=t)
    result = frozen.header("knn", description, time.perf_counter() - started)
    result.update(top1=accuracy[1], top5=accuracy[5],
                  settings={"k": k, "temperature": t},
                  train_images=len(train_labels), test_images=len(test_labels))
    return write_result(run, "knn", result), result


# --------------------------------------------------------------------------- linear


def run_linear(run: Path, overrides: list[str], *, protocol: str,
               checkpoint: str | None = None, protocol_file: str | None = None,
               console: Console | None = None) -> tuple[Path, dict[str, Any]]:
    if protocol not in ("moco", "cached"):
        raise ConfigError(f"--protocol must be moco or cached, got {protocol!r}.")
    frozen = FrozenRun.open(run, overrides, checkpoint=checkpoint,
                            protocol_file=protocol_file, console=console)
    started = time.perf_counter()
    config, eval_data, method = frozen.config, frozen.eval_data, frozen.method
    evaluation = config.eval
    steps = [int(fraction * evaluation.linear_epochs)
             for fraction in evaluation.linear_milestones]

    if protocol == "cached":
        lr = evaluation.linear_lr
        (train_features, train_labels, test_features, test_labels) = frozen.split_features()
        record = EpochRecord()
        train_linear_probe(train_features, train_labels, num_classes=eval_data.num_classes,
                           epochs=evaluation.linear_epochs, lr=lr,
                           batch_size=evaluation.linear_batch_size,
                           milestones=evaluation.linear_milestones, seed=config.train.seed,
                           test_features=test_features, test_labels=test_labels,
                           record=record)
        train_images = len(train_labels)
        settings = {"lr": lr, "momentum": 0.9, "weight_decay": 0.0, "standardised": True}
    else:
        lr = evaluation.linear_moco_lr
        (test_features, test_labels) = frozen.split_features(train=False)
        image_set = eval_data.train.image_set
        train_set = AugmentedLabelled(
            image_set, torch.arange(len(image_set)),
            classifier_train_transform(config.data.image_size, image_set.mean, image_set.std),
            seed=config.train.seed)
        train_images = len(train_set)
        total = evaluation.linear_epochs * train_images
        with image_progress("linear (moco)", total, enabled=config.train.progress_bar,
                            console=console) as advance:
            record = linear_moco(
                method, method.features, train_set, test_features, test_labels,
                feature_dim=method.feature_dim, num_classes=eval_data.num_classes,
                epochs=evaluation.linear_epochs, lr=lr,
                weight_decay=evaluation.linear_weight_decay,
                batch_size=evaluation.linear_batch_size,
                milestones=evaluation.linear_milestones, seed=config.train.seed,
                device=frozen.device, num_workers=config.data.num_workers,
                batchnorm=evaluation.linear_batchnorm,
                on_epoch=lambda epoch, row: print_line(
                    console, f"linear (moco) epoch {epoch}/{evaluation.linear_epochs}: loss "
                    f"{row['loss']:.3f}, test top-1 {row['top1']:.2f}, top-5 {row['top5']:.2f}"),
                progress=advance)
        settings = {"lr": lr, "momentum": 0.9, "weight_decay": evaluation.linear_weight_decay,
                    "augmentation": "pad-4 crop + flip" if config.data.image_size <= 32
                    else "RandomResizedCrop + flip", "bn": "eval (frozen)",
                    "init": "N(0, 0.01), bias 0",
                    "head": ("BatchNorm (no affine) + linear (MAE main_linprobe.py)"
                             if evaluation.linear_batchnorm else "linear")}
    settings.update(epochs=evaluation.linear_epochs, batch_size=evaluation.linear_batch_size,
                    milestone_epochs=steps)
    name = f"linear_{protocol}"
    description = PROTOCOL_DESCRIPTIONS[name].format(
        lr=lr, wd=evaluation.linear_weight_decay, epochs=evaluation.linear_epochs, steps=steps)
    result = frozen.header(name, description, time.perf_counter() - started)
    result.update(record.summary(), settings=settings, history=record.history,
                  train_images=train_images, test_images=len(test_labels))
    return write_result(run, name, result), result


# --------------------------------------------------------------------------- finetune


def finetune_name(labels: str, from_scratch: bool) -> str:
    """``finetune_10pct`` / ``finetune_10pct_scratch``: the JSON and checkpoint folder."""
    return f"finetune_{labels.rstrip('%')}pct" + ("_scratch" if from_scratch else "")


def run_finetune(run: Path, overrides: list[str], *, labels: str, from_scratch: bool = False,
                 checkpoint: str | None = None, protocol_file: str | None = None,
                 console: Console | None = None, stop=None) -> tuple[Path, dict[str, Any]]:
    if labels not in LABEL_FRACTIONS:
        raise ConfigError(f"--labels must be one of {', '.join(LABEL_FRACTIONS)}, got "
                          f"{labels!r}.")
    if from_scratch and checkpoint:
        raise ConfigError("--from-scratch trains from the random init of train.seed; it takes "
                          "no --checkpoint.")
    config = load_run_config(run, overrides, protocol_file)
    checkpoint_path, content = (None, None) if from_scratch else load_run_checkpoint(
        run, checkpoint)
    evaluation, train = config.eval, config.train
    # The labelled train split (the label subset is drawn from it) and the test split.
    eval_data = evaluation_sets(config)
    train_images = eval_data.train.image_set
    indices, chosen = label_subset(train_images, labels, seed=evaluation.label_seed,
                                   split_file=evaluation.label_split_file)
    if evaluation.finetune_batch_size % train.processes:
        raise ConfigError(f"eval.finetune_batch_size={evaluation.finetune_batch_size} does not "
                          f"divide over {train.processes} processes.")
    fabric = build_fabric(config, resolve_accelerator(train.device))
    fabric.launch()
    pixel_stats = PixelStats(tuple(train_images.mean), tuple(train_images.std))
    method = build_run_method(config, pixel_stats, checkpoint_path, content)
    classifier = _classifier(method, evaluation, train_images.num_classes)
    train_set = AugmentedLabelled(
        train_images, indices,
        classifier_train_transform(config.data.image_size, train_images.mean, train_images.std,
                                   randaugment=evaluation.finetune_randaugment,
                                   random_erasing=evaluation.finetune_random_erasing),
        seed=train.seed)
    name = finetune_name(labels, from_scratch)
    init = (f"random init (train.seed={train.seed})" if from_scratch
            else f"pretrained ({checkpoint_path.name}, step {content.get('step')})")
    schedule = _finetune_schedule(config)
    settings = _finetune_settings(config, schedule, labels=labels, chosen=chosen,
                                  train_images=len(indices), init=init,
                                  global_pool=getattr(method.backbone, "global_pool", None),
                                  world_size=fabric.world_size)

    def say(message: str) -> None:
        if fabric.is_global_zero:
            print_line(console, message)

    total = evaluation.finetune_epochs * len(indices)
    stop_context = StopSignals() if stop is None else GivenStop(stop)
    with stop_context as stop_signals, image_progress(
            name.replace("_", " "), total, enabled=train.progress_bar and fabric.is_global_zero,
            console=console) as advance:
        record, wall_time_s = finetune(
            fabric=fabric, classifier=classifier, train_set=train_set,
            test_set=eval_data.test, schedule=schedule,
            checkpoint_path=run / "eval" / name / "last.ckpt", settings=settings,
            num_workers=config.data.num_workers,
            checkpoint_every_steps=train.checkpoint_every_steps, stop=stop_signals, say=say,
            progress=advance,
            on_epoch=lambda epoch, row: say(
                f"{name} epoch {epoch}/{evaluation.finetune_epochs}: test top-1 "
                f"{row['top1']:.2f}, top-5 {row['top5']:.2f}"))
    description = _finetune_description(evaluation, schedule, labels=labels, init=init)
    result = result_header(config, run, name, description, checkpoint_path, content,
                           fabric.device, wall_time_s)
    result.update(record.summary(), settings=settings, history=record.history,
                  from_scratch=from_scratch, test_images=len(eval_data.test),
                  **bad_images(eval_data))
    if not fabric.is_global_zero:
        return run / "eval" / f"{name}.json", result
    return write_result(run, name, result), result


def _classifier(method, evaluation, num_classes: int) -> Classifier:
    """The method's backbone with a linear head, as ``eval.finetune_*`` configure it."""
    backbone = method.backbone
    # Finetuning trains the whole network, parts a method froze to pretrain included
    # (SiameseIM's random patch embedding, MoCo v3 style, and its unused fc_norm).
    backbone.requires_grad_(True)
    if evaluation.finetune_drop_path > 0:
        backbone.set_drop_path(evaluation.finetune_drop_path)
    if evaluation.finetune_global_pool:
        backbone.set_global_pool(evaluation.finetune_global_pool)
    mae = evaluation.finetune_recipe == "mae"
    return Classifier(backbone, method.feature_dim, num_classes,
                      head_std=2e-5 if mae else 0.01, truncated=mae,
                      label_smoothing=evaluation.finetune_label_smoothing,
                      mixup_alpha=evaluation.finetune_mixup,
                      cutmix_alpha=evaluation.finetune_cutmix)


def _finetune_schedule(config: Config) -> FinetuneSchedule:
    evaluation = config.eval
    mae = evaluation.finetune_recipe == "mae"
    # MAE: lr = blr x effective batch / 256 (main_finetune.py); the head lr is the peak.
    lr_head = (evaluation.finetune_blr * evaluation.finetune_batch_size / 256 if mae
               else evaluation.finetune_lr_head)
    return FinetuneSchedule(
        epochs=evaluation.finetune_epochs, batch_size=evaluation.finetune_batch_size,
        lr_backbone=evaluation.finetune_lr_backbone, lr_head=lr_head,
        weight_decay=evaluation.finetune_weight_decay, seed=config.train.seed,
        recipe=evaluation.finetune_recipe, layer_decay=evaluation.finetune_layer_decay,
        min_lr=evaluation.finetune_min_lr if mae else 0.0,
        warmup_epochs=evaluation.finetune_warmup_epochs if mae else 0)


def _finetune_settings(config: Config, schedule: FinetuneSchedule, *, labels: str,
                       chosen: str, train_images: int, init: str, global_pool,
                       world_size: int) -> dict[str, Any]:
    """What the finetune JSON reports (and a resume checks against its checkpoint)."""
    evaluation, train = config.eval, config.train
    augmentation = ("pad-4 crop + flip" if config.data.image_size <= 32
                    else "RandomResizedCrop + flip")
    if evaluation.finetune_randaugment:
        augmentation += f" + RandAugment {evaluation.finetune_randaugment}"
    if evaluation.finetune_random_erasing:
        augmentation += f" + RandomErasing {evaluation.finetune_random_erasing}"
    settings = {"labels": labels, "label_subset": chosen, "train_images": train_images,
                "recipe": evaluation.finetune_recipe, "epochs": evaluation.finetune_epochs,
                "batch_size": evaluation.finetune_batch_size,
                "weight_decay": evaluation.finetune_weight_decay,
                "layer_decay": evaluation.finetune_layer_decay,
                "drop_path": evaluation.finetune_drop_path,
                "label_smoothing": evaluation.finetune_label_smoothing,
                "mixup": evaluation.finetune_mixup, "cutmix": evaluation.finetune_cutmix,
                "global_pool": global_pool, "bn": "train",
                "augmentation": augmentation, "init": init, "seed": train.seed,
                "precision": train.precision, "world_size": world_size}
    if schedule.recipe == "mae":
        settings.update(optimizer="adamw (0.9, 0.999)", blr=evaluation.finetune_blr,
                        lr=schedule.lr_head, min_lr=evaluation.finetune_min_lr,
                        warmup_epochs=evaluation.finetune_warmup_epochs,
                        schedule="linear warm-up + half-cosine per step",
                        head_init="trunc_normal(std 2e-5)")
    else:
        settings.update(optimizer="sgd momentum 0.9",
                        lr_backbone=evaluation.finetune_lr_backbone, lr_head=schedule.lr_head,
                        schedule="cosine per epoch", head_init="N(0, 0.01)")
    return settings


def _finetune_description(evaluation, schedule: FinetuneSchedule, *, labels: str,
                          init: str) -> str:
    if schedule.recipe == "mae":
        return PROTOCOL_DESCRIPTIONS["finetune_mae"].format(
            labels=labels, lr=f"{schedule.lr_head:.3g}", blr=evaluation.finetune_blr,
            batch=evaluation.finetune_batch_size, layer_decay=evaluation.finetune_layer_decay,
            wd=evaluation.finetune_weight_decay, warmup=evaluation.finetune_warmup_epochs,
            epochs=evaluation.finetune_epochs, init=init)
    return PROTOCOL_DESCRIPTIONS["finetune"].format(
        labels=labels, lr_backbone=evaluation.finetune_lr_backbone,
        lr_head=evaluation.finetune_lr_head, wd=evaluation.finetune_weight_decay,
        epochs=evaluation.finetune_epochs, init=init)
