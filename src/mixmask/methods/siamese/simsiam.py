"""SimSiam (Chen & He 2020, arXiv 2011.10566) as a Siamese base.

One network, no EMA: the target of a view is its own projection, detached (stop-gradient,
sec. 3, eq. 3); the online side adds a bottleneck predictor. Loss per pair: negative cosine
similarity D(p, stopgrad(z)) (eq. 1), symmetrised (eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import Embedding, SiameseMethod, SymmetricReduction
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import simsiam_loss


@dataclass
class SimSiamConfig:
    """SimSiam (Chen & He, arXiv 2011.10566); defaults: its CIFAR setting (2-layer
    projector, 2048-d, bottleneck predictor 512)."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    pred_hidden_dim: int = 512
    # The two directions averaged (SimSiam eq. 2: D(p1, z2) / 2 + D(p2, z1) / 2) or summed.
    symmetric_reduction: SymmetricReduction = "mean"


@register_method("simsiam")
class SimSiam(SiameseMethod):
    config_class = SimSiamConfig
    symmetric = True
    has_target_network = False

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.symmetric_reduction = params.symmetric_reduction
        # CIFAR projector: two layers, BN on the output too (app. D).
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim,
                                 params.proj_output_dim, batch_norm=True,
                                 output_batch_norm=True)
        self.predictor = MLPHead(params.proj_output_dim, params.pred_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)

    def target_from_online(self, embedding: Embedding) -> Tensor:
        return embedding.projection.detach()  # the stop-gradient that prevents collapse

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return simsiam_loss(online, target)
