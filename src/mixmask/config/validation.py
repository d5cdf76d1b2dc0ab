"""Cross-checks of a built config: what no single key's type can say (schedules, process
counts, the method's and the backbone's own checks, the finetuning recipe)."""

from __future__ import annotations

import re

from mixmask.config.schema import Config, TrainConfig
from mixmask.errors import ConfigError
from mixmask.methods.registry import method_class
from mixmask.models.backbones import backbone_traits, validate_backbone
from mixmask.models.vit import validate_vit


def validate(config: Config) -> None:
    """Cross-field checks the types cannot express; then the active method's own checks
    (its class's ``validate_config``) and the backbone registry's."""

    _check_transfer(config.transfer)
    _check_scenarios(config.scenarios)
    positive = {
        "data.image_size": config.data.image_size,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.devices": config.train.devices,
        "train.num_nodes": config.train.num_nodes,
        "train.lr": config.train.lr,
        "model.width": config.model.width,
        "monitor.knn_k": config.monitor.knn_k,
        "monitor.knn_every": config.monitor.knn_every,
        "monitor.knn_temperature": config.monitor.knn_temperature,
        "monitor.probe_lr": config.monitor.probe_lr,
        "train.log_every": config.train.log_every,
        "train.lars_eta": config.train.lars_eta,
        "eval.linear_epochs": config.eval.linear_epochs,
        "eval.linear_lr": config.eval.linear_lr,
        "eval.linear_batch_size": config.eval.linear_batch_size,
        "eval.linear_moco_lr": config.eval.linear_moco_lr,
        "eval.knn_k": config.eval.knn_k,
        "eval.knn_temperature": config.eval.knn_temperature,
        "eval.finetune_epochs": config.eval.finetune_epochs,
        "eval.finetune_batch_size": config.eval.finetune_batch_size,
        "eval.finetune_lr_head": config.eval.finetune_lr_head,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}.")
    for key, value in {
        "data.subset": config.data.subset,
        "train.max_steps": config.train.max_steps,
        "data.num_workers": config.data.num_workers,
        "data.num_views": config.data.num_views,
        "model.patch_size": config.model.patch_size,
        "train.profile_steps": config.train.profile_steps,
        "train.profile_start_step": config.train.profile_start_step,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.checkpoint_every_steps": config.train.checkpoint_every_steps,
        "data.eval_train_subset": config.data.eval_train_subset,
        "data.eval_test_subset": config.data.eval_test_subset,
        "train.weight_decay": config.train.weight_decay,
        "train.warmup_epochs": config.train.warmup_epochs,
        "train.min_lr": config.train.min_lr,
        "train.grad_clip": config.train.grad_clip,
        "eval.linear_weight_decay": config.eval.linear_weight_decay,
        "eval.finetune_lr_backbone": config.eval.finetune_lr_backbone,
        "eval.finetune_weight_decay": config.eval.finetune_weight_decay,
    }.items():
        if value < 0:
            raise ConfigError(f"'{key}' must be 0 or more, got {value}.")
    if config.train.weight_decay_end < 0 and config.train.weight_decay_end != -1:
        raise ConfigError("'train.weight_decay_end' must be 0 or more (or -1: constant), got "
                          f"{config.train.weight_decay_end}.")
    if not 0.0 <= config.model.drop_path_rate < 1.0:
        raise ConfigError("'model.drop_path_rate' must lie in [0, 1), got "
                          f"{config.model.drop_path_rate}.")
    if not 0.0 <= config.train.momentum < 1.0:
        raise ConfigError(f"'train.momentum' must lie in [0, 1), got {config.train.momentum}.")
    if not 0.0 <= config.data.max_bad_fraction <= 1.0:
        raise ConfigError("'data.max_bad_fraction' must lie in [0, 1], got "
                          f"{config.data.max_bad_fraction}.")
    _validate_finetune(config)
    _validate_schedule(config.train)
    for milestone in config.eval.linear_milestones:
        if not 0.0 < milestone <= 1.0:
            raise ConfigError(f"'eval.linear_milestones' are fractions of the epochs in (0, 1], "
                              f"got {milestone}.")
    for index, beta in enumerate(config.train.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"'train.betas' must lie in [0, 1), got {beta} at position {index}.")
    processes = config.train.processes
    if config.train.batch_size % processes:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by "
                          f"the number of processes ({processes} = train.devices x "
                          "train.num_nodes): it is the global batch, split evenly.")
    validate_backbone(config.model)
    validate_vit(config.model, config.data.image_size)
    method_class(config.method.name).validate_config(config)


