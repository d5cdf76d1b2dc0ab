"""The masking axis of the Siamese methods: its config and its strategies.

``method.masking`` (none | erase | mixmask | unmix | both) combines with every Siamese base;
the strategy is built once from the config (:func:`build_masking`) and, each step, turns an
online view into what the online network sees: an erased view (MSCN) and/or mixes with
a partner image (MixMask, Un-Mix), each mix with its lambda. The masks and mixes
themselves are the pure functions of :mod:`mixmask.ops.mixing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mixmask.ops.erasing import sample_erase
from mixmask.ops.mixing import permutation_partner, sample_mixmask, sample_unmix

MaskingName = Literal["none", "erase", "mixmask", "unmix", "both"]


@dataclass
class MaskConfig:
    """Grid masks: a g x g grid, block (BEiT) or discrete cells. MixMask fills the masked
    cells from the partner image; ``erase`` uses the same grid."""

    # 8 cells a side at every image size: the paper's 8x8 grid at 224 px; at 32 px the
    # same 64 cells keep the block-mask statistics and match the 8x8 token grid of a
    # patch-4 ViT. A 4x4 grid leaves too few distinct block masks.
    grid_size: int = 8
    mask_ratio: float = 0.5
    mode: Literal["block", "discrete"] = "block"
    # Block masks: beit is the MixMask reference's generator (BEiT's MaskingGenerator,
    # arXiv 2106.08254, Alg. 1, drawn on the host: it may stop short of the target and
    # draws 1-3 cell blocks near the end, so lambda is not always exactly 0.5);
    # exact_count is ours, vectorised on the device, always exactly the target count.
    generator: Literal["beit", "exact_count"] = "beit"
    # The reference draws one mask per step for the whole batch; per-sample is an ablation.
    per_sample: bool = False


@dataclass
class EraseConfig:
    """MSCN-style erasing (Jing et al., arXiv 2206.07700) of the online view's masked cells
    (grid size, ratio, mode and per-sample from ``method.mask``)."""

    # grid: the method.mask grid; focal: keep one random rectangle, erase the rest.
    shape: Literal["grid", "focal"] = "grid"
    # noise: N(0, noise_std^2) in normalised space; zero: black pixels; mean: dataset mean.
    fill: Literal["noise", "zero", "mean"] = "noise"
    noise_std: float = 1.0
    # Every colour channel gets its own mask.
    channel_wise: bool = False
    # Gaussian high-pass filter on the online view before erasing (0 = off).
    high_pass_sigma: float = 0.0


@dataclass
class UnMixConfig:
    """Un-Mix (Shen et al., arXiv 2003.05438): Mixup or CutMix with the reversed batch."""

    p_mixup: float = 0.5  # probability of Mixup (else CutMix) at each step
    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha); Beta(1, 1) = U(0, 1) as in Un-Mix


@dataclass
class MaskingAxisConfig:
    """The keys ``method.masking``, ``method.online_forward``, ``method.mask.*``,
    ``method.erase.*``, ``method.unmix.*``: they exist for the Siamese methods only."""

    masking: MaskingName = "none"
    # How the online network sees a step's batches (the clean view and its mixes):
    # separate: one forward each, so BN normalises each by its own statistics (the papers'
    # code); joint: one forward of their concatenation (fewer, larger kernels), BN
    # statistics then pooled over the clean and mixed images. Same loss otherwise.
    online_forward: Literal["separate", "joint"] = "separate"
    mask: MaskConfig = field(default_factory=MaskConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    unmix: UnMixConfig = field(default_factory=UnMixConfig)


class Mix(NamedTuple):
    """A mixed batch: what the masking strategies hand to the shared loss."""

    images: Tensor
    lam: Tensor  # [B]: share of image j's pixels in mix j
    partner_index: Tensor  # [B]
    # MixMask's grid keep mask [1 or B, g, g] (the loss ignores it; the gallery shows it).
    keep_mask: Tensor | None = None


class MaskingStrategy:
    """One value of ``method.masking``: what happens to an online view before the online
    network sees it. ``erase`` replaces the view (and its clean term); ``mixes`` adds mixed
    batches, each credited with its lambda (MixMask eq. 3)."""

    erases = False  # the online view is replaced by its erased version (MSCN)
    needs_host_generator = False

    def erase(self, images: Tensor, generator: torch.Generator,
              host_generator: torch.Generator | None) -> Tensor:
        return images

    def mixes(self, images: Tensor, generator: torch.Generator,
              host_generator: torch.Generator | None) -> list[tuple[str, Mix]]:
        return []


def _uses_beit(mask: MaskConfig) -> bool:
    return mask.mode == "block" and mask.generator == "beit"


class EraseMasking(MaskingStrategy):
    """MSCN (arXiv 2206.07700): the online view's masked cells filled with noise (or zero
    or the mean); the base's loss unchanged, no lambda."""

    erases = True

    def __init__(self, mask: MaskConfig, erase: EraseConfig, pixel_mean, pixel_std):
        self.mask, self.config = mask, erase
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.needs_host_generator = erase.shape == "grid" and _uses_beit(mask)

    def erase(self, images, generator, host_generator):
        mask, erase = self.mask, self.config
        return sample_erase(
            images, shape=erase.shape, grid_size=mask.grid_size, mask_ratio=mask.mask_ratio,
            mode=mask.mode, per_sample=mask.per_sample, channel_wise=erase.channel_wise,
            fill=erase.fill, noise_std=erase.noise_std, high_pass_sigma=erase.high_pass_sigma,
            pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, generator=generator,
            block_generator=mask.generator, host_generator=host_generator,
        ).erased_images


