"""VICReg (Bardes et al. 2021, arXiv 2105.04906) as a Siamese base.

One network with gradients through both views; the loss is a weighted sum of invariance
(MSE), variance (a hinge on each dimension's std) and covariance (off-diagonal squares)
terms (eq. 6). Variance and covariance are batch statistics: the masking axis weights the
loss with the batch's lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import SiameseMethod
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import vicreg_loss


@dataclass
class VICRegConfig:
    """VICReg (Bardes et al., arXiv 2105.04906); defaults: the paper's weights and
    solo-learn's CIFAR projector."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0


@register_method("vicreg")
class VICReg(SiameseMethod):
    config_class = VICRegConfig
    # The loss is symmetric in its two arguments, so one pair covers both directions.
    symmetric = False
    has_target_network = False
    batch_level_loss = True

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.weights = dict(sim_weight=params.sim_weight, var_weight=params.var_weight,
                            cov_weight=params.cov_weight)
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim,
                                 params.proj_output_dim, batch_norm=True, num_layers=3)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        total, _terms = vicreg_loss(online, target, **self.weights)
        return total