def _validate_schedule(train: TrainConfig) -> None:
    if train.schedule == "step" and not train.lr_milestones:
        raise ConfigError("train.schedule=step needs train.lr_milestones (the epochs at which "
                          "the lr is multiplied by train.lr_gamma), e.g. [700].")
    for milestone in train.lr_milestones:
        if not 0 < milestone <= train.epochs:
            raise ConfigError(f"'train.lr_milestones' are epochs in (0, train.epochs="
                              f"{train.epochs}], got {milestone}.")
    if not 0 < train.lr_gamma <= 1:
        raise ConfigError(f"'train.lr_gamma' must lie in (0, 1], got {train.lr_gamma}.")
    if train.schedule == "cosine" and train.min_lr > train.lr:
        raise ConfigError(f"'train.min_lr' ({train.min_lr}) is above train.lr ({train.lr}).")


FINETUNE_RECIPES = ("sgd", "mae")


def _validate_finetune(config: Config) -> None:
    evaluation = config.eval
    if evaluation.finetune_recipe not in FINETUNE_RECIPES:
        raise ConfigError(f"'eval.finetune_recipe' must be one of {', '.join(FINETUNE_RECIPES)}"
                          f", got {evaluation.finetune_recipe!r}.")
    for key in ("finetune_blr", "finetune_min_lr", "finetune_warmup_epochs",
                "finetune_mixup", "finetune_cutmix"):
        if getattr(evaluation, key) < 0:
            raise ConfigError(f"'eval.{key}' must be 0 or more, got {getattr(evaluation, key)}.")
    if evaluation.finetune_recipe == "mae" and evaluation.finetune_blr <= 0:
        raise ConfigError("'eval.finetune_blr' must be positive for eval.finetune_recipe=mae.")
    if evaluation.finetune_recipe == "mae" and (
            evaluation.finetune_warmup_epochs > evaluation.finetune_epochs):
        raise ConfigError(f"'eval.finetune_warmup_epochs' ({evaluation.finetune_warmup_epochs}) "
                          f"exceeds eval.finetune_epochs ({evaluation.finetune_epochs}).")
    for key in ("finetune_drop_path", "finetune_label_smoothing"):
        if not 0.0 <= getattr(evaluation, key) < 1.0:
            raise ConfigError(f"'eval.{key}' must lie in [0, 1), got {getattr(evaluation, key)}.")
    if not 0.0 <= evaluation.finetune_random_erasing <= 1.0:
        raise ConfigError("'eval.finetune_random_erasing' is a probability in [0, 1], got "
                          f"{evaluation.finetune_random_erasing}.")
    if not 0.0 < evaluation.finetune_layer_decay <= 1.0:
        raise ConfigError("'eval.finetune_layer_decay' must lie in (0, 1] (1 = off), got "
                          f"{evaluation.finetune_layer_decay}.")
    if evaluation.finetune_global_pool not in ("", "token", "avg"):
        raise ConfigError("'eval.finetune_global_pool' must be '', 'token' or 'avg', got "
                          f"{evaluation.finetune_global_pool!r}.")
    vit_only = {"finetune_layer_decay": evaluation.finetune_layer_decay != 1.0,
                "finetune_drop_path": evaluation.finetune_drop_path > 0,
                "finetune_global_pool": evaluation.finetune_global_pool != ""}
    used = [key for key, set_ in vit_only.items() if set_]
    if used and not backbone_traits(config.model.backbone).tokens:
        raise ConfigError(f"'eval.{used[0]}' applies to ViT backbones (its blocks and tokens); "
                          f"this run's model.backbone is {config.model.backbone}.")
    policy = evaluation.finetune_randaugment
    # timm's rand_augment_transform silently skips sections without a number.
    if policy and not re.fullmatch(r"rand(-(m|n|mstd|mmax|inc|p)\d+(\.\d+)?|-t\w+)*", policy):
        raise ConfigError("'eval.finetune_randaugment' takes a timm RandAugment policy such as "
                          f"'rand-m9-mstd0.5-inc1' (or '' for none), got {policy!r}.")




