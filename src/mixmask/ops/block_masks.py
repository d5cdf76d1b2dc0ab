"""A2MIM's masked input (Li et al., arXiv 2205.13943, sec. 4.1; reference: Westlake-AI/openmixup
``openmixup/datasets/pipelines/transforms.py: BlockwiseMaskGenerator`` with
``mask_color="mean"``): SimMIM's random blocks, filled with the image's mean colour.

    >>> block = a2mim_block_size(32)                                  # 8 px at 32, 32 at 224
    >>> mask = a2mim_block_mask(len(images), 32, block, model_patch_size=4,
    ...                         generator=generator)                  # [B, 8, 8] bool
    >>> inputs = mean_fill(images, upsample_mask(mask, 32))           # target: images

Convention: ``mask`` is True where the image is hidden (SimMIM / MAE's 1 = masked), the
opposite of :mod:`mixmask.ops.mixing`'s keep masks; ``upsample_mask`` from that module works
on either (nearest neighbour).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["a2mim_block_mask", "a2mim_block_size", "mean_fill"]

# BlockwiseMaskGenerator(mask_patch_size=32) in every A2MIM ImageNet config (224 px).
_REFERENCE_BLOCK = 32


def a2mim_block_size(image_size: int) -> int:
    """The mask block side in pixels for ``image_size``: the reference's 32 px, but at most
    a quarter of the image, so the block grid keeps at least 4 x 4 cells: 32 at 224 (7 x 7,
    the reference), 8 at 32 and 16 at 64 (4 x 4; the small-scale version of the related-
    methods notes, sec. 3.8), 24 at 96. A ValueError if the block does not tile the image.
    """
    block = min(_REFERENCE_BLOCK, image_size // 4)
    if block < 1 or image_size % block:
        raise ValueError(f"No A2MIM block size tiles a {image_size} px image (tried {block} "
                         f"px); pass mask_patch_size explicitly.")
    return block


def a2mim_block_mask(
    batch: int,
    image_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    mask_ratio: float = 0.6,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random block masks, bool ``[batch, S/model_patch_size, S/model_patch_size]``, True =
    masked, as ``BlockwiseMaskGenerator`` draws them.

    The image is cut into a ``g x g`` grid of ``mask_patch_size`` px blocks (g = S /
    mask_patch_size); exactly ``ceil(mask_ratio * g^2)`` blocks are masked, a uniformly
    random subset per sample (the reference's ``np.random.permutation(g * g)[:count]``;
    here the ranks of ``torch.rand`` scores, drawn on ``generator.device``), and each block
    becomes ``mask_patch_size / model_patch_size`` cells a side: the resolution of the stage
    where the mask token is added (16 for ViT/16 and ResNet stage 3 at 224, 32 for ConvNeXt
    stage 3; A2MIM configs). The count is computed in double precision like the
    reference's ``int(np.ceil(token_count * mask_ratio))``: 30 of 49 blocks at 0.6, 10 of 16.

    device: where the mask goes (default ``generator.device``).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}.")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}.")
    # The reference asserts both divisions (BlockwiseMaskGenerator.__init__).
    if mask_patch_size < 1 or image_size % mask_patch_size:
        raise ValueError(f"mask_patch_size ({mask_patch_size}) must divide the image size "
                         f"({image_size}).")
    if model_patch_size < 1 or mask_patch_size % model_patch_size:
        raise ValueError(f"model_patch_size ({model_patch_size}) must divide mask_patch_size "
                         f"({mask_patch_size}).")
    grid = image_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    num_blocks = grid * grid
    num_masked = math.ceil(num_blocks * mask_ratio)
    scores = torch.rand(batch, num_blocks, generator=generator, device=generator.device)
    masked_blocks = scores.argsort(dim=1)[:, :num_masked]
    masked = torch.zeros(batch, num_blocks, dtype=torch.bool, device=generator.device)
    masked.scatter_(1, masked_blocks, True)
    masked = masked.view(batch, grid, grid)
    masked = masked.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return masked if device is None else masked.to(device, non_blocking=True)


def mean_fill(images: Tensor, mask_pixels: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` with the masked pixels set to each image's per-channel
    mean, A2MIM's input (``mask_color="mean"``): in the reference the mean is that of the
    whole normalised image, masked pixels included, taken before filling
    (``img.mean(dim=[1, 2])`` of the ``Normalize``-d tensor). Unmasked pixels are returned
    unchanged. mask_pixels: bool or 0/1 ``[B, 1, H, W]`` or ``[B, H, W]``, True = masked."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}.")
    if mask_pixels.dim() == 3:
        mask_pixels = mask_pixels.unsqueeze(1)
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(mask_pixels.shape) != expected:
        raise ValueError(f"mask_pixels must have shape {expected} (or without the channel "
                         f"axis), got {tuple(mask_pixels.shape)}.")
    mean = images.mean(dim=(2, 3), keepdim=True)
    return torch.where(mask_pixels.bool(), mean, images)
