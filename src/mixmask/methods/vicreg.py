"""VICReg (Bardes et al. 2021, arXiv 2105.04906) as a Siamese base.

One network with gradients through both views; the loss is a weighted sum of invariance
(MSE), variance (a hinge on each dimension's std) and covariance (off-diagonal squares)
terms (eq. 6). Variance and covariance are batch statistics: the masking axis weights the
loss with the batch's lambda.
"""

from __future__ import annotations

from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.losses import vicreg_loss
from mixmask.methods.base import SiameseMethod
from mixmask.models.heads import MLPHead


class VICReg(SiameseMethod):
    # The loss is symmetric in its two arguments, so one pair covers both directions.
    symmetric = False
    has_target_network = False
    batch_level_loss = True

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__(backbone, feature_dim, config)
        params = config.vicreg
        self.weights = dict(sim_weight=params.sim_weight, var_weight=params.var_weight,
                            cov_weight=params.cov_weight)
        self.projector = MLPHead(feature_dim, params.proj_hidden_dim, params.proj_output_dim,
                                 batch_norm=True, num_layers=3)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        total, _terms = vicreg_loss(online, target, **self.weights)
        return total