class MixMaskMasking(MaskingStrategy):
    """MixMask (arXiv 2210.11456): masked cells filled from a partner image, the
    reversed batch (the reference's ``flip``) or, in ``both``, a random derangement so the
    Un-Mix and MixMask mixes pair different images."""

    def __init__(self, mask: MaskConfig, *, random_partner: bool = False):
        self.mask, self.random_partner = mask, random_partner
        self.needs_host_generator = _uses_beit(mask)

    def mixes(self, images, generator, host_generator):
        partner = (permutation_partner(images.shape[0], generator=generator).to(images.device)
                   if self.random_partner else None)
        mask = self.mask
        mixmask = sample_mixmask(images, grid_size=mask.grid_size, mask_ratio=mask.mask_ratio,
                                 mode=mask.mode, per_sample=mask.per_sample,
                                 generator=generator, partner_index=partner,
                                 block_generator=mask.generator, host_generator=host_generator)
        return [("mixmask", Mix(mixmask.mixed_images, mixmask.lam, mixmask.partner_index,
                                mixmask.keep_mask))]


class UnMixMasking(MaskingStrategy):
    """Un-Mix (arXiv 2003.05438): Mixup (p_mixup) or CutMix with the reversed batch."""

    def __init__(self, unmix: UnMixConfig):
        self.config = unmix

    def mixes(self, images, generator, host_generator):
        unmix = sample_unmix(images, generator=generator, p_mixup=self.config.p_mixup,
                             alpha=self.config.alpha)
        return [("unmix", Mix(unmix.mixed_images, unmix.lam, unmix.partner_index))]


class CombinedMasking(MaskingStrategy):
    """Several mixing strategies on the same view, drawn in order (``both``: Un-Mix, then
    MixMask with a random partner; five loss terms, as the reference's ``--method both``)."""

    def __init__(self, *parts: MaskingStrategy):
        self.parts = parts
        self.needs_host_generator = any(part.needs_host_generator for part in parts)

    def mixes(self, images, generator, host_generator):
        return [mix for part in self.parts
                for mix in part.mixes(images, generator, host_generator)]


def build_masking(axis: MaskingAxisConfig, pixel_mean=None, pixel_std=None) -> MaskingStrategy:
    """The strategy of ``method.masking``, built once."""
    if axis.masking == "none":
        return MaskingStrategy()
    if axis.masking == "erase":
        return EraseMasking(axis.mask, axis.erase, pixel_mean, pixel_std)
    if axis.masking == "mixmask":
        return MixMaskMasking(axis.mask)
    if axis.masking == "unmix":
        return UnMixMasking(axis.unmix)
    return CombinedMasking(UnMixMasking(axis.unmix), MixMaskMasking(axis.mask, random_partner=True))
