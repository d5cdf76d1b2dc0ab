"""Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230) as a Siamese base.

One network with gradients through both views; the loss drives the cross-correlation
matrix of the two views' batch-normalised projections to the identity (eq. 1). It is a
statistic of the whole batch: the masking axis weights it with the batch's lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import SiameseMethod
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import barlow_twins_loss


@dataclass
class BarlowTwinsConfig:
    """Barlow Twins (Zbontar et al., arXiv 2103.03230); defaults: solo-learn's CIFAR recipe."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    lambda_offdiag: float = 0.0051
    scale_loss: float = 0.1


@register_method("barlow_twins")
class BarlowTwins(SiameseMethod):
    config_class = BarlowTwinsConfig
    # The loss is symmetric in its two arguments, so one pair covers both directions.
    symmetric = False
    has_target_network = False
    batch_level_loss = True

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.lambda_offdiag, self.scale_loss = params.lambda_offdiag, params.scale_loss
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim,
                                 params.proj_output_dim, batch_norm=True, num_layers=3)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return barlow_twins_loss(online, target, lambda_offdiag=self.lambda_offdiag,
                                 scale=self.scale_loss)
