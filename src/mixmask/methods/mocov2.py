"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297) as a Siamese base.

Query encoder f_q = backbone + MLP projector; key encoder f_k its EMA (MoCo eq. 2),
InfoNCE of each query against its key and a queue of past keys (MoCo eq. 1).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.distributed import gather_all, shuffled_forward
from mixmask.losses import info_nce
from mixmask.methods.base import SiameseMethod, cosine_momentum, ema_update
from mixmask.models.heads import MLPHead


class MoCoV2(SiameseMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__(backbone, feature_dim, config)
        params = config.mocov2
        self.symmetric = params.symmetric
        self.temperature = params.temperature
        self.momentum = params.momentum
        self.momentum_end = (params.momentum_end if params.momentum_schedule == "cosine"
                             else params.momentum)
        self.shuffle_bn = params.shuffle_bn
        self.projector = MLPHead(feature_dim, params.proj_hidden_dim, params.proj_output_dim)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        queue = F.normalize(torch.randn(params.queue_size, params.proj_output_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

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
