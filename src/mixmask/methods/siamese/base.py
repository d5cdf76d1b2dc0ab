"""What every Siamese base shares: the views, the masking axis and the EMA target.

A base (MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg) says only how it embeds a view on
the online side, what its target for a view is, and its loss between the two. Masking
(MixMask, arXiv 2210.11456; the strategies of :mod:`mixmask.methods.siamese.masking_axis`)
is applied here, once, to the online view of every (online, target) pair, so every base
combines with every strategy. With q = online(x), k = target(x'):

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

import dataclasses
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from mixmask.data.batch import Batch
from mixmask.errors import ConfigError
from mixmask.methods.common import HostGenerator, ema_copy, ema_update, head_in_float32
from mixmask.methods.protocol import Method, PixelStats, StepOutput
from mixmask.methods.siamese.masking_axis import (
    MaskingAxisConfig,
    Mix,
    build_masking,
)
from mixmask.ops.mixing import inverse_partner, mix_loss_terms

SymmetricReduction = Literal["sum", "mean"]


class Embedding(NamedTuple):
    """One online forward pass of a batch."""

    features: Tensor  # backbone output
    projection: Tensor  # projector output
    output: Tensor  # what enters the loss on the online side (the prediction, if any)


class SiameseMethod(Method):
    """Base of the Siamese methods.

    A subclass sets the class attributes, builds ``self.projector`` (and ``self.predictor``
    where the method has one), implements :meth:`pair_loss`, and either
    :meth:`target_embedding` (a separate target network: MoCo, BYOL) or relies on
    :meth:`target_from_online` (the online network itself: SimSiam, Barlow Twins, VICReg).
    A base with a symmetric loss sets ``self.symmetric`` and ``self.symmetric_reduction``
    from its config.
    """

    axis_config_class = MaskingAxisConfig
    num_views = 2
    # Each view is online once and target once (two pairs); else only (view1 -> view2).
    symmetric: bool = False
    # How the two directions of a symmetric loss combine: their sum (MoCo's and Un-Mix's
    # CIFAR code, BYOL eq. 4) or their mean (SimSiam eq. 2, solo-learn's MoCo v2+).
    symmetric_reduction: SymmetricReduction = "mean"
    # The target comes from a separate (EMA) network; else from the online pass of the
    # target view, which then costs no extra forward.
    has_target_network: bool = True
    # pair_loss returns one value for the batch (Barlow Twins, VICReg), not one per sample.
    batch_level_loss: bool = False

    def __init__(self, config, pixel_stats: PixelStats | None = None):
        super().__init__(config, pixel_stats)
        axis = config.method.axis
        self.online_forward = axis.online_forward
        mean, std = (pixel_stats.mean, pixel_stats.std) if pixel_stats else (None, None)
        self.masking = build_masking(axis, mean, std)
        # BEiT's block masks are drawn on the host from a generator in the state_dict.
        self.mask_generator = HostGenerator() if self.masking.needs_host_generator else None
        self.projector: nn.Module  # built by the subclass
        self.predictor: nn.Module | None = None  # BYOL, SimSiam: replaced by the subclass

    @classmethod
    def validate_config(cls, config) -> None:
        """Mask parameters that cannot work, said before any data is loaded; head sizes
        (every ``*_dim`` of the base's section) must be positive."""
        super().validate_config(config)
        section = getattr(config.method, config.method.name)
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if field.name.endswith("_dim") and value <= 0:
                raise ConfigError(f"'method.{config.method.name}.{field.name}' must be "
                                  f"positive, got {value}.")
        method, mask = config.method, config.method.mask
        if not 0.0 < mask.mask_ratio < 1.0:
            raise ConfigError(
                f"'method.mask.mask_ratio' must lie in (0, 1), got {mask.mask_ratio}.")
        uses_grid = method.masking in ("mixmask", "both") or (
            method.masking == "erase" and method.erase.shape == "grid")
        image_size = config.data.image_size
        if uses_grid and (mask.grid_size < 2 or mask.grid_size > image_size
                          or image_size % mask.grid_size):
            raise ConfigError(
                f"'method.mask.grid_size' ({mask.grid_size}) must be at least 2 and divide "
                f"data.image_size ({image_size}) into whole cells, e.g. 4 or 8."
            )
        processes = config.train.processes
        local_batch = config.train.batch_size // processes
        if method.masking in ("mixmask", "unmix", "both") and local_batch % 2:
            raise ConfigError(
                f"'{method.masking}' pairs each image with another of the batch (the reversed "
                f"batch): the per-device batch must be even, got {local_batch} "
                f"(train.batch_size={config.train.batch_size}, "
                f"train.devices={config.train.devices}, "
                f"train.num_nodes={config.train.num_nodes})."
            )
        if method.masking in ("mixmask", "both") and mask.per_sample and cls.batch_level_loss:
            raise ConfigError(
                f"{method.name}'s loss is one value for the whole batch, so MixMask needs one "
                "mask (one lambda) per batch: set method.mask.per_sample=false."
            )
        unmix, erase = method.unmix, method.erase
        if not 0.0 <= unmix.p_mixup <= 1.0:
            raise ConfigError(f"'method.unmix.p_mixup' must lie in [0, 1], got {unmix.p_mixup}.")
        if unmix.alpha <= 0:
            raise ConfigError(f"'method.unmix.alpha' must be positive, got {unmix.alpha}.")
        for key, value in (("noise_std", erase.noise_std),
                           ("high_pass_sigma", erase.high_pass_sigma)):
            if value < 0:
                raise ConfigError(f"'method.erase.{key}' must be 0 or more, got {value}.")

    # -- the base's ingredients ----------------------------------------------------------
    def embed(self, images: Tensor) -> Embedding:
        """The online network on a batch: backbone -> projector [-> predictor], the heads
        in float32 under mixed precision (:func:`~mixmask.methods.common.head_in_float32`)."""
        features = self.backbone(images)
        projection = head_in_float32(self.projector, features)
        output = projection if self.predictor is None else head_in_float32(self.predictor,
                                                                            projection)
        return Embedding(features, projection, output)

    def build_target_network(self) -> None:
        """The EMA target network of MoCo and BYOL: frozen copies of the backbone and the
        projector (``target_backbone``, ``target_projector``)."""
        self.target_backbone = ema_copy(self.backbone)
        self.target_projector = ema_copy(self.projector)

    def update_target_network(self, momentum: float) -> None:
        """One EMA step of the target network towards the online one (MoCo eq. 2, BYOL
        eq. 1)."""
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)

    def target_embedding(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Target of a view from the separate target network (called under no_grad);
        ``generator`` is the step's, for any draw the target makes (MoCo's shuffle-BN)."""
        raise NotImplementedError

    def target_embeddings(self, views: list[Tensor], indices: list[int],
                          generator: torch.Generator) -> dict[int, Tensor]:
        """The target network's embedding of each view in ``indices``, in that order (called
        under no_grad): one :meth:`target_embedding` per view; a base whose reference runs
        the target on all views in one batch (DINO's teacher) overrides this."""
        return {index: self.target_embedding(views[index], generator) for index in indices}

    def target_from_online(self, embedding: Embedding) -> Tensor:
        """Target of a view from its online pass: its projection, with gradient (Barlow
        Twins, VICReg); a method with a stop-gradient (SimSiam) detaches it."""
        return embedding.projection

    def pair_loss(self, online: Tensor, target: Tensor) -> Tensor:
        """Loss between online outputs and targets of the same images: per sample [B], or
        a scalar for a batch-level loss."""
        raise NotImplementedError

    def after_step(self, targets: list[Tensor], progress: float) -> None:
        """EMA updates, queues; called after the optimizer step with this step's targets.
        progress in [0, 1]."""

    def after_optimizer_step(self, output: StepOutput, progress: float) -> None:
        self.after_step(output.targets, progress)

    # -- the shared step ---------------------------------------------------------------
    def training_step(self, batch: Batch, generator: torch.Generator,
                      progress: float = 0.0) -> StepOutput:
        views = batch.views[:2]
        online_views = (0, 1) if self.symmetric else (0,)
        masking = self.masking
        host_generator = (self.mask_generator.get(generator)
                          if self.mask_generator is not None else None)
        # Masks are drawn first, in a fixed order (per online view: erase, then its mixes),
        # so both forward modes draw the same ones.
        online_inputs: dict[int, Tensor] = {}
        mixes: dict[int, list[tuple[str, Mix]]] = {}
        for online_index in online_views:
            images = masking.erase(views[online_index], generator, host_generator)
            online_inputs[online_index] = images
            mixes[online_index] = masking.mixes(images, generator, host_generator)

        # Every batch the online network sees this step, keyed (kind, view). A shared-weight
        # base's target is the online pass of the target view, which then costs no extra
        # forward where that view is also an online view.
        online_kind = "erased" if masking.erases else "view"
        batches: dict[tuple[str, int], Tensor] = {}
        if not self.has_target_network:
            for online_index in online_views:
                batches[("view", 1 - online_index)] = views[1 - online_index]
        for online_index in online_views:
            batches[(online_kind, online_index)] = online_inputs[online_index]
            for name, mix in mixes[online_index]:
                batches[(name, online_index)] = mix.images
        embeddings = self._embed_batches(batches)

        target_indices = [1 - online_index for online_index in online_views]
        if self.has_target_network:
            with torch.no_grad():
                targets = self.target_embeddings(views, target_indices, generator)
        else:
            targets = {index: self.target_from_online(embeddings[("view", index)])
                       for index in target_indices}

        total = views[0].new_zeros(())
        logs: dict[str, Tensor] = {}
        probe_features = projection = None
        for online_index in online_views:
            online, target = embeddings[(online_kind, online_index)], targets[1 - online_index]
            if probe_features is None:
                probe_features, projection = online.features.detach(), online.projection.detach()
            pair_total = self.pair_loss(online.output, target)
            logs["loss_erased" if masking.erases else "loss_clean"] = pair_total.detach().mean()
            for name, mix in mixes[online_index]:
                mixed_output = embeddings[(name, online_index)].output
                pair_total = pair_total + self._mix_terms(mixed_output, target, mix, name, logs)
            total = total + pair_total.mean()
        loss = total / len(online_views) if self.symmetric_reduction == "mean" else total
        logs["loss"] = loss.detach()
        return StepOutput(loss=loss, logs=logs, features=probe_features, embedding=projection,
                          targets=[targets[1 - index].detach() for index in online_views])

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
        return mix_loss_terms(mixed_loss, switched_loss, lam, switched_lam)
