"""Where view 2's patches lie in view 1: SiameseIM's relative position encoding (Tao et al.,
"Siamese Image Modeling for Self-Supervised Vision Representation Learning", arXiv 2206.01204;
reference ``fundamentalvision/Siamese-Image-Modeling``,
``util/pos_embed.py: get_2d_sincos_pos_embed_relative``).

SiameseIM's predictor sees the visible patches of view 1 at their absolute positions and one
query per patch of view 2, placed where that patch lies in view 1's patch grid. This module
computes those positions from the two crops and embeds them::

    >>> centres = view2_patch_centres_in_view1(boxes1, flips1, boxes2, flips2, grid=8)
    >>> centres.shape                                   # [B, 64, 2], (x, y) = (column, row)
    >>> queries = relative_position_embedding(boxes1, flips1, boxes2, flips2, 8, dim=192)
    >>> queries.shape                                   # [B, 64, 384], then a Linear(384, 192)

Crops come as this library's data pipeline gives them (:mod:`mixmask.data.batch`): per view a
box ``[B, 4]`` (top, left, height, width) in pixels of the *unflipped* source image and a bool
``flipped`` ``[B]``, true where the crop was mirrored after cropping. The reference instead
flips the whole image before cropping and measures the left edge in the flipped image; the two
describe the same views (:func:`crop_geometry_reference` converts).

Channel order. This library's absolute embedding
(:func:`mixmask.models.vit.sincos_2d_position_embedding`) puts the column (x) in the first half
of the channels and the row (y) in the second, as upstream MAE does; the SiameseIM reference
puts the row first in both its absolute and its relative embedding. What matters is that the
two agree, since the predictor mixes absolutely placed view-1 tokens with relatively placed
view-2 queries: here both are column first, so identical crops reproduce the absolute
embedding exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ReferenceCropGeometry",
    "crop_geometry_reference",
    "relative_position_embedding",
    "view2_patch_centres_in_view1",
]

# The scale part embeds 10 * ln(h2 / h1): the factor 10 is the reference's
# (util/pos_embed.py: get_2d_sincos_pos_embed_relative), which spreads typical log-ratios
# (|ln s| < 2) over a range comparable to the patch coordinates (0 .. g - 1).
_LOG_SCALE_FACTOR = 10.0


def _check_crops(boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor) -> None:
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"{name} must have shape [B, 4] (top, left, height, width), "
                f"got {tuple(boxes.shape)}."
            )
    for name, flips in (("flips1", flips1), ("flips2", flips2)):
        if flips.dim() != 1:
            raise ValueError(f"{name} must have shape [B], got {tuple(flips.shape)}.")
    sizes = {boxes1.shape[0], boxes2.shape[0], flips1.shape[0], flips2.shape[0]}
    if len(sizes) != 1:
        raise ValueError(
            f"boxes1, flips1, boxes2 and flips2 must describe the same batch, got batch sizes "
            f"{boxes1.shape[0]}, {flips1.shape[0]}, {boxes2.shape[0]} and {flips2.shape[0]}."
        )


def _centres_float64(
    boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor, grid: int
) -> tuple[Tensor, Tensor]:
    """(x, y) [B, g * g] float64 of :func:`view2_patch_centres_in_view1`."""
    _check_crops(boxes1, flips1, boxes2, flips2)
    if grid < 1:
        raise ValueError(f"grid must be at least 1 (patches per side), got {grid}.")
    top1, left1, height1, width1 = boxes1.to(torch.float64).unbind(dim=1)
    top2, left2, height2, width2 = boxes2.to(torch.float64).unbind(dim=1)
    flipped1 = flips1.to(device=boxes1.device, dtype=torch.bool)[:, None]
    flipped2 = flips2.to(device=boxes1.device, dtype=torch.bool)[:, None]

    # Patch centres of view 2's output grid, row-major, in units of the crop's own size.
    half_cells = torch.arange(grid, dtype=torch.float64, device=boxes1.device) + 0.5
    row_fraction = (half_cells / grid).repeat_interleave(grid)[None, :]  # (r + 1/2) / g
    col_fraction = (half_cells / grid).repeat(grid)[None, :]  # (c + 1/2) / g

    # View 2 output -> source pixels. A mirrored crop shows at output column u the crop
    # column w - u.
    col_fraction2 = torch.where(flipped2, 1.0 - col_fraction, col_fraction)
    source_y = top2[:, None] + row_fraction * height2[:, None]
    source_x = left2[:, None] + col_fraction2 * width2[:, None]

    # Source pixels -> view 1 output, in patch units; "- 1/2" makes an integer a patch centre,
    # the integer index that the absolute embedding encodes (reference, same function).
    fraction_y1 = (source_y - top1[:, None]) / height1[:, None]
    fraction_x1 = (source_x - left1[:, None]) / width1[:, None]
    fraction_x1 = torch.where(flipped1, 1.0 - fraction_x1, fraction_x1)
    return fraction_x1 * grid - 0.5, fraction_y1 * grid - 0.5


def view2_patch_centres_in_view1(
    boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor, grid: int
) -> Tensor:
    """The centre of every patch of view 2 in view 1's patch coordinates, float32
    ``[B, grid * grid, 2]``, patches in row-major order (row r, column c at ``r * grid + c``),
    the last axis ``(x, y)`` = (column, row): the order of the embedding's halves.

    An integer value is a view-1 patch centre (patch ``(y, x)`` of view 1's grid), so
    identical crops give exactly ``(c, r)``; values outside ``[-1/2, g - 1/2]`` lie outside
    view 1. SiameseIM (arXiv 2206.01204; ``util/pos_embed.py:
    get_2d_sincos_pos_embed_relative``) writes the same map in its own crop geometry,
    ``y = di g + sh (r + 1/2) - 1/2`` and ``x = dj g + sw (c + 1/2) - 1/2`` (or
    ``dj_flip g - sw (c + 1/2) - 1/2`` when exactly one view is flipped); in ours::

        y_src = i2 + (r + 1/2) h2 / g
        x_src = j2 + (c + 1/2) w2 / g          view 2 flipped: j2 + w2 - (c + 1/2) w2 / g
        y = (y_src - i1) / h1 * g - 1/2
        x = (x_src - j1) / w1 * g - 1/2        view 1 flipped: (j1 + w1 - x_src) / w1 * g - 1/2

    Flipping both views mirrors nothing (x grows with c, the reference's "no relative flip")
    but still moves the positions, since a flipped view 1 shows the source's right side on
    its left: the reference's ``dj`` then compares left edges measured in the flipped image.

    boxes1, boxes2: ``[B, 4]`` (top, left, height, width) in pixels of the unflipped source
    image, heights and widths positive. flips1, flips2: ``[B]`` bool, true where the crop
    was mirrored horizontally after cropping. Computed in float64 on ``boxes1.device``.
    """
    centre_x, centre_y = _centres_float64(boxes1, flips1, boxes2, flips2, grid)
    return torch.stack([centre_x, centre_y], dim=-1).float()


def _sincos(positions: Tensor, channels: int) -> Tensor:
    """``[sin(p omega_k), cos(p omega_k)]`` [..., channels] with ``omega_k = 10000^(-k /
    (channels / 2))``: the frequencies of :func:`mixmask.models.vit.sincos_2d_position_embedding`
    (whose helper builds them on the CPU; here they follow ``positions`` to its device)."""
    exponents = torch.arange(channels // 2, dtype=torch.float64, device=positions.device)
    frequencies = 10000.0 ** (-exponents / (channels / 2))
    angles = positions[..., None].to(torch.float64) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_position_embedding(
    boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor, grid: int, dim: int
) -> Tensor:
    """SiameseIM's relative position embedding of view 2's patches, float32
    ``[B, grid * grid, 2 * dim]`` (arXiv 2206.01204; ``util/pos_embed.py:
    get_2d_sincos_pos_embed_relative``).

    Channels ``[0, dim)``, the position part: the 2-D sin-cos embedding of
    :func:`view2_patch_centres_in_view1`, with the frequencies and channel order of
    :func:`mixmask.models.vit.sincos_2d_position_embedding` (``[sin x, cos x, sin y, cos y]``,
    ``dim / 4`` frequencies each; x = column first, see the module docstring), evaluated at
    fractional coordinates; identical crops give exactly the absolute embedding.
    Channels ``[dim, 2 * dim)``, the scale part, the same for all patches of a sample:
    ``[sin, cos](10 ln(w2 / w1) omega)`` then ``[sin, cos](10 ln(h2 / h1) omega)``, the
    width ratio with the column half as the coordinates are ordered; equal sizes give
    ``sin 0 = 0`` and ``cos 0 = 1``.

    The reference passes this ``2 dim`` vector through a learnable ``Linear(2 dim, dim)``
    (``decoder_pos_mlp``); that layer belongs to the method. Arguments as in
    :func:`view2_patch_centres_in_view1`; ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim divisible by 4, got {dim}.")
    centre_x, centre_y = _centres_float64(boxes1, flips1, boxes2, flips2, grid)
    position_part = torch.cat([_sincos(centre_x, dim // 2), _sincos(centre_y, dim // 2)], dim=-1)

    sizes1 = boxes1.to(torch.float64)[:, 2:]
    sizes2 = boxes2.to(torch.float64)[:, 2:]
    log_height_ratio, log_width_ratio = (_LOG_SCALE_FACTOR * torch.log(sizes2 / sizes1)).unbind(1)
    scale_part = torch.cat(
        [_sincos(log_width_ratio, dim // 2), _sincos(log_height_ratio, dim // 2)], dim=-1
    )
    scale_part = scale_part[:, None, :].expand(-1, grid * grid, -1)
    return torch.cat([position_part, scale_part], dim=-1).float()


class ReferenceCropGeometry(NamedTuple):
    """The six per-sample scalars of SiameseIM's transform (``main_pretrain.py:
    DataAugmentationForSIM``), each ``[B]`` float64 (``relative_flip`` bool), relative to crop
    1, with left edges measured in the (possibly flipped) image each crop was cut from."""

    delta_i: Tensor  # (i2 - i1) / h1
    delta_j: Tensor  # (j2 - j1) / w1
    scale_h: Tensor  # h2 / h1
    scale_w: Tensor  # w2 / w1
    relative_flip: Tensor  # flip1 xor flip2
    delta_j_flip: Tensor  # (W - j1 - j2) / w1


def crop_geometry_reference(
    boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor, source_widths: Tensor
) -> ReferenceCropGeometry:
    """Our crops in the reference's geometry (:class:`ReferenceCropGeometry`), to compare
    with SiameseIM's code; the model needs only :func:`relative_position_embedding`.

    The reference flips the whole image, then crops at left ``j`` in the flipped image
    (``util/augmentation.py: RandomHorizontalFlip`` before ``SingleRandomResizedCrop``).
    Cropping the mirrored image at ``j`` shows the source columns ``[W - j - w, W - j)``
    mirrored, which is our crop at left ``W - j - w`` then mirrored, so a flipped view's
    reference left edge is ``j_ref = W - left - w``; tops, sizes and unflipped left edges are
    the same. source_widths: ``[B]``, the width ``W`` of each source image in pixels.
    """
    _check_crops(boxes1, flips1, boxes2, flips2)
    if source_widths.shape != flips1.shape:
        raise ValueError(
            f"source_widths must have shape [B] = {tuple(flips1.shape)}, "
            f"got {tuple(source_widths.shape)}."
        )
    width_source = source_widths.to(device=boxes1.device, dtype=torch.float64)
    top1, left1, height1, width1 = boxes1.to(torch.float64).unbind(dim=1)
    top2, left2, height2, width2 = boxes2.to(torch.float64).unbind(dim=1)
    flipped1 = flips1.to(device=boxes1.device, dtype=torch.bool)
    flipped2 = flips2.to(device=boxes1.device, dtype=torch.bool)
    left1_ref = torch.where(flipped1, width_source - left1 - width1, left1)
    left2_ref = torch.where(flipped2, width_source - left2 - width2, left2)
    return ReferenceCropGeometry(
        delta_i=(top2 - top1) / height1,
        delta_j=(left2_ref - left1_ref) / width1,
        scale_h=height2 / height1,
        scale_w=width2 / width1,
        relative_flip=flipped1 ^ flipped2,
        delta_j_flip=(width_source - left1_ref - left2_ref) / width1,
    )
