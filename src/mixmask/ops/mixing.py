"""Mixing two images for MixMask and Un-Mix, and MixMask's loss weighting, as pure functions.

MixMask (Vishniakov et al., arXiv 2210.11456, method): ``x_mix = M * x + (1 - M) *
x_partner`` with a grid keep mask ``M`` (:mod:`mixmask.ops.grid_masks`), the partner the
reversed batch (the reference ``kirill-vish/MixMask``) or a random derangement when Un-Mix
and MixMask run together (:func:`permutation_partner`); the loss weights each term by the
pixel share lambda (:func:`weighted_mix_loss`, the one implementation training calls).
Un-Mix's Mixup/CutMix (Shen et al., arXiv 2003.05438) is :func:`sample_unmix`.

Usage::

    generator = torch.Generator(device=images.device).manual_seed(0)
    host_generator = torch.Generator().manual_seed(1)  # BEiT's host loop (CPU)
    mix = sample_mixmask(images, grid_size=8, mask_ratio=0.5, mode="block",
                         per_sample=False, generator=generator,
                         host_generator=host_generator)
    loss = weighted_mix_loss(clean_loss, mixed_loss, switched_loss, mix.lam)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mixmask.ops.grid_masks import grid_keep_mask, upsample_mask, validate_block_generator


def reversed_partner(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Partner index of the reversed batch, ``partner[i] = B - 1 - i`` (Un-Mix/MixMask:
    mixing with ``flip(x, 0)``). The reversal is an involution, which is what makes
    ``flip(q_mix, 0)`` the embedding of the complementary mix (see :func:`switched_lambda`)."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def permutation_partner(batch_size: int, *, generator: torch.Generator) -> Tensor:
    """A random partner index [B] that is a derangement: no image is its own partner.

    For the "both" strategy (the MixMask reference's ``--method both``): Un-Mix mixes with
    the reversed batch and MixMask with a random permutation (the reference's
    ``torch.randperm``), so the two mixed views of an image hold different partners.
    ``randperm`` leaves about one image in e per batch paired with itself, a "mix" that is
    the clean image credited as a mix; here the partner is a uniformly random single cycle
    through the batch, ``sigma = randperm(B)``, ``partner[sigma[k]] = sigma[(k + 1) % B]``,
    which has no fixed point. Returns a long tensor on ``generator.device``; use
    :func:`inverse_partner` for the switched embeddings.
    """
    if batch_size < 2:
        raise ValueError(
            f"A partner permutation needs a batch of at least 2 images, got {batch_size}."
        )
    device = generator.device
    order = torch.randperm(batch_size, generator=generator, device=device)
    partner = torch.empty_like(order)
    return partner.scatter_(0, order, order.roll(-1))


def inverse_partner(partner_index: Tensor) -> Tensor:
    """The inverse permutation of ``partner_index`` (its argsort): ``partner[inverse[i]] = i``.

    Mix j is ``f(M_j x_j + (1 - M_j) x_{partner[j]})``; image i is the partner in mix
    ``inverse[i]``, so its switched embedding is ``q_mix[inverse[i]]`` and its pixel share
    there ``1 - lam[inverse[i]]`` (the reference's ``q_mask[argsort(index_mask)]`` in its
    "both" model). For the reversed batch the inverse is the reversal itself.
    ``partner_index`` must be a permutation.
    """
    return torch.argsort(partner_index, stable=True)


def mix_images(images: Tensor, keep_mask: Tensor, partner_index: Tensor) -> Tensor:
    """The MixMask mix (arXiv 2210.11456, method): ``x_mix = M * x + (1 - M) * x[partner]``.

    ``images`` [B, C, H, W]; ``keep_mask`` a binary grid mask [1 or B, g, g] (one mask for
    the batch or one per sample), upsampled to H x W by nearest neighbour here;
    ``partner_index`` [B]. Computed as a select (nonzero = keep), which equals the formula
    for a binary mask and copies every pixel exactly, in the images' dtype.
    """
    pixel_mask = upsample_mask(keep_mask, (images.shape[-2], images.shape[-1]))
    return torch.where(pixel_mask.bool(), images, images[partner_index])


def mix_ratio(keep_mask: Tensor) -> Tensor:
    """lambda = mean(M), the share of the original image kept in each mix (the reference's
    ``mask.sum() / (g * g)``): shape [n] for a mask [n, g, g] (or its upsampled
    [n, 1, S, S], same value)."""
    return keep_mask.flatten(1).float().mean(dim=1)


def switched_lambda(lam: Tensor, *, partner_index: Tensor | None = None) -> Tensor:
    """Weight of the switched term, ``1 - lam[inverse[i]]`` (MixMask's loss, the "1 - lambda"
    of ``L(q, k) + lam * L(q_mix, k) + (1 - lam) * L(q_sw, k)``, MixMask, arXiv 2210.11456,
    its adaptive loss).

    Mix j is ``M_j * x_j + (1 - M_j) * x_{partner[j]}``. Image i is the partner in mix
    ``j = inverse[i]`` (:func:`inverse_partner`), whose embedding ``q_mix[inverse[i]]`` is the
    switched embedding of image i, and image i holds the pixel share ``1 - lam[inverse[i]]``
    there. ``partner_index=None`` means the reversed batch, an involution: ``inverse[i] =
    B-1-i``, so the switched embedding is ``flip(q_mix, 0)`` and the weight ``1 - flip(lam, 0)``.
    For one mask per batch this is the paper's ``1 - lambda``; for per-sample masks it differs
    per sample.
    """
    if partner_index is None:
        return 1.0 - lam.flip(0)
    return 1.0 - lam[inverse_partner(partner_index.to(lam.device))]


class MixMaskBatch(NamedTuple):
    """One MixMask draw for a batch (see :func:`sample_mixmask`)."""

    mixed_images: Tensor  # [B, C, H, W]
    keep_mask: Tensor  # grid keep mask [1, g, g] (per batch) or [B, g, g] (per sample)
    lam: Tensor  # [B]: share of image i in mix i (repeated when the mask is per batch)
    partner_index: Tensor  # [B]: the image mixed into mix i (default: the reversed batch)


def _validate_mix_batch(images: Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}.")
    if images.shape[0] < 2:
        raise ValueError(
            f"Mixing needs a batch of at least 2 images (each is mixed with another), "
            f"got {images.shape[0]}."
        )


def _resolve_partner(images: Tensor, partner_index: Tensor | None) -> Tensor:
    batch_size = images.shape[0]
    if partner_index is None:
        return reversed_partner(batch_size, images.device)
    if partner_index.shape != (batch_size,) or partner_index.dtype != torch.long:
        raise ValueError(
            f"partner_index must be a long tensor of shape [{batch_size}] (one partner per "
            f"image), got {partner_index.dtype} of shape {tuple(partner_index.shape)}."
        )
    return partner_index.to(images.device)


def sample_mixmask(
    images: Tensor,
    *,
    grid_size: int,
    mask_ratio: float = 0.5,
    mode: Literal["block", "discrete"] = "block",
    per_sample: bool = False,
    generator: torch.Generator,
    partner_index: Tensor | None = None,
    block_generator: Literal["beit", "exact_count"] = "beit",
    host_generator: torch.Generator | None = None,
) -> MixMaskBatch:
    """Draw MixMask masks and mix each image with its partner (MixMask, arXiv 2210.11456,
    method; the reference's ``main_moco_mixmask.py``): ``x_mix = M * x + (1 - M) * x[partner]``,
    ``lam = mean(M)``.

    ``mode="block"`` masks come from ``block_generator`` (ignored for ``"discrete"``):
    ``"beit"`` (default) is BEiT's loop as in the reference (:func:`beit_block_mask`;
    lambda = 0.5 in about 95% of draws at g = 8, ratio 0.5, otherwise slightly below). It
    runs on the host with ``host_generator``, or with ``generator`` when that is a CPU
    generator; with a device generator and no ``host_generator`` it raises ``ValueError``.
    The mask is copied to the images' device without synchronising (pinned memory,
    ``non_blocking``). Per-sample BEiT masks cost host time per image.
    ``"exact_count"`` is :func:`block_mask`, drawn from ``generator`` on its device, with
    exactly ``round(mask_ratio * g^2)`` masked cells (the generator of earlier versions,
    same draws).

    The partner defaults to the reversed batch ``flip(x, 0)`` (the reference's MixMask);
    the reference's "both" strategy (Un-Mix + MixMask) passes a random permutation instead,
    here :func:`permutation_partner`, so the two mixes pair different images. Switched
    embeddings and weights then go through :func:`inverse_partner` /
    ``switched_lambda(lam, partner_index=...)``.

    The reference draws one mask per step for the whole batch (``per_sample=False``);
    ``per_sample=True`` draws one per image (ablation). ``lam`` is always [B]. The
    generator should live on the images' device; masks drawn elsewhere are moved there.
    With an odd batch and the reversed partner the middle image is its own partner (as in
    the reference), so its "mix" is the image itself; use even batches.
    """
    if mode not in ("block", "discrete"):
        raise ValueError(f"Unknown mask mode {mode!r}; use 'block' or 'discrete'.")
    validate_block_generator(block_generator)
    _validate_mix_batch(images)
    batch_size = images.shape[0]
    partner_index = _resolve_partner(images, partner_index)
    num_masks = batch_size if per_sample else 1
    keep_mask = grid_keep_mask(
        mode,
        block_generator,
        num_masks,
        grid_size,
        mask_ratio,
        generator,
        host_generator,
        images.device,
    )
    mixed_images = mix_images(images, keep_mask, partner_index)
    lam = mix_ratio(keep_mask).expand(batch_size).contiguous()
    return MixMaskBatch(mixed_images, keep_mask, lam, partner_index)


# -- Un-Mix: Mixup / CutMix with a partner (Shen et al., arXiv 2003.05438) -------------------


class UnMixBatch(NamedTuple):
    """One Un-Mix draw for a batch (see :func:`sample_unmix`)."""

    mixed_images: Tensor  # [B, C, H, W]
    lam: Tensor  # [B]: share of image i's pixels in mix i (one value, repeated)
    partner_index: Tensor  # [B]: the image mixed into mix i (default: the reversed batch)
    used_cutmix: Tensor  # 0-dim bool: True if this draw was CutMix, False if Mixup


def _sample_beta(alpha: float, generator: torch.Generator) -> Tensor:
    """One draw of Beta(alpha, alpha) as a 0-dim float32 tensor on ``generator.device``.

    Beta(1, 1) is U(0, 1), Un-Mix's default, drawn with ``torch.rand``. Other ``alpha`` use
    ``torch._sample_dirichlet`` (the sampler behind ``torch.distributions.Beta``, which
    itself accepts no generator) on the 2-vector ``(alpha, alpha)``: its first coordinate is
    Beta(alpha, alpha), it takes the explicit generator, runs on CPU and CUDA without a host
    read, and stays finite for small alpha where a ratio of two gammas underflows to 0/0.
    """
    device = generator.device
    if alpha == 1.0:
        return torch.rand((), generator=generator, device=device)
    concentration = torch.full((2,), float(alpha), device=device)
    return torch._sample_dirichlet(concentration, generator=generator)[0]


def sample_unmix(
    images: Tensor,
    *,
    generator: torch.Generator,
    p_mixup: float = 0.5,
    alpha: float = 1.0,
    partner_index: Tensor | None = None,
) -> UnMixBatch:
    """Un-Mix's image mixture (Shen et al., arXiv 2003.05438).

    One draw per batch, as in the reference: ``lam ~ Beta(alpha, alpha)`` (Beta(1, 1) =
    U(0, 1) is the reference's default), then with probability ``p_mixup`` the global mix
    (Mixup) ``x_mix = lam * x + (1 - lam) * x[partner]``, else the local mix (CutMix): a box
    of about ``(1 - lam) * H * W`` pixels is pasted from the partner and ``lam`` is
    recomputed as ``1 - box_area / (H * W)`` after clipping, so it is again the share of
    image i's own pixels in mix i. The box follows the CutMix reference's ``rand_bbox``:
    ``cut_h = int(H * sqrt(1 - lam))``, ``cut_w = int(W * sqrt(1 - lam))``, centre uniform
    over the pixels, rows ``[cy - cut_h // 2, cy + cut_h // 2)`` and columns likewise,
    clipped to the image (the reference swaps H and W, harmless only for square images; we
    do not). The partner defaults to the reversed batch, the reference's ``flip(x, 0)``.

    Without host reads or data-dependent branches both candidates are computed and the
    random draw selects one with ``torch.where`` (two cheap elementwise passes); the box is
    built from ``arange`` comparisons. The reference's ``--method unmix`` crashes (it uses
    ``lam`` before drawing it); this works for any batch of at least 2 and any image size.

    ``lam`` is [B] (one value repeated, so it plugs into the same weighted loss as MixMask's
    ``lam``); ``used_cutmix`` is a 0-dim bool tensor, for logging. The generator should live
    on the images' device; draws made elsewhere are moved there.
    """
    if not 0.0 <= p_mixup <= 1.0:
        raise ValueError(f"p_mixup must lie in [0, 1] (0.5 in Un-Mix), got {p_mixup}.")
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive (1.0 in Un-Mix: lambda ~ U(0, 1)), got {alpha}.")
    _validate_mix_batch(images)
    batch_size, _, height, width = images.shape
    partner_index = _resolve_partner(images, partner_index)
    device = images.device

    draws = torch.rand(3, generator=generator, device=generator.device).to(device)
    choice, centre_row, centre_col = draws.unbind()
    lam_drawn = _sample_beta(alpha, generator).to(device)
    partner_images = images[partner_index]

    # Global mixture (Mixup).
    lam_pixels = lam_drawn.to(images.dtype)
    mixup_images = lam_pixels * images + (1 - lam_pixels) * partner_images

    # Local mixture (CutMix), the reference's rand_bbox with tensors.
    cut_ratio = torch.sqrt(1.0 - lam_drawn)
    half_height = torch.floor(torch.floor(height * cut_ratio) / 2)
    half_width = torch.floor(torch.floor(width * cut_ratio) / 2)
    row = torch.floor(centre_row * height).clamp(max=height - 1)  # randint(H); float rounding
    col = torch.floor(centre_col * width).clamp(max=width - 1)
    top, bottom = (row - half_height).clamp(0, height), (row + half_height).clamp(0, height)
    left, right = (col - half_width).clamp(0, width), (col + half_width).clamp(0, width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_box = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None]
    cutmix_images = torch.where(in_box, partner_images, images)
    lam_cutmix = 1.0 - (bottom - top) * (right - left) / (height * width)

    use_mixup = choice < p_mixup
    mixed_images = torch.where(use_mixup, mixup_images, cutmix_images)
    lam = torch.where(use_mixup, lam_drawn, lam_cutmix).expand(batch_size).contiguous()
    return UnMixBatch(mixed_images, lam, partner_index, ~use_mixup)


# -- MixMask's loss weighting ----------------------------------------------------------


def mix_loss_terms(mixed_loss: Tensor, switched_loss: Tensor, lam: Tensor,
                   switched_weight: Tensor) -> Tensor:
    """The mix terms of MixMask's loss (arXiv 2210.11456, its asymmetric loss),
    ``lam * L(q_mix, k) + w * L(q_sw, k)``: the mixed view credited to each image in
    proportion to the pixels it holds there. Training adds them to the clean loss
    (:class:`~mixmask.methods.siamese.base.SiameseMethod`, once per mix of the masking
    axis); :func:`weighted_mix_loss` is the whole loss for one mix."""
    return lam * mixed_loss + switched_weight * switched_loss


def weighted_mix_loss(
    clean_loss: Tensor,
    mixed_loss: Tensor,
    switched_loss: Tensor,
    lam: Tensor,
    switched_weight: Tensor | None = None,
) -> Tensor:
    """MixMask's loss (arXiv 2210.11456, its asymmetric loss), averaged over the batch::

        mean_i [ L(q_i, k_i) + lam_i * L(q_mix_i, k_i) + w_i * L(q_sw_i, k_i) ]

    with ``q_sw = flip(q_mix, 0)`` and, by default, ``w_i = 1 - lam_{B-1-i}``: each mixed
    view is credited to image i in proportion to the pixels image i holds in it
    (:func:`switched_lambda`). For one mask per batch, ``w = 1 - lam``, the
    reference's formula. With another partner (mix j = M_j x_j + (1 - M_j) x_{partner[j]}),
    ``q_sw = q_mix[inverse_partner]`` and the caller passes
    ``switched_weight = 1 - lam[inverse_partner]``.

    Per-sample losses are [B]; ``lam`` and ``switched_weight`` are [B] or 0-dim.
    Batch-level losses (Barlow Twins, VICReg) are 0-dim: with a 0-dim ``lam`` the result
    is ``clean + lam * mixed + (1 - lam) * switched``; with ``lam`` [B] (per-sample masks)
    it is the same with the batch means of ``lam`` and of the switched weights.
    Returns a scalar.
    """
    if switched_weight is None:
        switched_weight = 1.0 - lam if lam.dim() == 0 else switched_lambda(lam)
    return (clean_loss + mix_loss_terms(mixed_loss, switched_loss, lam, switched_weight)).mean()
