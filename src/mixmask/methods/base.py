"""What every Siamese base shares: the views, the masking axis and the EMA target.

A base (MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg) says only how it embeds a view on
the online side, what its target for a view is, and its loss between the two. Masking
(design.md sec. 2) is applied here, once, to the online view of every (online, target)
pair, so every base combines with every strategy. With q = online(x), k = target(x'):

* ``none``:    L(q, k)
* ``erase``:   L(online(erase(x)), k)                              (MSCN: same loss, no lambda)
* ``mixmask``: L(q, k) + lam * L(q_mix, k) + (1 - lam') * L(q_sw, k)  (MixMask eq. 3)
* ``unmix``:   the same three terms with a Mixup/CutMix mix             (Un-Mix)
* ``both``:    L(q, k) + the Un-Mix pair of terms + the MixMask pair   (five terms)

A mix of image j is ``x_mix_j = M * x_j + (1 - M) * x_partner[j]`` with lam_j = the share
of image j's pixels. Image i is the partner in mix ``inverse[i]``, so its switched
embedding ``q_sw_i = q_mix[inverse[i]]`` comes for free and is credited with its pixel share
``lam'_i = 1 - lam[inverse[i]]``. The partner is the reversed batch (inverse = reversal,
the reference's ``flip``); in ``both`` the Un-Mix branch keeps the reversal and MixMask
uses a random derangement, so the two mixes pair different images.

Per-sample losses (InfoNCE, BYOL, SimSiam) weight each sample by its own lambda; batch-level
losses (Barlow Twins, VICReg) take the batch's scalar lambda, which is exact because one
mask (one lambda) serves the whole batch and q_sw is a row permutation of q_mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mixmask.config import MethodConfig
from mixmask.masking import (
    inverse_partner,
    permutation_partner,
    sample_erase,
    sample_mixmask,
    sample_unmix,
)


@dataclass
class StepOutput:
    loss: Tensor
    # Backbone features of the first online view, detached: the online probe's input
    # (with erase, of the erased view: the clean view has no online pass then).
    features: Tensor
    # Scalars to log (tensors: read on the host only at logging steps).
    logs: dict[str, Tensor]


class Embedding(NamedTuple):
    """One online forward pass of a batch."""

    features: Tensor  # backbone output
    projection: Tensor  # projector output
    output: Tensor  # what enters the loss on the online side (the prediction, if any)


class Mix(NamedTuple):
    """A mixed batch: what the masking strategies hand to the shared loss."""

    images: Tensor
    lam: Tensor  # [B]: share of image j's pixels in mix j
    partner_index: Tensor  # [B]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online (MoCo eq. 2, BYOL eq. 1), for
    parameters; buffers (BN statistics) are copied like the references do."""
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    target_buffers, online_buffers = list(target.buffers()), list(online.buffers())
    if len(target_buffers) != len(online_buffers):
        raise ValueError("the target and online networks differ in their buffers.")
    if target_buffers:
        # One multi-tensor copy, not one kernel per BN buffer (a ResNet-18 has ~60).
        torch._foreach_copy_(target_buffers, online_buffers)


def cosine_momentum(start: float, end: float, progress: float) -> float:
    """BYOL's schedule (sec. 3.2): tau = end - (end - start) * (cos(pi * progress) + 1) / 2,
    from ``start`` at progress 0 to ``end`` at progress 1."""
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


