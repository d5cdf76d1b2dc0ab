"""Masks and mixes for MixMask (Vishniakov et al., arXiv 2210.11456), as pure tensor functions.

Convention: a *keep mask* ``M`` holds 1 where the original image is kept and 0 where the
cell is filled from the partner image ("masked"). Masks live on a coarse ``g x g`` grid
and are upsampled to pixels by nearest neighbour (MixMask, arXiv 2210.11456, method:
``x_mix = M * x + (1 - M) * x_partner``; the reference code ``kirill-vish/MixMask``).

Grid masks come in two kinds (``mode``). ``"discrete"`` masks cells independently
(:func:`discrete_mask`). ``"block"`` masks are BEiT's block-wise masks (Bao et al., arXiv
2106.08254, Alg. 1), which the MixMask reference uses, from one of two generators
(``block_generator``):

- ``"beit"`` (default), :func:`beit_block_mask`: BEiT's ``MaskingGenerator`` loop exactly,
  as in the reference, so lambda follows the reference's distribution (0.5 in about 95% of
  draws at g = 8, otherwise a little below). The loop is sequential and runs on the host
  with a CPU generator; the finished mask is copied to the images' device asynchronously.
- ``"exact_count"``, :func:`block_mask`: a vectorised variant on the generator's device
  with exactly ``round(ratio * g^2)`` masked cells, hence an exact lambda.

The module also holds the other masking axes: Un-Mix's Mixup/CutMix (Shen et al., arXiv
2003.05438; :func:`sample_unmix`), MSCN's erase masks with noise fill, focal masks,
channel-wise masks and a high-pass filter (Jing, Zhu, LeCun, arXiv 2206.07700;
:func:`sample_erase`), and the random derangement partner used when Un-Mix and MixMask
run together (:func:`permutation_partner`).

Every random function takes an explicit ``torch.Generator``. All but
:func:`beit_block_mask` build their tensors on ``generator.device`` and never read a value
back to the host, loop over batch elements in Python or branch on tensor values, so they
run inside a CUDA step without synchronising it. :func:`beit_block_mask` never touches the
device either: it draws from a CPU generator and loops on the host.

Usage (``weighted_mix_loss`` from :mod:`mixmask.losses`)::

    generator = torch.Generator(device=images.device).manual_seed(0)
    host_generator = torch.Generator().manual_seed(1)  # BEiT's host loop (CPU)
    mix = sample_mixmask(images, grid_size=8, mask_ratio=0.5, mode="block",
                         per_sample=False, generator=generator,
                         host_generator=host_generator)
    loss = weighted_mix_loss(clean_loss, mixed_loss, switched_loss, mix.lam)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EraseBatch",
    "MixMaskBatch",
    "UnMixBatch",
    "beit_block_mask",
    "block_mask",
    "discrete_mask",
    "focal_mask",
    "high_pass_filter",
    "inverse_partner",
    "mix_images",
    "mix_ratio",
    "permutation_partner",
    "reversed_partner",
    "sample_erase",
    "sample_mixmask",
    "sample_unmix",
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
    """Block-wise keep masks with an exact masked count: the ``"exact_count"`` block generator
    (BEiT's block-wise masking, arXiv 2106.08254, Alg. 1, vectorised; for BEiT's own loop,
    as the MixMask reference runs it, see :func:`beit_block_mask`).

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
    masks are drawn in parallel on the generator's device without data-dependent control
    flow. A rejected proposal leaves the mask unchanged. Two differences from BEiT:

    - the stopping rule. The loop can stop short of ``T`` (the last few cells rarely admit
      a rectangle that does not overshoot; at g = 8, ratio 0.5 about 1 mask in 4000 after
      64 rounds); with ``fill_to_target`` the masks still below ``T`` are topped up with
      random unmasked cells, so every mask has exactly ``T`` masked cells and
      ``lambda = 1 - T / g^2`` is exact (BEiT ends short of its target in about 4-5% of
      draws at g = 8, see :func:`beit_block_mask`).
    - the area floor. The proposed area is never under ``min_block_cells``, also when fewer
      cells remain (BEiT's ``random.uniform(4, remaining)`` then draws areas of 1-3 cells).
      Rounding to whole cells still yields 3-cell rectangles (1 x 3) in both, but at the
      default ``min_block_cells`` and ``min_aspect`` never 1- or 2-cell ones here (without
      the top-up every masked cell has a masked neighbour).

    For ``grid_size=2`` no rectangle of >= 4 cells has sides < 2, so the mask is entirely
    the top-up.

    The MixMask reference uses BEiT's mask (1 = inside a block) directly as its keep mask,
    so there the blocks are what the image keeps, and it takes ``int(ratio * g^2)`` block
    cells. Here the blocks are masked (filled from the partner); at ratio 0.5 this only
    swaps which image of a pair takes the blocks, and mixes i and B-1-i between them hold
    both assignments anyway. :func:`beit_block_mask` follows the reference (blocks kept).

    The random draws are the same as before ``block_generator`` existed, so runs that used
    this generator reproduce bit for bit with ``block_generator="exact_count"``.

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


def _beit_target(grid_size: int, mask_ratio: float) -> int:
    """BEiT's block-cell count ``int(keep * g^2)`` with ``keep = 1 - mask_ratio`` (rounded to
    9 decimals first, so 1 - 0.9 = 0.09999999999999998 does not lose a cell), at least 1."""
    cells = grid_size * grid_size
    return min(max(math.floor(round((1.0 - mask_ratio) * cells, 9)), 1), cells - 1)


def beit_block_mask(
    num_masks: int,
    grid_size: int,
    mask_ratio: float = 0.5,
    *,
    generator: torch.Generator,
    min_block_cells: int = 4,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
    fill_to_target: bool = False,
) -> Tensor:
    """BEiT's block-wise masks exactly as the MixMask reference draws them: the ``"beit"``
    block generator (BEiT, Bao et al., arXiv 2106.08254, Alg. 1, its ``MaskingGenerator``;
    MixMask's reference ``kirill-vish/MixMask`` copies it into ``utils.py``).

    Per mask, on a ``g x g`` grid, with ``T`` block cells as the target::

        count = 0
        while count < T:
            budget = T - count
            delta = 0
            for attempt in range(max_attempts):
                area   = uniform(min_block_cells, budget)   # in (budget, min] when budget < min
                aspect = exp(uniform(log a, log 1/a))      # a = min_aspect
                h, w = round(sqrt(area * aspect)), round(sqrt(area / aspect))
                if h < g and w < g:
                    top, left = randint(0, g - h), randint(0, g - w)   # inclusive
                    new = h * w - (block cells already in the rectangle)
                    if 0 < new <= budget: mark the rectangle; delta += new
                if delta > 0: break
            if delta == 0: break            # the whole mask stops short of T
            count += delta

    So a mask can end below ``T``: at g = 8, ratio 0.5, lambda = 0.5 in about 95% of
    draws, otherwise mostly 31/64, rarely down to about 0.44; at g = 4 in about 99%, and
    a few draws in 10^4 place no block at all (lambda = 0); at g = 2 only 1 x 1 blocks fit
    and most masks stay empty. When fewer than ``min_block_cells`` cells remain, Python's
    ``uniform(4, budget)`` still returns an area between ``budget`` and 4, so blocks of 1-3
    cells occur. :func:`block_mask` (the ``"exact_count"`` generator) is the vectorised
    alternative with an exact count.

    Convention. The reference uses BEiT's mask (1 = inside a block) directly as its keep
    mask (1 = keep the original image), with ``T = int(mask_lam * g^2)`` and
    ``mask_lam = 0.5``, so lambda = mean(M) <= 0.5. This library's ``mask_ratio`` is the
    fraction masked (filled from the partner), so here the blocks are the *kept* cells and
    ``T = int((1 - mask_ratio) * g^2)`` (at least 1): identical to the reference at 0.5,
    and lambda <= 1 - mask_ratio always.

    Randomness. ``generator`` must be a CPU ``torch.Generator``: the loop is sequential and
    runs on the host in plain Python (the grid as an integer bit set). All uniforms come
    from ONE ``torch.rand(num_masks, T * max_attempts, 4, dtype=float64)`` call, consumed in
    order, ``(area, aspect, top, left)`` per attempt (the top/left pair is skipped, not
    reused, when the rectangle does not fit), ``randint(0, n)`` as ``floor(u * (n + 1))``
    clamped to ``n``. ``T * max_attempts`` is the most attempts the loop can make, since
    every successful block adds a cell. The generator therefore advances by the same amount
    whatever the masks look like: its state is a pure function of the number of calls,
    which makes a resumed run draw the same masks.

    Cost. Host time per mask: a few hundred Python operations. One mask
    per batch, the reference's setting, is cheap; per-sample masks cost host time per
    image on every step, so for per-sample masks at large batches prefer :func:`block_mask`
    (``block_generator="exact_count"``), which runs on the device.

    Exact count. ``fill_to_target=True`` is the ``fixed_num_masking_patches=True`` mode of
    SiameseIM's copy of this generator (``util/masking_generator.py``): after the loop, a
    mask that stopped short of ``T`` gets ``T - count`` more cells, a uniformly random subset
    of the cells outside its blocks, so every mask has exactly ``T`` block cells (SiameseIM
    gathers the visible tokens with a ``view(B, -1, D)``, which needs one count for all).
    The loop's blocks are unchanged: the same seed gives the default mask plus the top-up.
    The top-up draws one more ``torch.rand(num_masks, g * g)`` after the loop's draw,
    always, so the generator still advances by a fixed amount per call; the default
    (``False``) draws nothing more and is bit for bit the mask above. SiameseIM's blocks
    are its *masked* patches, so for ``k`` masked patches pass ``mask_ratio = 1 - k / g^2``
    (``T = k``) and read the result's 1s as masked.

    Returns a float32 keep mask ``[num_masks, g, g]`` on the CPU (1 = inside a block = keep
    the image, 0 = filled from the partner).
    """
    _validate_grid(num_masks, grid_size, mask_ratio)
    if min_block_cells < 1:
        raise ValueError(f"min_block_cells must be at least 1, got {min_block_cells}.")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must lie in (0, 1] (0.3 in BEiT), got {min_aspect}.")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1 (10 in BEiT), got {max_attempts}.")
    device = getattr(generator, "device", None)
    if not isinstance(generator, torch.Generator) or device.type != "cpu":
        raise ValueError(
            f"beit_block_mask needs a CPU torch.Generator, got one on {device}: BEiT's loop "
            "is sequential and runs on the host, so pass a CPU generator (for "
            "sample_mixmask/sample_erase: host_generator=torch.Generator().manual_seed(...)), "
            "or use block_mask (block_generator='exact_count') on the device."
        )

    g = grid_size
    target = _beit_target(g, mask_ratio)
    per_mask = target * max_attempts * 4
    draws = torch.rand(
        num_masks, target * max_attempts, 4, dtype=torch.float64, device="cpu", generator=generator
    ).numpy()
    uniform = memoryview(draws.reshape(-1)).cast("B").cast("d")  # Python floats by index
    log_low = math.log(min_aspect)
    log_span = -2.0 * log_low  # log(1 / a) - log(a)
    # Bit (row * g + col) of an int is cell (row, col); row_repeat[h] copies a row's bits
    # into h consecutive rows.
    row_repeat = [((1 << (h * g)) - 1) // ((1 << g) - 1) for h in range(g)]
    sqrt, exp = math.sqrt, math.exp
    nbytes = (g * g + 7) // 8
    packed = bytearray()
    for index in range(num_masks):
        position = index * per_mask
        marked = 0
        count = 0
        while count < target:
            budget = target - count
            delta = 0
            for _ in range(max_attempts):
                u_area, u_aspect, u_top, u_left = uniform[position : position + 4]
                position += 4
                area = min_block_cells + (budget - min_block_cells) * u_area
                aspect = exp(log_low + log_span * u_aspect)
                height = round(sqrt(area * aspect))
                width = round(sqrt(area / aspect))
                if height < g and width < g:
                    top = min(int(u_top * (g - height + 1)), g - height)
                    left = min(int(u_left * (g - width + 1)), g - width)
                    rectangle = ((((1 << width) - 1) << left) * row_repeat[height]) << (top * g)
                    new = (rectangle & ~marked).bit_count()
                    if 0 < new <= budget:
                        marked |= rectangle
                        delta += new
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
        packed += marked.to_bytes(nbytes, "little")
    bits = np.unpackbits(
        np.frombuffer(bytes(packed), dtype=np.uint8).reshape(num_masks, nbytes),
        axis=1,
        count=g * g,
        bitorder="little",
    )
    keep = torch.from_numpy(bits.reshape(num_masks, g, g).astype(np.float32))
    if fill_to_target:
        block_cells = keep.view(num_masks, g * g).bool()
        deficit = target - block_cells.sum(dim=1)
        keep = _top_up(block_cells, deficit, generator).view(num_masks, g, g).float()
    return keep


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


def _validate_block_generator(block_generator: str) -> None:
    if block_generator not in ("beit", "exact_count"):
        raise ValueError(
            f"Unknown block_generator {block_generator!r}; use 'beit' (BEiT's loop, as the "
            "MixMask reference) or 'exact_count' (vectorised, exact masked count)."
        )


def _grid_keep_mask(
    mode: str,
    block_generator: str,
    num_masks: int,
    grid_size: int,
    mask_ratio: float,
    generator: torch.Generator,
    host_generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """The grid keep mask [num_masks, g, g] of ``mode`` / ``block_generator``, on ``device``."""
    if mode == "discrete":
        return discrete_mask(num_masks, grid_size, mask_ratio, generator=generator).to(device)
    if block_generator == "exact_count":
        return block_mask(num_masks, grid_size, mask_ratio, generator=generator).to(device)
    if host_generator is None:
        if generator.device.type != "cpu":
            raise ValueError(
                f"block_generator='beit' runs BEiT's sequential loop on the host and needs a "
                f"CPU generator, but generator is on {generator.device}: pass "
                f"host_generator=torch.Generator().manual_seed(seed), or use "
                f"block_generator='exact_count' (drawn on the generator's device)."
            )
        host_generator = generator
    keep_mask = beit_block_mask(num_masks, grid_size, mask_ratio, generator=host_generator)
    return host_to_device(keep_mask, device)


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor drawn for this step on ``device`` without stalling the stream: from
    pinned memory with ``non_blocking`` (a pageable copy to CUDA synchronises)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


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
    _validate_block_generator(block_generator)
    _validate_mix_batch(images)
    batch_size = images.shape[0]
    partner_index = _resolve_partner(images, partner_index)
    num_masks = batch_size if per_sample else 1
    keep_mask = _grid_keep_mask(
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


# -- Erase: Masked Siamese ConvNets (Jing, Zhu, LeCun, arXiv 2206.07700) ---------------------


def focal_mask(
    num_masks: int,
    image_size: int | tuple[int, int],
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.05, 0.3),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Focal keep masks (MSN, Assran et al., arXiv 2204.07141, "focal masking"; used by MSCN):
    keep one random rectangle of the image, erase everything outside it.

    Per mask: kept area fraction ``a ~ U(scale)``, aspect ``h / w`` log-uniform in ``ratio``
    (as torchvision's ``RandomResizedCrop``), ``h = round(sqrt(a * H * W * aspect))``
    clamped to ``[ceil(a * H * W / W), H]``, ``w = round(a * H * W / h)`` clamped to
    ``[1, W]``, top-left corner uniform over the valid positions. Clamping ``h`` first keeps
    ``w <= W`` without shrinking the area, so the kept fraction is within ``1 / (2 W)`` of
    ``a`` (rounding of ``w``); extreme aspects bend towards the image's shape instead.
    The default ``scale`` is MSN's focal-view crop scale (0.05, 0.3).

    Returns a float32 keep mask ``[num_masks, 1, H, W]`` on ``generator.device``
    (1 inside the kept rectangle).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if num_masks < 1:
        raise ValueError(f"num_masks must be at least 1, got {num_masks}.")
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {height}x{width}.")
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"scale must satisfy 0 < min <= max <= 1 (kept area fractions), got {scale}."
        )
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")

    device = generator.device
    u_area, u_aspect, u_top, u_left = torch.rand(4, num_masks, generator=generator, device=device)
    area = (low + u_area * (high - low)) * (height * width)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + u_aspect * (log_high - log_low))
    rect_height = torch.round(torch.sqrt(area * aspect))
    rect_height = torch.maximum(rect_height, torch.ceil(area / width)).clamp(1, height)
    rect_width = torch.round(area / rect_height).clamp(1, width)
    top = torch.floor(u_top * (height - rect_height + 1)).clamp(max=height - rect_height)
    left = torch.floor(u_left * (width - rect_width + 1)).clamp(max=width - rect_width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + rect_height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + rect_width)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).float().unsqueeze(1)


def high_pass_filter(images: Tensor, sigma: float) -> Tensor:
    """High-pass filter: the image minus its Gaussian blur, per channel (MSCN, arXiv
    2206.07700, applies a high-pass filter to the image before masking).

    MSCN gives no formula here that we could confirm, so we take the standard one:
    ``x - G_sigma * x`` with a normalised, sampled Gaussian of radius ``ceil(3 sigma)``,
    as torchvision's ``gaussian_blur`` (separable depthwise convolutions, reflect padding,
    radius capped at ``min(H, W) - 1`` for tiny images). Its frequency response is about
    ``1 - exp(-2 pi^2 sigma^2 f^2)`` (f in cycles per pixel): a constant image maps to 0,
    fine detail passes. Works on normalised images ``[B, C, H, W]``; computed in float32 and
    returned in the input dtype.
    """
    if not sigma > 0.0:
        raise ValueError(f"sigma must be positive (in pixels), got {sigma}.")
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}.")
    channels, height, width = images.shape[1:]
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    size = 2 * radius + 1
    with torch.autocast(images.device.type, enabled=False):
        pixels = images.float()
        padded = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")
        blurred = F.conv2d(
            padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels
        )
        blurred = F.conv2d(
            blurred, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels
        )
        return (pixels - blurred).to(images.dtype)


