"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297) as a Siamese base.

Query encoder f_q = backbone + MLP projector; key encoder f_k its EMA (MoCo eq. 2),
InfoNCE of each query against its key and a queue of past keys (MoCo eq. 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.distributed import gather_all, shuffled_forward
from mixmask.errors import ConfigError
from mixmask.losses import info_nce
from mixmask.methods.base import (
    SiameseMethod,
    SymmetricReduction,
    check_unit_interval,
    cosine_momentum,
    ema_update,
)
from mixmask.methods.registry import register_method
from mixmask.models.heads import MLPHead


@dataclass
class MoCoV2Config:
    """MoCo v2 (Chen et al. 2020, arXiv 2003.04297); defaults: the Un-Mix CIFAR recipe."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    queue_size: int = 4096
    momentum: float = 0.99
    # constant (MoCo v2, Un-Mix) or cosine from momentum to momentum_end (solo-learn's
    # MoCo v2+ CIFAR recipe: 0.99 -> 0.999).
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    momentum_end: float = 0.999
    temperature: float = 0.1
    # Symmetric loss: each view is query once and key once (two losses, both keys enqueued).
    symmetric: bool = True
    # The two directions summed (Un-Mix's CIFAR code and MoCo's CIFAR demo: loss_12 +
    # loss_21) or averaged (solo-learn's MoCo v2+).
    symmetric_reduction: SymmetricReduction = "sum"
    # Shuffle-BN for the key encoder across processes under DDP (no-op on one device, where
    # BN already normalises over the whole batch).
    shuffle_bn: bool = True


@register_method("mocov2")
class MoCoV2(SiameseMethod):
    config_class = MoCoV2Config

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.symmetric = params.symmetric
        self.symmetric_reduction = params.symmetric_reduction
        self.temperature = params.temperature
        self.momentum = params.momentum
        self.momentum_end = (params.momentum_end if params.momentum_schedule == "cosine"
                             else params.momentum)
        self.shuffle_bn = params.shuffle_bn
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim, params.proj_output_dim)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        queue = F.normalize(torch.randn(params.queue_size, params.proj_output_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        params = config.method.mocov2
        if params.queue_size < config.train.batch_size:
            raise ConfigError(
                f"'method.mocov2.queue_size' ({params.queue_size}) must hold at least one "
                f"batch of keys (train.batch_size={config.train.batch_size}).")
        check_unit_interval(params, "method.mocov2", "momentum", "momentum_end")
        if params.temperature <= 0:
            raise ConfigError(f"'method.mocov2.temperature' must be positive, got "
                              f"{params.temperature}.")

    @torch.no_grad()
    def target_embedding(self, images: Tensor) -> Tensor:
        def encode(batch: Tensor) -> Tensor:
            return self.target_projector(self.target_backbone(batch))

        # Shuffle-BN (MoCo sec. 3.3) across processes; on one process BN already sees the
        # whole batch, so shuffling would change nothing.
        keys = shuffled_forward(encode, images) if self.shuffle_bn else encode(images)
        return F.normalize(keys.float(), dim=1)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return info_nce(online, target, self.queue, self.temperature)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        momentum = cosine_momentum(self.momentum, self.momentum_end, progress)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
        # Keys enter the queue once per step, however many loss terms used them.
        self._enqueue(gather_all(torch.cat(targets)))

    def _enqueue(self, keys: Tensor) -> None:
        # A ring buffer with wrap-around: no constraint that the queue size divides the
        # number of keys per step, and no host sync for the pointer.
        size = self.queue.shape[0]
        positions = (self.queue_pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[positions] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + keys.shape[0]) % size)
