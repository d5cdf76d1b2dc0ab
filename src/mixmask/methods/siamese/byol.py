"""BYOL (Grill et al. 2020, arXiv 2006.07733) as a Siamese base.

Online: backbone -> projector -> predictor; target: an EMA copy of backbone + projector
whose momentum rises from 0.99 to 1 on a cosine schedule (sec. 3.2). Loss per pair:
2 - 2 cos(prediction, target projection) (eq. 2), symmetrised over the two views (eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixmask.methods.common import check_unit_interval, cosine_momentum, head_in_float32
from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import (
    SiameseMethod,
    SymmetricReduction,
)
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import byol_loss


@dataclass
class BYOLConfig:
    """BYOL (Grill et al., arXiv 2006.07733); defaults: solo-learn's CIFAR recipe."""

    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    # Target EMA momentum: cosine from start to end over training (BYOL sec. 3.2).
    momentum_start: float = 0.99
    momentum_end: float = 1.0
    # The two directions summed (BYOL eq. 4: L + L~; solo-learn's BYOL) or averaged.
    symmetric_reduction: SymmetricReduction = "sum"


@register_method("byol")
class BYOL(SiameseMethod):
    config_class = BYOLConfig
    symmetric = True
    has_target_network = True

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.symmetric_reduction = params.symmetric_reduction
        self.momentum_start, self.momentum_end = params.momentum_start, params.momentum_end
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)
        self.predictor = MLPHead(params.proj_output_dim, params.pred_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)
        self.build_target_network()

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        check_unit_interval(config.method.byol, "method.byol", "momentum_start", "momentum_end")

    @torch.no_grad()
    def target_embedding(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return head_in_float32(self.target_projector, self.target_backbone(images))

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return byol_loss(online, target)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        momentum = cosine_momentum(self.momentum_start, self.momentum_end, progress)
        self.update_target_network(momentum)
