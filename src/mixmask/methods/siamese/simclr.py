"""SimCLR (Chen et al. 2020, arXiv 2002.05709) as a Siamese base.

One network embeds both views (no target network, no stop-gradient); every image of the
batch's other 2N - 2 views is a negative (NT-Xent, eq. 1; :func:`~mixmask.ops.losses.
siamese.nt_xent`). Symmetric: each view is the anchor once. With the masking axis the mixed
views are anchors too, against the clean other view, as MoCo's mixed queries are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mixmask.errors import ConfigError
from mixmask.methods.registry import register_method
from mixmask.methods.siamese.base import SiameseMethod, SymmetricReduction
from mixmask.models.heads import MLPHead
from mixmask.ops.losses.siamese import nt_xent


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al., arXiv 2002.05709); defaults: solo-learn's CIFAR recipe
    (scripts/pretrain/cifar/simclr.yaml: projector 2048-256, temperature 0.2)."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    # Linear layers of the projector, BN + ReLU between: 2 (SimCLR v1, its CIFAR and
    # ImageNet models) or 3 (SimCLR v2's ImageNet projector, arXiv 2006.10029 sec. 2).
    proj_layers: int = 2
    # A BN with a learnt scale and no shift on the projector's output, as the reference's
    # projection_head (its last linear_layer: use_bn=True, center=False); solo-learn's CIFAR
    # projector has none.
    output_batch_norm: bool = True
    temperature: float = 0.2
    # The reference sums the two directions' means (objective.py: loss_a + loss_b);
    # solo-learn averages them, and its CIFAR learning rates are tuned for the mean.
    symmetric_reduction: SymmetricReduction = "mean"


@register_method("simclr")
class SimCLR(SiameseMethod):
    config_class = SimCLRConfig
    symmetric = True
    has_target_network = False

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.temperature, self.symmetric_reduction = params.temperature, params.symmetric_reduction
        self.projector = MLPHead(self.feature_dim, params.proj_hidden_dim, params.proj_output_dim,
                                 batch_norm=True, num_layers=params.proj_layers,
                                 output_batch_norm=params.output_batch_norm, output_scale=True)

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        params = config.method.simclr
        if params.temperature <= 0:
            raise ConfigError(f"'method.simclr.temperature' must be positive, got "
                              f"{params.temperature}.")
        if params.proj_layers not in (2, 3):
            raise ConfigError(f"'method.simclr.proj_layers' must be 2 (SimCLR v1) or 3 "
                              f"(SimCLR v2), got {params.proj_layers}.")

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        return nt_xent(online, target, self.temperature)
