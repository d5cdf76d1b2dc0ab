"""Token masking for masked image modeling, as pure tensor functions.

MAE (He et al., arXiv 2111.06377, sec. 3 "Masking"): each image keeps a uniformly random
subset of its patches; the encoder sees only those, and the decoder puts learnt mask
tokens back at the removed positions. Following the reference (``models_mae.py:
random_masking`` in facebookresearch/mae), the subset comes from sorting per-sample
uniform noise, which gives three index tensors that :func:`gather_tokens` and
:func:`unshuffle` use:

- ``keep_indices`` [B, K]: the patches with the K smallest noise values, in noise order
  (not in position order; the encoder does not care, and ``restore_indices`` undoes it);
- ``mask`` [B, N]: 1.0 where a patch is removed (the loss's weights), 0.0 where kept;
- ``restore_indices`` [B, N]: the inverse of the noise sort, so that
  ``unshuffle(cat([kept_tokens, mask_tokens], 1), restore_indices)`` is in patch order.

Every random function takes an explicit ``torch.Generator`` and builds its tensors on that
generator's device; nothing is read back to the host, so a CUDA step does not sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``int(N * (1 - mask_ratio))``.

    MAE truncates (``len_keep = int(L * (1 - mask_ratio))`` in ``models_mae.py``); we keep
    that. At the default ratio 0.75 it equals ``round(0.25 * N)`` for N = 64 (32 px / 4),
    196 (224 / 16) and 256 (64 / 4), where 0.25 * N is an integer; at other ratios it can
    be one below rounding (N = 64, ratio 0.6: 25 kept, not 26).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}.")
    kept = int(num_patches * (1 - mask_ratio))
    if kept < 1:
        # MAE would run its encoder on the cls token alone; that is never what was meant.
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {num_patches}.")
    return kept


def mae_random_masking(batch: int, num_patches: int, mask_ratio: float,
                       generator: torch.Generator,
                       device: torch.device | str | None = None, *,
                       mask_unit: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking (arXiv 2111.06377, sec. 3; ``random_masking``).

    Returns ``(keep_indices [B, K] long, mask [B, N] float (1 = masked), restore_indices
    [B, N] long)``, the same K for every image (so a batch stays one tensor). ``device``
    defaults to the generator's and must match it.

    ``mask_unit`` k > 1 is long-sequence MAE's mask unit decoupled from the patch (Hu et
    al., arXiv 2210.07224; ``--mask_downsampling`` in facebookresearch/long_seq_mae): the
    N patches form a square grid of side g, and whole k x k blocks of patches (g / k per
    side) are masked together, ``num_kept(U, mask_ratio)`` of the U = N / k^2 units kept,
    so ``K = num_kept(U, mask_ratio) * k^2``. The noise is drawn per unit, and the kept and
    restore orders list each unit's patches in raster order, units in noise order. With
    k = 1 (MAE) the draws and results are exactly MAE's.

    >>> keep, mask, restore = mae_random_masking(2, 64, 0.75, torch.Generator())
    >>> keep.shape, int(mask.sum())
    (torch.Size([2, 16]), 96)
    """
    device = generator.device if device is None else torch.device(device)
    unit_patches = _unit_patches(num_patches, mask_unit, device) if mask_unit != 1 else None
    units = num_patches if unit_patches is None else unit_patches.shape[0]
    kept = num_kept(units, mask_ratio) * mask_unit * mask_unit
    noise = torch.rand(batch, units, generator=generator, device=device)
    # Ascending: the smallest noise values are kept, as in the reference.
    shuffle_indices = torch.argsort(noise, dim=1)
    if unit_patches is not None:
        shuffle_indices = unit_patches[shuffle_indices].reshape(batch, num_patches)
    restore_indices = torch.argsort(shuffle_indices, dim=1)
    keep_indices = shuffle_indices[:, :kept]
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep_indices, 0.0)
    return keep_indices, mask, restore_indices


def _unit_patches(num_patches: int, mask_unit: int, device: torch.device) -> Tensor:
    """[U, k^2]: the patch indices (raster order on the g x g grid) of each k x k unit,
    units in raster order on the (g / k) x (g / k) grid; built on ``device`` (no copy from
    the host in a step)."""
    side = math.isqrt(num_patches)
    if mask_unit < 1 or side * side != num_patches or side % mask_unit:
        raise ValueError(f"mask_unit {mask_unit} must divide the side of a square patch grid; "
                         f"got {num_patches} patches.")
    grid = torch.arange(num_patches, device=device).reshape(side // mask_unit, mask_unit,
                                              side // mask_unit, mask_unit)
    return grid.permute(0, 2, 1, 3).reshape(-1, mask_unit * mask_unit)


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """``tokens[b, indices[b]]`` for every b: [B, N, *] and [B, K] -> [B, K, *]."""
    index = indices.reshape(*indices.shape, *([1] * (tokens.dim() - 2)))
    return torch.gather(tokens, 1, index.expand(*indices.shape, *tokens.shape[2:]))


def unshuffle(tokens: Tensor, restore_indices: Tensor) -> Tensor:
    """Put a sequence in noise order (the K kept tokens, then N - K mask tokens: MAE's
    decoder input before its position embedding) back in patch order: [B, N, *]."""
    if tokens.shape[:2] != restore_indices.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} must start with the shape of "
                         f"restore_indices {tuple(restore_indices.shape)}.")
    return gather_tokens(tokens, restore_indices)