def _check_transfer(transfer) -> None:
    """The ``transfer`` section (mixmask detect / segment)."""
    for key in ("iterations", "batch_size", "image_size", "lr", "segment_lr",
                "segment_linear_lr", "pyramid_channels", "rois_per_image", "segment_channels",
                "eval_batch_size"):
        if getattr(transfer, key) <= 0:
            raise ConfigError(f"'transfer.{key}' must be positive, got "
                              f"{getattr(transfer, key)}.")
    for key in ("max_size", "train_images", "test_images", "weight_decay",
                "segment_weight_decay", "warmup_iterations", "checkpoint_every"):
        if getattr(transfer, key) < 0:
            raise ConfigError(f"'transfer.{key}' must be 0 or more, got "
                              f"{getattr(transfer, key)}.")
    if not 0.0 < transfer.layer_decay <= 1.0:
        raise ConfigError("'transfer.layer_decay' must lie in (0, 1] (1 = off), got "
                          f"{transfer.layer_decay}.")
    if not 0.0 <= transfer.drop_path < 1.0:
        raise ConfigError(f"'transfer.drop_path' must lie in [0, 1), got {transfer.drop_path}.")
    if not all(0.0 < fraction < 1.0 for fraction in transfer.milestones):
        raise ConfigError("'transfer.milestones' are fractions of transfer.iterations, each "
                          f"in (0, 1); got {list(transfer.milestones)}.")


def _check_scenarios(scenarios) -> None:
    """The ``scenarios`` section (mixmask fewshot / longtail / robustness)."""
    if not scenarios.fewshot_shots or min(scenarios.fewshot_shots) < 1:
        raise ConfigError("'scenarios.fewshot_shots' are images per class, each 1 or more; got "
                          f"{list(scenarios.fewshot_shots)}.")
    if not all(0.0 < fraction < 1.0 for fraction in scenarios.fewshot_fractions):
        raise ConfigError("'scenarios.fewshot_fractions' are shares of the train split, each in "
                          f"(0, 1); got {list(scenarios.fewshot_fractions)}.")
    for key in ("fewshot_episodes", "logistic_max_iterations"):
        if getattr(scenarios, key) < 1:
            raise ConfigError(f"'scenarios.{key}' must be 1 or more, got "
                              f"{getattr(scenarios, key)}.")
    if not scenarios.logistic_lambda >= 0:
        raise ConfigError("'scenarios.logistic_lambda' must be 0 or more, got "
                          f"{scenarios.logistic_lambda}.")
    if not scenarios.longtail_imbalance >= 1:
        raise ConfigError("'scenarios.longtail_imbalance' is the largest over the smallest "
                          f"class, 1 or more; got {scenarios.longtail_imbalance}.")
    if not 0 <= scenarios.longtail_few <= scenarios.longtail_many:
        raise ConfigError("'scenarios.longtail_few' must lie between 0 and "
                          f"scenarios.longtail_many ({scenarios.longtail_many}); got "
                          f"{scenarios.longtail_few}.")
    if not scenarios.robustness_severities or not all(
            1 <= severity <= 5 for severity in scenarios.robustness_severities):
        raise ConfigError("'scenarios.robustness_severities' are levels 1 to 5; got "
                          f"{list(scenarios.robustness_severities)}.")
    if not re.fullmatch(r"linear|finetune_\d+pct", scenarios.robustness_classifier):
        raise ConfigError("'scenarios.robustness_classifier' is 'linear' or a finished finetune "
                          "of the run such as 'finetune_10pct'; got "
                          f"{scenarios.robustness_classifier!r}.")
    if scenarios.robustness_test_images < 0:
        raise ConfigError("'scenarios.robustness_test_images' must be 0 (all) or more, got "
                          f"{scenarios.robustness_test_images}.")
