"""What DINO (arXiv 2104.14294) and iBOT (arXiv 2111.07832) share: the keys of the teacher,
its head, its temperatures and the multi-crop views, and the per-epoch rules of their
reference code (teacher-temperature warm-up, the last layer frozen in the first epochs).

The loss's formulas are pure functions in :mod:`mixmask.ops.losses.distillation`; the head
is :class:`mixmask.models.heads.DINOHead`; the views are
:func:`mixmask.data.views.multi_crop_views`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from mixmask.data.views import ViewConfig, multi_crop_views
from mixmask.errors import ConfigError
from mixmask.methods.common import check_unit_interval
from mixmask.models.backbones import backbone_traits
from mixmask.models.heads import DINOHead
from mixmask.models.vit import resolve_patch_size
from mixmask.ops.losses.distillation import teacher_temperature

# DINO's local crops are 96 px at 224 (main_dino.py, local_crops_size).
_REFERENCE_LOCAL_SIZE, _REFERENCE_SIZE = 96, 224


@dataclass
class SelfDistillationConfig:
    """Defaults: solo-learn's CIFAR DINO (``scripts/pretrain/cifar/dino.yaml`` and
    ``solo/methods/dino.py``'s arguments); DINO's ImageNet recipes differ in
    ``num_prototypes`` (65,536), the teacher temperatures, ``momentum`` (0.996) and the
    multi-crop (``configs/imagenet/dino_*.yaml``)."""

    proj_hidden_dim: int = 2048
    # The head's L2-normalised bottleneck, before the prototypes.
    bottleneck_dim: int = 256
    num_prototypes: int = 4096
    proj_layers: int = 3
    use_bn_in_head: bool = False
    # Prototypes of unit norm (the weight-norm gain frozen at 1); DINO's ViT-S/16 best run
    # sets it false.
    norm_last_layer: bool = True
    student_temperature: float = 0.1
    # The teacher's temperature rises linearly per epoch from warmup_teacher_temperature
    # to teacher_temperature over warmup_teacher_temperature_epochs, then stays.
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: int = 50
    center_momentum: float = 0.9
    # Teacher EMA momentum, cosine from momentum to momentum_end over training (per step).
    momentum: float = 0.9995
    momentum_end: float = 1.0
    # The prototypes (the head's last layer) get no update in the first N epochs.
    freeze_last_layer_epochs: int = 1
    # Multi-crop: 2 global views (data.augmentation's two, at data.image_size) and
    # local_crops smaller ones, student only; local_crop_size 0 = 96 x S / 224 rounded to
    # the backbone's patch (14 at 32 px for a ResNet, 12 for a ViT with 4 px patches).
    local_crops: int = 0
    local_crop_size: int = 0
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)


def local_crop_size(params: SelfDistillationConfig, config) -> int:
    """The local views' side in px: the key, or DINO's 96 / 224 of data.image_size rounded
    to a multiple of the ViT's patch (of 2 for a ConvNet)."""
    if params.local_crop_size:
        return params.local_crop_size
    multiple = _patch(config) or 2
    wanted = config.data.image_size * _REFERENCE_LOCAL_SIZE / _REFERENCE_SIZE
    return max(multiple, round(wanted / multiple) * multiple)


def _patch(config) -> int:
    if not backbone_traits(config.model.backbone).tokens:
        return 0
    return resolve_patch_size(config.model.patch_size, config.data.image_size)


def validate_self_distillation(params: SelfDistillationConfig, section: str, config) -> None:
    """One ConfigError sentence for keys these methods cannot run."""
    for key in ("proj_hidden_dim", "bottleneck_dim", "num_prototypes", "proj_layers"):
        if getattr(params, key) < 1:
            raise ConfigError(f"'{section}.{key}' must be positive, got {getattr(params, key)}.")
    for key in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
        if getattr(params, key) <= 0:
            raise ConfigError(f"'{section}.{key}' must be positive, got {getattr(params, key)}.")
    check_unit_interval(params, section, "center_momentum", "momentum", "momentum_end")
    for key in ("warmup_teacher_temperature_epochs", "freeze_last_layer_epochs", "local_crops",
                "local_crop_size"):
        if getattr(params, key) < 0:
            raise ConfigError(f"'{section}.{key}' must be 0 or more, got {getattr(params, key)}.")
    for key in ("global_crop_scale", "local_crop_scale"):
        low, high = getattr(params, key)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"'{section}.{key}' must be [low, high] with 0 < low <= high "
                              f"<= 1, got {list(getattr(params, key))}.")
    patch = _patch(config)
    if params.local_crops and patch and local_crop_size(params, config) % patch:
        raise ConfigError(f"'{section}.local_crop_size' ({local_crop_size(params, config)}) "
                          f"must be a multiple of the ViT's patch ({patch}).")


def build_head(params: SelfDistillationConfig, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, hidden_dim=params.proj_hidden_dim,
                    bottleneck_dim=params.bottleneck_dim, num_prototypes=params.num_prototypes,
                    num_layers=params.proj_layers, batch_norm=params.use_bn_in_head,
                    norm_last_layer=params.norm_last_layer)


def distillation_views(params: SelfDistillationConfig, config) -> list[ViewConfig]:
    """The 2 global views of data.augmentation, then the local crops."""
    return multi_crop_views(config.data.augmentation, config.data.image_size,
                            global_scale=params.global_crop_scale,
                            local_crops=params.local_crops,
                            local_size=local_crop_size(params, config),
                            local_scale=params.local_crop_scale)


def epoch_at(progress: float, epochs: int) -> int:
    """The 0-based epoch of ``progress`` = step / total steps (the engine's), with a guard
    against rounding: 0.7 x 10 is 7.000000000000001, 0.3 x 3 could come out under 0.9."""
    return math.floor(progress * epochs + 1e-9)


def teacher_temperature_at(params: SelfDistillationConfig, progress: float, epochs: int
                           ) -> float:
    return teacher_temperature(epoch_at(progress, epochs),
                               start=params.warmup_teacher_temperature,
                               end=params.teacher_temperature,
                               warmup_epochs=params.warmup_teacher_temperature_epochs)


def drop_last_layer_gradients(last_layers: list[nn.Module], params: SelfDistillationConfig,
                              progress: float, epochs: int) -> None:
    """DINO's ``cancel_gradients_last_layer``: in the first ``freeze_last_layer_epochs``
    epochs the prototypes' gradients are set to None, so the optimizer skips them (no
    update, no weight decay); "freezing the last layer during the first epoch helps
    training" (DINO, app. "Projection head")."""
    if epoch_at(progress, epochs) >= params.freeze_last_layer_epochs:
        return
    for layer in last_layers:
        for parameter in layer.parameters():
            parameter.grad = None
