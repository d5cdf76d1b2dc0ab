"""SimSiam (Chen & He 2020, arXiv 2011.10566) as a Siamese base.

One network, no EMA: the target of a view is its own projection, detached (stop-gradient,
sec. 3, eq. 3); the online side adds a bottleneck predictor. Loss per pair: negative cosine
similarity D(p, stopgrad(z)) (eq. 1), symmetrised (eq. 2).
"""

from __future__ import annotations

from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.losses import simsiam_loss
from mixmask.methods.base import Embedding, SiameseMethod
from mixmask.models.heads import MLPHead


class SimSiam(SiameseMethod):
    symmetric = True
    has_target_network = False

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__(backbone, feature_dim, config)
        params = config.simsiam
        # CIFAR projector: two layers, BN on the output too (app. D).
        self.projector = MLPHead(feature_dim, params.proj_hidden_dim, params.proj_output_dim,
                                 batch_norm=True, output_batch_norm=True)
        self.predictor = MLPHead(params.proj_output_dim, params.pred_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)

    def target_from_online(self, embedding: Embedding) -> Tensor:
        return embedding.projection.detach()  # the stop-gradient that prevents collapse

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return simsiam_loss(online, target)