class EraseBatch(NamedTuple):
    """One MSCN erase draw for a batch (see :func:`sample_erase`)."""

    erased_images: Tensor  # [B, C, H, W]
    keep_mask: Tensor  # pixel keep mask [B or 1, C or 1, H, W] float (1 = kept)


def _channel_stats(values: Sequence[float] | Tensor, channels: int, name: str, images: Tensor):
    stats = torch.as_tensor(values, dtype=torch.float32, device=images.device).flatten()
    if stats.numel() != channels:
        raise ValueError(
            f"{name} must have one value per channel ({channels}), got {stats.numel()}."
        )
    return stats.view(1, channels, 1, 1)


def sample_erase(
    images: Tensor,
    *,
    generator: torch.Generator,
    shape: Literal["grid", "focal"] = "grid",
    grid_size: int = 8,
    mask_ratio: float = 0.5,
    mode: Literal["block", "discrete"] = "discrete",
    per_sample: bool = True,
    channel_wise: bool = False,
    fill: Literal["noise", "zero", "mean"] = "noise",
    noise_std: float = 1.0,
    high_pass_sigma: float = 0.0,
    pixel_mean: Sequence[float] | Tensor | None = None,
    pixel_std: Sequence[float] | Tensor | None = None,
    focal_scale: tuple[float, float] | None = None,
    block_generator: Literal["beit", "exact_count"] = "beit",
    host_generator: torch.Generator | None = None,
) -> EraseBatch:
    """MSCN's erase masking of the online view (Jing, Zhu, LeCun, "Masked Siamese ConvNets",
    arXiv 2206.07700; no official code; MixMask, arXiv 2210.11456, contrasts it as
    "erase-based" masking).

    MSCN's abstract: masked Siamese networks "practically only work well with Vision
    Transformers"; the paper studies why they fail with ConvNets and adds "several
    empirical designs" to fix it. Those designs, each an option here:

    - ``shape="grid"``: random cells of a ``grid_size x grid_size`` grid are erased,
      ``mode="discrete"`` (each cell independently, exactly ``round(mask_ratio * g^2)``
      cells) or ``"block"`` (BEiT blocks, from ``block_generator`` and ``host_generator``
      as in :func:`sample_mixmask`: ``"beit"`` erases all but about ``int((1 - ratio) *
      g^2)`` cells, BEiT's blocks being the kept cells; ``"exact_count"`` erases exactly
      ``round(ratio * g^2)``); see :func:`discrete_mask`, :func:`beit_block_mask`,
      :func:`block_mask`. BEiT masks are drawn on the host, one per image (and channel,
      with ``channel_wise``) when ``per_sample``.
      ``shape="focal"``: MSN's focal masking, one random rectangle kept, the rest erased
      (:func:`focal_mask`); its kept fraction is ``1 - mask_ratio`` (aspect random) unless
      ``focal_scale`` gives a range of kept fractions.
    - ``fill``, the value of erased pixels in normalised pixel space: ``"noise"`` =
      N(0, noise_std^2) per pixel and channel (``noise_std=0`` equals the mean fill);
      noise rather than a constant, so that the erased area is no flat patch with sharp
      edges that a ConvNet detects trivially. ``"zero"`` = a black pixel, ``(0 - mean) /
      std`` per channel (needs ``pixel_mean`` and ``pixel_std``, the normalisation's
      per-channel statistics). ``"mean"`` = the dataset mean, 0 after normalisation.
    - ``channel_wise``: each channel draws its own mask (MSCN's channel-wise masking), so
      most pixels keep some of their channels.
    - ``high_pass_sigma > 0``: the image is high-pass filtered before masking
      (:func:`high_pass_filter`: the image minus its Gaussian blur with that sigma, in
      pixels); MSCN applies a high-pass filter before the masks. 0 = off.

    ``mask_ratio`` is the erased fraction (as in :func:`sample_mixmask`). ``per_sample``:
    one mask per image (default) or one for the whole batch. The defaults (discrete 8 x 8
    grid, ratio 0.5, noise with std 1 = the pixel std after normalisation, no channel-wise
    masks, no filter) are this library's choice: MSCN's final values for grid size, ratio,
    noise scale and filter could not be confirmed from its text, so tune them. The
    generator should live on the images' device.

    Returns :class:`EraseBatch`: ``erased_images`` [B, C, H, W] (kept pixels are the
    (filtered) image exactly, erased pixels the fill) and the pixel ``keep_mask``
    ``[B or 1, C or 1, H, W]`` (1 = kept).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}.")
    if shape not in ("grid", "focal"):
        raise ValueError(f"Unknown erase shape {shape!r}; use 'grid' or 'focal'.")
    if mode not in ("block", "discrete"):
        raise ValueError(f"Unknown mask mode {mode!r}; use 'block' or 'discrete'.")
    _validate_block_generator(block_generator)
    if fill not in ("noise", "zero", "mean"):
        raise ValueError(f"Unknown fill {fill!r}; use 'noise', 'zero' or 'mean'.")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
    if noise_std < 0.0:
        raise ValueError(f"noise_std must be 0 or more (a standard deviation), got {noise_std}.")
    if high_pass_sigma < 0.0:
        raise ValueError(f"high_pass_sigma must be 0 (off) or positive, got {high_pass_sigma}.")
    batch_size, channels, height, width = images.shape
    if shape == "grid" and (
        grid_size > min(height, width) or height % grid_size or width % grid_size
    ):
        raise ValueError(
            f"grid_size {grid_size} must divide the image size {height}x{width} into whole "
            f"cells; choose a grid_size that divides it."
        )
    if fill == "zero" and (pixel_mean is None or pixel_std is None):
        raise ValueError(
            "fill='zero' needs pixel_mean and pixel_std (the normalisation's per-channel "
            "statistics): a black pixel is (0 - mean) / std in normalised space."
        )

    num_masks = (batch_size if per_sample else 1) * (channels if channel_wise else 1)
    if shape == "grid":
        grid = _grid_keep_mask(
            mode,
            block_generator,
            num_masks,
            grid_size,
            mask_ratio,
            generator,
            host_generator,
            images.device,
        )
        pixel_keep = upsample_mask(grid, (height, width))
    else:
        kept = 1.0 - mask_ratio
        scale = (kept, kept) if focal_scale is None else focal_scale
        pixel_keep = focal_mask(num_masks, (height, width), generator=generator, scale=scale)
    keep_mask = pixel_keep.to(images.device).view(
        batch_size if per_sample else 1, channels if channel_wise else 1, height, width
    )

    source = high_pass_filter(images, high_pass_sigma) if high_pass_sigma > 0 else images
    if fill == "noise":
        filler = torch.randn(images.shape, generator=generator, device=generator.device)
        filler = (filler.to(images.device) * noise_std).to(images.dtype)
    elif fill == "zero":
        mean = _channel_stats(pixel_mean, channels, "pixel_mean", images)
        std = _channel_stats(pixel_std, channels, "pixel_std", images)
        filler = (-mean / std).to(images.dtype)
    else:
        filler = images.new_zeros(())
    erased_images = torch.where(keep_mask.bool(), source, filler)
    return EraseBatch(erased_images, keep_mask)
