"""BYOL (Grill et al. 2020, arXiv 2006.07733) as a Siamese base.

Online: backbone -> projector -> predictor; target: an EMA copy of backbone + projector
whose momentum rises from 0.99 to 1 on a cosine schedule (sec. 3.2). Loss per pair:
2 - 2 cos(prediction, target projection) (eq. 2), symmetrised over the two views (eq. 4).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.losses import byol_loss
from mixmask.methods.base import SiameseMethod, cosine_momentum, ema_update
from mixmask.models.heads import MLPHead


class BYOL(SiameseMethod):
    symmetric = True
    has_target_network = True

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__(backbone, feature_dim, config)
        params = config.byol
        self.momentum_start, self.momentum_end = params.momentum_start, params.momentum_end
        self.projector = MLPHead(feature_dim, params.proj_hidden_dim, params.proj_output_dim,
                                 batch_norm=True)
        self.predictor = MLPHead(params.proj_output_dim, params.pred_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.no_grad()
    def target_embedding(self, images: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(images))

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return byol_loss(online, target)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        momentum = cosine_momentum(self.momentum_start, self.momentum_end, progress)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
