"""MoCo v3 (Chen, Xie & He 2021, arXiv 2104.02057) as a Siamese base.

The online encoder (backbone, projector) adds a predictor (sec. 3); the key encoder is its
momentum copy, with the momentum raised from ``momentum`` to 1 on a cosine (the reference's
``--moco-m-cos``). No queue: the keys of the batch are the negatives, and the loss of each
direction is scaled by 2T (:func:`~mixmask.ops.losses.siamese.moco_v3_loss`); the two
directions are summed, as the reference's ``forward`` returns them. For a ViT the patch
projection can stay at its random init (sec. 4.2: it removes the training instability).
The momentum update runs after each optimizer step; the reference runs it at the start
of the next step, before the keys: the key encoder passes through the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.errors import ConfigError
from mixmask.methods.common import check_unit_interval, cosine_momentum, head_in_float32
from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import SiameseMethod, SymmetricReduction
from mixmask.models.backbones import backbone_traits
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import moco_v3_loss


@dataclass
class MoCoV3Config:
    """MoCo v3 (arXiv 2104.02057); defaults: the reference's ResNet-50 recipe
    (facebookresearch/moco-v3 README and moco/builder.py: projector 2 layers 4096-256 with
    BN, the last BN without affine; predictor 2 layers 4096-256; T 1.0; momentum 0.99 to
    1 on a cosine). Its ViT recipe: ``proj_layers: 3``, ``temperature: 0.2``,
    ``freeze_patch_embed: true``."""

    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    proj_layers: int = 2  # 2 (ResNet) or 3 (ViT), as the reference builds them
    temperature: float = 1.0
    momentum: float = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "cosine"
    momentum_end: float = 1.0
    # The reference sums the two directions (contrastive_loss(q1, k2) + (q2, k1)).
    symmetric_reduction: SymmetricReduction = "sum"
    # ViT only: the patch projection stays at its random init (the reference's
    # stop-grad-conv1 / random patch projection, sec. 4.2).
    freeze_patch_embed: bool = False


@register_method("mocov3")
class MoCoV3(SiameseMethod):
    config_class = MoCoV3Config
    symmetric = True

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.temperature, self.symmetric_reduction = params.temperature, params.symmetric_reduction
        self.momentum = params.momentum
        self.momentum_end = (params.momentum_end if params.momentum_schedule == "cosine"
                             else params.momentum)
        if params.freeze_patch_embed:
            self.backbone.patch_embed.requires_grad_(False)
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim, params.proj_output_dim,
                                 batch_norm=True, num_layers=params.proj_layers,
                                 output_batch_norm=True)
        self.predictor = MLPHead(params.proj_output_dim, params.pred_hidden_dim,
                                 params.proj_output_dim, batch_norm=True)
        # The momentum copy is taken after the freeze: its patch projection is the same.
        self.build_target_network()

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        params = config.method.mocov3
        check_unit_interval(params, "method.mocov3", "momentum", "momentum_end")
        if params.temperature <= 0:
            raise ConfigError(f"'method.mocov3.temperature' must be positive, got "
                              f"{params.temperature}.")
        if params.proj_layers not in (2, 3):
            raise ConfigError(f"'method.mocov3.proj_layers' must be 2 (ResNet) or 3 (ViT), got "
                              f"{params.proj_layers}.")
        if params.freeze_patch_embed and not backbone_traits(config.model.backbone).tokens:
            raise ConfigError(f"'method.mocov3.freeze_patch_embed' keeps a ViT's patch "
                              f"projection random; {config.model.backbone} has none: set it "
                              "to false.")

    @torch.no_grad()
    def target_embedding(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return F.normalize(head_in_float32(self.target_projector, self.target_backbone(images)),
                           dim=1)

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return moco_v3_loss(online, target, self.temperature)

    @torch.no_grad()
    def after_step(self, targets: list[Tensor], progress: float) -> None:
        self.update_target_network(cosine_momentum(self.momentum, self.momentum_end, progress))
