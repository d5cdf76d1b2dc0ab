"""What every Siamese base shares: the views, the masking axis and the EMA target.

A base (MoCo v2, ...) says only how it embeds the online and the target view, and its
per-sample loss between them. Masking (design.md sec. 2) is applied here, once, so every
base combines with every strategy:

* ``none``:    L(q, k)
* ``mixmask``: L(q, k) + lam * L(q_mix, k) + (1 - lam) * L(q_sw, k)   (MixMask eq. 3)
  with x_mix = M * x + (1 - M) * flip(x), lam = mean(M) and q_sw = flip(q_mix), the
  embedding of the complementary mix, obtained for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.losses import weighted_mix_loss
from mixmask.masking import sample_mixmask


@dataclass
class StepOutput:
    loss: Tensor
    # Backbone features of the clean online view, detached: the online probe's input.
    features: Tensor
    # Scalars to log (tensors: read on the host only at logging steps).
    logs: dict[str, Tensor]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online (MoCo eq. 2), for parameters;
    buffers (BN statistics) are copied like the references do."""
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers(), strict=True):
        target_buffer.copy_(online_buffer)


class SiameseMethod(nn.Module):
    """Base of the Siamese methods: subclasses implement the three abstract methods."""

    symmetric: bool = False

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.masking = config.masking
        self.mask_config = config.mask

    # -- the base's three ingredients -------------------------------------------------
    def online_embedding(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Return (backbone features, online embedding) of a batch."""
        raise NotImplementedError

    def target_embedding(self, images: Tensor) -> Tensor:
        """Embedding of the target view; no gradient reaches the target branch."""
        raise NotImplementedError

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss [B] between online and target embeddings of the same images."""
        raise NotImplementedError

    def after_step(self, targets: list[Tensor], progress: float) -> None:
        """Called after the optimizer step (EMA updates, queues). progress in [0, 1]."""

    # -- the shared step ---------------------------------------------------------------
    def training_step(self, view1: Tensor, view2: Tensor, generator: torch.Generator,
                      progress: float = 0.0) -> StepOutput:
        views = (view1, view2)
        pairs = ((0, 1), (1, 0)) if self.symmetric else ((0, 1),)
        with torch.no_grad():
            targets = [self.target_embedding(views[target]) for _, target in pairs]
        total = view1.new_zeros(())
        logs: dict[str, Tensor] = {}
        clean_features = None
        for (online_index, _), target in zip(pairs, targets, strict=True):
            online_view = views[online_index]
            features, online = self.online_embedding(online_view)
            if clean_features is None:
                clean_features = features.detach()
            clean_loss = self.pair_loss(online, target)
            if self.masking == "none":
                total = total + clean_loss.mean()
                continue
            mix = sample_mixmask(
                online_view,
                grid_size=self.mask_config.grid_size,
                mask_ratio=self.mask_config.mask_ratio,
                mode=self.mask_config.mode,
                per_sample=self.mask_config.per_sample,
                generator=generator,
            )
            # A separate forward pass: BN normalises the mixed batch on its own statistics,
            # as in the reference (design.md sec. 2, step 4).
            _, online_mixed = self.online_embedding(mix.mixed_images)
            mixed_loss = self.pair_loss(online_mixed, target)
            switched_loss = self.pair_loss(online_mixed.flip(0), target)
            total = total + weighted_mix_loss(clean_loss, mixed_loss, switched_loss, mix.lam)
            logs["lambda"] = mix.lam.mean().detach()
            logs["loss_clean"] = clean_loss.mean().detach()
            logs["loss_mixed"] = mixed_loss.mean().detach()
        loss = total / len(pairs)
        logs["loss"] = loss.detach()
        self._last_targets = targets
        return StepOutput(loss=loss, features=clean_features, logs=logs)

    def forward(self, view1: Tensor, view2: Tensor, generator: torch.Generator,
                progress: float = 0.0) -> StepOutput:
        # The training step is the forward, so DDP's gradient hooks see the whole of it.
        return self.training_step(view1, view2, generator, progress)

    def finish_step(self, progress: float) -> None:
        """Engine hook after optimizer.step(): hands the step's targets to after_step."""
        self.after_step(self._last_targets, progress)
        self._last_targets = []