class SiameseMethod(nn.Module):
    """Base of the Siamese methods.

    A subclass sets the class attributes, builds ``self.projector`` (and ``self.predictor``
    where the method has one), implements :meth:`pair_loss`, and either
    :meth:`target_embedding` (a separate target network: MoCo, BYOL) or relies on
    :meth:`target_from_online` (the online network itself: SimSiam, Barlow Twins, VICReg).
    """

    # Each view is online once and target once (two pairs); else only (view1 -> view2).
    symmetric: bool = False
    # The target comes from a separate (EMA) network; else from the online pass of the
    # target view, which then costs no extra forward.
    has_target_network: bool = True
    # pair_loss returns one value for the batch (Barlow Twins, VICReg), not one per sample.
    batch_level_loss: bool = False

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.masking = config.masking
        self.online_forward = config.online_forward
        self.mask_config = config.mask
        self.erase_config = config.erase
        self.unmix_config = config.unmix
        # Pixel statistics of the dataset (for erase fill="zero"); set by the engine.
        self.pixel_mean: tuple[float, ...] | None = None
        self.pixel_std: tuple[float, ...] | None = None
        self._last_targets: list[Tensor] = []
        self.projector: nn.Module  # built by the subclass
        self.predictor: nn.Module | None = None  # BYOL, SimSiam: replaced by the subclass

    # -- the base's ingredients ----------------------------------------------------------
    def embed(self, images: Tensor) -> Embedding:
        """The online network on a batch: backbone -> projector [-> predictor]."""
        features = self.backbone(images)
        projection = self.projector(features)
        output = projection if self.predictor is None else self.predictor(projection)
        return Embedding(features, projection, output)

    def target_embedding(self, images: Tensor) -> Tensor:
        """Target of a view from the separate target network (called under no_grad)."""
        raise NotImplementedError

    def target_from_online(self, embedding: Embedding) -> Tensor:
        """Target of a view from its online pass: its projection, with gradient (Barlow
        Twins, VICReg); a method with a stop-gradient (SimSiam) detaches it."""
        return embedding.projection

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        """Loss between online outputs and targets of the same images: per sample [B], or
        a scalar for a batch-level loss."""
        raise NotImplementedError

    def after_step(self, targets: list[Tensor], progress: float) -> None:
        """Called after the optimizer step (EMA updates, queues). progress in [0, 1]."""

    # -- the shared step ---------------------------------------------------------------
    def training_step(self, view1: Tensor, view2: Tensor, generator: torch.Generator,
                      progress: float = 0.0) -> StepOutput:
        views = (view1, view2)
        online_views = (0, 1) if self.symmetric else (0,)
        # Masks are drawn first, in a fixed order (per online view: erase, then its mixes),
        # so both forward modes draw the same ones.
        online_inputs: dict[int, Tensor] = {}
        mixes: dict[int, list[tuple[str, Mix]]] = {}
        for online_index in online_views:
            images = views[online_index]
            if self.masking == "erase":
                images = self._erase(images, generator)
            online_inputs[online_index] = images
            mixes[online_index] = self._mixes(images, generator)

        # Every batch the online network sees this step, keyed (kind, view). A shared-weight
        # base's target is the online pass of the target view, which then costs no extra
        # forward where that view is also an online view.
        online_kind = "erased" if self.masking == "erase" else "view"
        batches: dict[tuple[str, int], Tensor] = {}
        if not self.has_target_network:
            for online_index in online_views:
                batches[("view", 1 - online_index)] = views[1 - online_index]
        for online_index in online_views:
            batches[(online_kind, online_index)] = online_inputs[online_index]
            for name, mix in mixes[online_index]:
                batches[(name, online_index)] = mix.images
        embeddings = self._embed_batches(batches)

        targets: dict[int, Tensor] = {}
        for online_index in online_views:
            target_index = 1 - online_index
            if self.has_target_network:
                with torch.no_grad():
                    targets[target_index] = self.target_embedding(views[target_index])
            else:
                targets[target_index] = self.target_from_online(embeddings[("view", target_index)])

        total = view1.new_zeros(())
        logs: dict[str, Tensor] = {}
        probe_features = None
        for online_index in online_views:
            online, target = embeddings[(online_kind, online_index)], targets[1 - online_index]
            if probe_features is None:
                probe_features = online.features.detach()
            pair_total = self.pair_loss(online.output, target)
            logs["loss_clean" if self.masking != "erase" else "loss_erased"] = (
                pair_total.detach().mean())
            for name, mix in mixes[online_index]:
                mixed_output = embeddings[(name, online_index)].output
                pair_total = pair_total + self._mix_terms(mixed_output, target, mix, name, logs)
            total = total + pair_total.mean()
        loss = total / len(online_views)
        logs["loss"] = loss.detach()
        self._last_targets = [targets[1 - index].detach() for index in online_views]
        return StepOutput(loss=loss, features=probe_features, logs=logs)

    def _embed_batches(self, batches: dict[tuple[str, int], Tensor]
                       ) -> dict[tuple[str, int], Embedding]:
        """The online network on each batch: one forward per batch (``separate``: BN
        normalises each batch by its own statistics, as the papers' code does), or one
        forward of their concatenation (``joint``: fewer, larger kernels; BN statistics then
        come from the clean and mixed images together)."""
        if self.online_forward == "separate" or len(batches) == 1:
            return {key: self.embed(images) for key, images in batches.items()}
        sizes = [images.shape[0] for images in batches.values()]
        joint = self.embed(torch.cat(list(batches.values())))
        parts = zip(*(tensor.split(sizes) for tensor in joint), strict=True)
        return {key: Embedding(*part) for key, part in zip(batches, parts, strict=True)}

    def forward(self, view1: Tensor, view2: Tensor, generator: torch.Generator,
                progress: float = 0.0) -> StepOutput:
        # The training step is the forward, so DDP's gradient hooks see the whole of it.
        return self.training_step(view1, view2, generator, progress)

    def finish_step(self, progress: float) -> None:
        """Engine hook after optimizer.step(): hands the step's targets to after_step."""
        self.after_step(self._last_targets, progress)
        self._last_targets = []

    # -- masking strategies ---------------------------------------------------------------
    def _mixes(self, images: Tensor, generator: torch.Generator) -> list[tuple[str, Mix]]:
        mixes = []
        if self.masking in ("unmix", "both"):
            unmix = sample_unmix(images, generator=generator, p_mixup=self.unmix_config.p_mixup,
                                 alpha=self.unmix_config.alpha)
            mixes.append(("unmix", Mix(unmix.mixed_images, unmix.lam, unmix.partner_index)))
        if self.masking in ("mixmask", "both"):
            partner = (permutation_partner(images.shape[0], generator=generator)
                       .to(images.device) if self.masking == "both" else None)
            mask = self.mask_config
            mixmask = sample_mixmask(images, grid_size=mask.grid_size, mask_ratio=mask.mask_ratio,
                                     mode=mask.mode, per_sample=mask.per_sample,
                                     generator=generator, partner_index=partner)
            mixes.append(("mixmask",
                          Mix(mixmask.mixed_images, mixmask.lam, mixmask.partner_index)))
        return mixes

    def _mix_terms(self, mixed_output: Tensor, target: Tensor, mix: Mix, name: str,
                   logs: dict[str, Tensor]) -> Tensor:
        """lam * L(q_mix, k) + (1 - lam[inverse]) * L(q_mix[inverse], k)."""
        inverse = inverse_partner(mix.partner_index)
        mixed_loss = self.pair_loss(mixed_output, target)
        switched_loss = self.pair_loss(mixed_output[inverse], target)
        lam, switched_lam = mix.lam, 1.0 - mix.lam[inverse]
        if self.batch_level_loss:  # one lambda per batch (validated in the config)
            lam, switched_lam = lam[0], switched_lam[0]
        logs[f"loss_{name}"] = mixed_loss.detach().mean()
        logs[f"lambda_{name}"] = mix.lam.detach().mean()
        return lam * mixed_loss + switched_lam * switched_loss

    def _erase(self, images: Tensor, generator: torch.Generator) -> Tensor:
        mask, erase = self.mask_config, self.erase_config
        return sample_erase(
            images, shape=erase.shape, grid_size=mask.grid_size, mask_ratio=mask.mask_ratio,
            mode=mask.mode, per_sample=mask.per_sample, channel_wise=erase.channel_wise,
            fill=erase.fill, noise_std=erase.noise_std, high_pass_sigma=erase.high_pass_sigma,
            pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, generator=generator,
        ).erased_images
