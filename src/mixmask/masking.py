"""Masks and mixes for MixMask (Vishniakov et al., arXiv 2210.11456), as pure tensor functions.

Convention: a *keep mask* ``M`` holds 1 where the original image is kept and 0 where the
cell is filled from the partner image ("masked"). Masks live on a coarse ``g x g`` grid
and are upsampled to pixels by nearest neighbour (MixMask, arXiv 2210.11456, method;
design.md sec. 2, steps 2-3).

Every random function takes an explicit ``torch.Generator`` and builds its tensors on
``generator.device``; none of them reads a value back to the host, loops over batch
elements in Python or branches on tensor values, so they run inside a CUDA step without
synchronising it.

Usage (``weighted_mix_loss`` from :mod:`mixmask.losses`)::

    generator = torch.Generator(device=images.device).manual_seed(0)
    mix = sample_mixmask(images, grid_size=8, mask_ratio=0.5, mode="block",
                         per_sample=False, generator=generator)
    loss = weighted_mix_loss(clean_loss, mixed_loss, switched_loss, mix.lam)
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MixMaskBatch",
    "block_mask",
    "discrete_mask",
    "mix_images",
    "mix_ratio",
    "reversed_partner",
    "sample_mixmask",
    "switched_lambda",
    "upsample_mask",
]


def _validate_grid(num_masks: int, grid_size: int, mask_ratio: float) -> None:
    if num_masks < 1:
        raise ValueError(f"num_masks must be at least 1, got {num_masks}.")
    if grid_size < 2:
        raise ValueError(
            f"grid_size must be at least 2 (a 1x1 grid cannot mix two images), got {grid_size}."
        )
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio must lie strictly between 0 and 1 (0.5 in the paper), got {mask_ratio}."
        )


def _masked_cell_target(grid_size: int, mask_ratio: float) -> int:
    """T = round(ratio * g^2), clamped to [1, g^2 - 1] so a mask always mixes two images."""
    cells = grid_size * grid_size
    return min(max(round(mask_ratio * cells), 1), cells - 1)


def block_mask(
    num_masks: int,
    grid_size: int,
    mask_ratio: float = 0.5,
    *,
    generator: torch.Generator,
    min_block_cells: int = 4,
    min_aspect: float = 0.3,
    rounds: int = 64,
    fill_to_target: bool = True,
) -> Tensor:
    """Block-wise keep masks (BEiT, arXiv 2106.08254, Alg. 1; MixMask's "block" masks).

    Target masked count ``T = round(mask_ratio * g^2)`` (clamped to ``[1, g^2 - 1]``).
    For ``rounds`` rounds, for all masks at once, one rectangle is proposed per mask::

        remaining = T - masked_count
        area   ~ U[min_block_cells, max(remaining, min_block_cells)]
        aspect ~ exp(U[log a, log 1/a]),             a = min_aspect
        h = round(sqrt(area * aspect)),  w = round(sqrt(area / aspect)),  h < g,  w < g
        top ~ U{0..g-h},  left ~ U{0..g-w}
        new = rect & ~masked;  accept iff 0 < |new| <= remaining;  masked |= rect

    This is BEiT's ``MaskingGenerator`` with its "up to 10 attempts per block, stop at the
    first block that fails" loop replaced by a fixed budget of proposals per mask, so all
    masks are drawn in parallel without data-dependent control flow. A rejected proposal
    leaves the mask unchanged, so the accepted blocks follow BEiT's distribution; only the
    stopping rule differs. Like BEiT's loop it can stop short of ``T`` (the last few cells
    rarely admit a rectangle of >= 4 cells that does not overshoot; at g = 8, ratio 0.5
    about 1 mask in 4000 after 64 rounds); with ``fill_to_target`` the masks still below
    ``T`` are topped up with random unmasked cells so every mask has exactly ``T`` masked
    cells and lambda = 1 - T / g^2 is exact. For ``grid_size=2`` no rectangle of >= 4 cells has
    sides < 2, so the mask is entirely the top-up.

    The MixMask reference uses BEiT's mask (1 = inside a block) directly as its keep mask,
    so there the blocks are what the image keeps, and it takes ``T = int(ratio * g^2)``.
    We follow this library's convention (the blocks are masked, filled from the partner);
    at ratio 0.5 this only swaps which image of a pair takes the blocks, and mixes i and
    B-1-i between them hold both assignments anyway.

    Returns a float32 keep mask ``[num_masks, g, g]`` on ``generator.device``
    (1 = keep the image, 0 = masked, filled from the partner).
    """
    _validate_grid(num_masks, grid_size, mask_ratio)
    if min_block_cells < 1:
        raise ValueError(f"min_block_cells must be at least 1, got {min_block_cells}.")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must lie in (0, 1] (0.3 in BEiT), got {min_aspect}.")
    if rounds < 0:
        raise ValueError(f"rounds must be non-negative, got {rounds}.")

    device = generator.device
    target = _masked_cell_target(grid_size, mask_ratio)
    # All uniforms of all rounds in one draw: (area, aspect, top, left) per round and mask.
    u_area, u_aspect, u_top, u_left = torch.rand(
        4, rounds, num_masks, generator=generator, device=device
    )
    # sqrt(area * aspect) = sqrt(area) * sqrt(aspect): the aspect part for all rounds at once.
    sqrt_aspect = torch.exp(math.log(min_aspect) * (0.5 - u_aspect))
    cell_index = torch.arange(grid_size, device=device)
    # Float 0/1 masks and counts (exact): cheaper than bool ops, and no matmul, so autocast
    # cannot round the counts.
    masked = torch.zeros(num_masks, grid_size, grid_size, device=device)
    masked_count = torch.zeros(num_masks, device=device)

    for step in range(rounds):
        remaining = target - masked_count
        max_area = remaining.clamp(min=min_block_cells)
        sqrt_area = torch.sqrt(min_block_cells + u_area[step] * (max_area - min_block_cells))
        height = torch.round(sqrt_area * sqrt_aspect[step]).clamp_(min=1)
        width = torch.round(sqrt_area / sqrt_aspect[step]).clamp_(min=1)
        fits = (height < grid_size) & (width < grid_size)
        # Uniform over the g - h + 1 valid offsets; rectangles that do not fit get a
        # meaningless offset and are rejected through `fits`.
        top = torch.floor(u_top[step] * (grid_size + 1 - height))
        left = torch.floor(u_left[step] * (grid_size + 1 - width))
        in_rows = ((cell_index >= top[:, None]) & (cell_index < (top + height)[:, None])).float()
        in_cols = ((cell_index >= left[:, None]) & (cell_index < (left + width)[:, None])).float()
        already_masked = ((masked * in_cols[:, None, :]).sum(dim=2) * in_rows).sum(dim=1)
        new_count = height * width - already_masked
        accept = fits & (new_count > 0) & (new_count <= remaining)
        rectangle = (in_rows * accept[:, None])[:, :, None] * in_cols[:, None, :]
        masked = torch.maximum(masked, rectangle)
        masked_count = masked_count + new_count * accept

    masked = masked.bool()
    if fill_to_target:
        deficit = target - masked_count.long()
        masked = _top_up(masked.flatten(1), deficit, generator).view_as(masked)
    return (~masked).float()


def _top_up(masked: Tensor, deficit: Tensor, generator: torch.Generator) -> Tensor:
    """Mask ``deficit[i]`` random unmasked cells of each row of ``masked`` [n, cells]."""
    scores = torch.rand(masked.shape, generator=generator, device=generator.device)
    # Masked cells score above every unmasked one, so the unmasked cells take ranks
    # 0 .. (#unmasked - 1) in random order; deficit <= #unmasked because masked_count <= T.
    scores = scores.masked_fill(masked, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return masked | (rank < deficit[:, None])


def discrete_mask(
    num_masks: int, grid_size: int, mask_ratio: float = 0.5, *, generator: torch.Generator
) -> Tensor:
    """Discrete keep masks (MixMask's "discrete" masks): cells are masked without regard
    to their neighbours, exactly ``T = round(mask_ratio * g^2)`` per mask (clamped to
    ``[1, g^2 - 1]``), chosen by ranking random scores.

    The reference draws Bernoulli cells (keep iff u > ratio) and redraws all-0/all-1 masks
    in a host loop; a fixed count keeps lambda exact, never yields all-0 or all-1, and
    needs no loop. Returns a float32 keep mask ``[num_masks, g, g]`` on ``generator.device``.
    """
    _validate_grid(num_masks, grid_size, mask_ratio)
    device = generator.device
    target = _masked_cell_target(grid_size, mask_ratio)
    scores = torch.rand(num_masks, grid_size * grid_size, generator=generator, device=device)
    masked_cells = scores.argsort(dim=1)[:, :target]
    keep = torch.ones(num_masks, grid_size * grid_size, device=device)
    keep.scatter_(1, masked_cells, 0.0)
    return keep.view(num_masks, grid_size, grid_size)


def upsample_mask(keep_mask: Tensor, image_size: int | tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of a grid mask ``[n, g, g]`` to pixels ``[n, 1, S, S]``
    (as the reference's ``F.interpolate(mode="nearest")``): every cell becomes an
    ``S/g x S/g`` square.

    ``image_size`` is ``S`` or ``(H, W)``; each side must be a multiple of the grid side.
    """
    if keep_mask.dim() != 3:
        raise ValueError(f"keep_mask must have shape [n, g, g], got {tuple(keep_mask.shape)}.")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid_height, grid_width = keep_mask.shape[1:]
    if height % grid_height or width % grid_width:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the mask grid "
            f"{grid_height}x{grid_width}; choose a grid_size that divides the image size."
        )
    # Integer repeats, not F.interpolate: exact at every size (no float scale rounding).
    pixels = keep_mask.repeat_interleave(height // grid_height, dim=1)
    pixels = pixels.repeat_interleave(width // grid_width, dim=2)
    return pixels.unsqueeze(1)


def reversed_partner(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Partner index of the reversed batch, ``partner[i] = B - 1 - i`` (Un-Mix/MixMask:
    mixing with ``flip(x, 0)``). The reversal is an involution, which is what makes
    ``flip(q_mix, 0)`` the embedding of the complementary mix (see :func:`switched_lambda`)."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def mix_images(images: Tensor, keep_mask: Tensor, partner_index: Tensor) -> Tensor:
    """MixMask's mix (design.md sec. 2, step 3): ``x_mix = M * x + (1 - M) * x[partner]``.

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


def switched_lambda(lam: Tensor) -> Tensor:
    """Weight of the switched term, ``1 - flip(lam, 0)`` (MixMask's loss, the "1 - lambda"
    of ``L(q, k) + lam * L(q_mix, k) + (1 - lam) * L(q_sw, k)``, design.md sec. 2, step 6).

    With the reversed partner, mix j is ``M_j * x_j + (1 - M_j) * x_{B-1-j}``. The switched
    embedding ``flip(q_mix, 0)[i]`` is the embedding of mix ``j = B-1-i``, in which image i
    is the partner and holds the pixel share ``1 - lam[B-1-i]``. For one mask per batch
    this is the paper's ``1 - lambda``; for per-sample masks it differs per sample.
    """
    return 1.0 - lam.flip(0)


class MixMaskBatch(NamedTuple):
    """One MixMask draw for a batch (see :func:`sample_mixmask`)."""

    mixed_images: Tensor  # [B, C, H, W]
    keep_mask: Tensor  # grid keep mask [1, g, g] (per batch) or [B, g, g] (per sample)
    lam: Tensor  # [B]: share of image i in mix i (repeated when the mask is per batch)
    partner_index: Tensor  # [B]: reversed batch


def sample_mixmask(
    images: Tensor,
    *,
    grid_size: int,
    mask_ratio: float = 0.5,
    mode: Literal["block", "discrete"] = "block",
    per_sample: bool = False,
    generator: torch.Generator,
) -> MixMaskBatch:
    """Draw MixMask masks and mix each image with its partner in the reversed batch
    (design.md sec. 2, steps 2-3): ``x_mix = M * x + (1 - M) * flip(x, 0)``, ``lam = mean(M)``.

    The reference draws one mask per step for the whole batch (``per_sample=False``);
    ``per_sample=True`` draws one per image (ablation). ``lam`` is always [B]. The
    generator should live on the images' device; masks drawn elsewhere are moved there.
    With an odd batch the middle image is its own partner (as in the reference), so its
    "mix" is the image itself; use even batches.
    """
    if mode not in ("block", "discrete"):
        raise ValueError(f"Unknown mask mode {mode!r}; use 'block' or 'discrete'.")
    batch_size = images.shape[0]
    num_masks = batch_size if per_sample else 1
    make_mask = block_mask if mode == "block" else discrete_mask
    keep_mask = make_mask(num_masks, grid_size, mask_ratio, generator=generator)
    keep_mask = keep_mask.to(images.device)
    partner_index = reversed_partner(batch_size, images.device)
    mixed_images = mix_images(images, keep_mask, partner_index)
    lam = mix_ratio(keep_mask).expand(batch_size).contiguous()
    return MixMaskBatch(mixed_images, keep_mask, lam, partner_index)
