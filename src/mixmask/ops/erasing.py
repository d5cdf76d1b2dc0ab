"""MSCN's erase masks (Jing, Zhu, LeCun, arXiv 2206.07700) as pure tensor functions: grid,
focal (MSN's) and channel-wise masks filled with noise, and a high-pass filter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.ops.grid_masks import grid_keep_mask, upsample_mask, validate_block_generator
from mixmask.ops.tensors import channel_values

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
    validate_block_generator(block_generator)
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
        grid = grid_keep_mask(
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
        mean = channel_values(pixel_mean, channels, images.device, "pixel_mean")
        std = channel_values(pixel_std, channels, images.device, "pixel_std")
        filler = (-mean / std).to(images.dtype)
    else:
        filler = images.new_zeros(())
    erased_images = torch.where(keep_mask.bool(), source, filler)
    return EraseBatch(erased_images, keep_mask)
