"""Grid keep masks for MixMask (Vishniakov et al., arXiv 2210.11456), as pure tensor functions.

Convention: a *keep mask* ``M`` holds 1 where the original image is kept and 0 where the
cell is filled from the partner image ("masked"). Masks live on a coarse ``g x g`` grid
and are upsampled to pixels by nearest neighbour (:func:`upsample_mask`).

Grid masks come in two kinds (``mode``). ``"discrete"`` masks cells independently
(:func:`discrete_mask`). ``"block"`` masks are BEiT's block-wise masks (Bao et al., arXiv
2106.08254, Alg. 1), which the MixMask reference uses, from one of two generators
(``block_generator``):

- ``"beit"`` (default), :func:`beit_block_mask`: BEiT's ``MaskingGenerator`` loop exactly,
  as in the reference, so lambda follows the reference's distribution (0.5 in about 95% of
  draws at g = 8, otherwise a little below). The loop is sequential and runs on the host
  with a CPU generator; the finished mask is copied to the images' device asynchronously
  (:func:`host_to_device`).
- ``"exact_count"``, :func:`block_mask`: a vectorised variant on the generator's device
  with exactly ``round(ratio * g^2)`` masked cells, hence an exact lambda.

Every random function takes an explicit ``torch.Generator``. All but
:func:`beit_block_mask` build their tensors on ``generator.device`` and never read a value
back to the host, loop over batch elements in Python or branch on tensor values, so they
run inside a CUDA step without synchronising it. :func:`beit_block_mask` never touches the
device either: it draws from a CPU generator and loops on the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


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


def validate_block_generator(block_generator: str) -> None:
    if block_generator not in ("beit", "exact_count"):
        raise ValueError(
            f"Unknown block_generator {block_generator!r}; use 'beit' (BEiT's loop, as the "
            "MixMask reference) or 'exact_count' (vectorised, exact masked count)."
        )


def grid_keep_mask(
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


