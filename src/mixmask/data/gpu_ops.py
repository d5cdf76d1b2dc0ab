"""Batched augmentation ops on tensors, each a pure function of the images and per-sample
parameter tensors ``[B]`` / ``[B, k]`` (:mod:`mixmask.data.gpu_augment` draws the
parameters and runs them as views): resized crop, flip, colour jitter, grayscale, blur,
solarize, normalise. Images are float ``[B, C, H, W]`` in [0, 1] (the crop also uint8).

Differences from the PIL pipeline (all by design; the *distributions* of every random
parameter are torchvision's, see the samplers of :mod:`mixmask.data.gpu_augment`):

* PIL rounds to uint8 after the crop and after every colour op; here the image stays in
  float32 from the crop on.
* The crop's resampling is torchvision's tensor ``resized_crop`` (bilinear; with
  ``antialias=True``, the presets' setting, the tent filter widened by the downscale
  factor, which is PIL's antialiased bilinear): measured within 1 uint8 step of PIL's
  crop, upscaling or downscaling (mean 0.3 step, PIL's own rounding). When a crop is
  upscaled (every crop of a 32 px image resized to 32 px) antialias changes nothing.
  ``interpolation="bicubic"`` (MAE's and SiameseIM's views) is torchvision's / PIL's
  antialiased bicubic (Keys' cubic with a = -0.5, widened likewise; it needs
  ``antialias=True``), clamped to [0, 1] as PIL's uint8 output is: on real CIFAR-10
  images within 1 uint8 step of PIL's crop at the 99th percentile (mean 0.3), at most 5
  steps where PIL clips its first (horizontal) pass to uint8 before the second
  (``benchmarks/crop_fidelity.py``, 2-core CPU, stop 21).
* The colour ops are torchvision's tensor ops, which differ from its PIL ops: measured
  on ColorJitter(0.4, 0.4, 0.4, 0.1), mean 1.5 uint8 steps, 99th percentile 6, max 15
  (PIL shifts hue in uint8 HSV and rounds after every op).
* ``grayscale`` uses torchvision's tensor luma weights (0.2989, 0.587, 0.114); PIL's "L"
  conversion uses 299/587/114 per mille in fixed point.

Cost (all V views as one batch of V * B rows): the crop is two batched matmuls with
per-sample ``[S, H]`` and ``[S, W]`` interpolation matrices, O(V B C S H W)
multiply-adds, and holds one float copy of the source batch; colour jitter is six cheap
blend passes and one RGB->HSV->RGB pass over the V * B crops (about 50 elementwise passes
in all, in place on one copy); the blur is two batched matmuls with per-sample banded
``[S, S]`` matrices (O(V B C S^3) multiply-adds, still about 2x faster than a 23-tap
grouped convolution on the CPU at 224 px). From the crop on, :func:`apply_view` keeps
the views in a [V * B, S, C, S] layout (rows outermost), which both matmuls of the blur
read without a copy, and works in place; the final normalisation writes the requested
layout. Peak memory is a few float32 copies of the V * B output views. On CUDA, the
crop's and the blur's matmuls follow ``torch.backends.cuda.matmul.allow_tf32``: with
TF32 on they carry about 1e-3 relative error, below one uint8 step (and unblurred
samples are then no longer returned bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Column of each op in ``color_jitter``'s ``factors`` and its id in ``order`` (the
indices of torchvision's ``ColorJitter.get_params`` ``fn_idx``)."""



def _per_sample(values: Tensor, images: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] in the images' dtype, to broadcast over C, H, W."""
    return values.to(images.dtype).view(-1, 1, 1, 1)


def _per_sample_bool(apply: Tensor) -> Tensor:
    return apply.to(torch.bool).view(-1, 1, 1, 1)


# -- geometry -----------------------------------------------------------------------------


def _resize_weights(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    antialias: bool,
    flip: Tensor | None = None,
    interpolation: str = "bilinear",
) -> Tensor:
    """[B, out_size, in_size] weights resampling the span [start, start + length) of an
    axis of in_size pixels to out_size pixels; zero outside the span, so the crop never
    reads its neighbours (torchvision crops first, then resizes). Where ``flip`` [B] is
    true the output is mirrored (output i samples where output out_size - 1 - i would).

    antialias=False is ``F.interpolate(mode="bilinear", align_corners=False)``: sample at
    (i + 0.5) * scale - 0.5, clamped to the span, with the tent of width 1.
    antialias=True is PIL's / torchvision's antialiased bilinear: a tent widened to the
    scale factor when downscaling, cut at the span and renormalised. With
    ``interpolation="bicubic"`` the tent is Keys' cubic convolution kernel with a = -0.5
    (PIL's and torchvision's antialiased bicubic; support 2, widened the same way).
    """
    dtype = torch.float32
    start = start.to(dtype).view(-1, 1, 1)
    length = length.to(dtype).view(-1, 1, 1)
    scale = length / out_size
    index = torch.arange(out_size, device=start.device, dtype=dtype).view(1, -1, 1)
    if flip is not None:
        index = torch.where(flip.to(torch.bool).view(-1, 1, 1), out_size - 1 - index, index)
    center = (index + 0.5) * scale
    # Pixel index relative to the span's first pixel.
    position = torch.arange(in_size, device=start.device, dtype=dtype).view(1, 1, -1) - start
    # In place after the first op: a [B, out, in] buffer is allocated once.
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}.")
    if not antialias:
        if interpolation == "bicubic":
            raise ValueError("bicubic resampling on the device pipeline needs antialias=True "
                             "(PIL's filter, as the CPU pipeline resamples).")
        source = torch.minimum((center - 0.5).clamp(min=0.0), length - 1.0)
        return (position - source).abs_().neg_().add_(1.0).clamp_(min=0.0)
    support = scale.clamp(min=1.0)
    distance = (position + 0.5 - center).abs_().div_(support)
    if interpolation == "bicubic":
        weights = _keys_cubic(distance)
    else:
        weights = distance.neg_().add_(1.0).clamp_(min=0.0)
    weights = weights.mul_((position >= 0) & (position < length))
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _keys_cubic(distance: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel at ``distance`` >= 0 (Keys 1981; a = -0.5 is PIL's
    and torchvision's antialiased bicubic): (a + 2) d^3 - (a + 3) d^2 + 1 for d < 1,
    a (d^3 - 5 d^2 + 8 d - 4) for 1 <= d < 2, 0 beyond."""
    near = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    far = (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a
    return torch.where(distance < 1.0, near, far.mul_(distance < 2.0))


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int,
    *,
    antialias: bool = False,
    flip: Tensor | None = None,
    interpolation: str = "bilinear",
) -> Tensor:
    """Crop each image to its own box and resize it to ``size x size``, in one batched call.

    images: [B, C, H, W], uint8 (converted to [0, 1] once) or float.
    boxes: [V * B, 4] (top, left, height, width) in source pixels, integer valued, inside
        the image (as :func:`sample_crop_boxes` draws them; not checked, to stay sync-free).
        V > 1 crops every image V times without copying the source: row v * B + b of the
        output is images[b] cropped to boxes[v * B + b].
    antialias: False matches ``torchvision F.resized_crop(..., antialias=False)`` on float
        tensors (max abs difference about 1e-6); True matches ``antialias=True``
        (torchvision's approximation of PIL's resize), which only differs when a box is
        larger than ``size`` (downscaling).
    flip: optional [V * B] bool; mirrors those outputs horizontally at no cost by
        reversing their column weights (the same as :func:`horizontal_flip` afterwards).
    interpolation: "bilinear" or "bicubic" (antialiased only; from uint8 input the output
        is then clamped to [0, 1], as PIL's uint8 output is clipped).

    Returns float32 [V * B, C, size, size]. Implemented as ``rows @ image @ columns^T``
    with per-sample interpolation matrices (see the module docstring for its cost), which
    gives torchvision's edge handling exactly: samples are clamped to the box.
    """
    return resized_crop_rows_outermost(images, boxes, size, antialias=antialias, flip=flip,
                                       interpolation=interpolation).contiguous()


def resized_crop_rows_outermost(
    images: Tensor, boxes: Tensor, size: int, *, antialias: bool, flip: Tensor | None,
    interpolation: str = "bilinear",
) -> Tensor:
    """:func:`resized_crop` as a [V * B, C, S, S] view of a [V * B, S, C, S] buffer (rows
    outermost), the layout :func:`apply_view` works in (the blur's matmuls need it)."""
    batch, channels, height, width = images.shape
    if boxes.shape[0] % batch != 0:
        raise ValueError(
            f"boxes must have one row per image (or V rows per image), got {boxes.shape[0]} "
            f"boxes for {batch} images."
        )
    views = boxes.shape[0] // batch
    top, left, box_height, box_width = boxes.unbind(dim=1)
    row_weights = _resize_weights(top, box_height, height, size, antialias,
                                  interpolation=interpolation)
    column_weights = _resize_weights(left, box_width, width, size, antialias, flip,
                                     interpolation)
    if images.dtype == torch.uint8:
        # Fold the 1/255 of uint8 -> [0, 1] into the (small) weights.
        row_weights = row_weights.div_(255.0)
    # The source as float32 rows [B, H, C * W], in one copy, read once per view.
    source = torch.empty(
        batch, height, channels, width, device=images.device, dtype=torch.float32
    ).copy_(images.permute(0, 2, 1, 3))
    source = source.view(batch, height, channels * width)
    # Rows first, each view's [B, S, C * W] straight into its slice of one buffer, so the
    # columns' matmul finds every crop as a contiguous [S * C, W] matrix: no reordering
    # copy between the two matmuls. Under a caller's bf16 autocast the matmuls would lose
    # more than a uint8 step.
    resized_rows = torch.empty(
        views, batch, size, channels * width, device=images.device, dtype=torch.float32
    )
    with torch.autocast(device_type=images.device.type, enabled=False):
        for view in range(views):
            rows = row_weights[view * batch : (view + 1) * batch]
            torch.bmm(rows, source, out=resized_rows[view])
        out = torch.bmm(
            resized_rows.view(views * batch, size * channels, width), column_weights.mT
        )  # [V * B, S * C, S]
    if interpolation == "bicubic" and images.dtype == torch.uint8:
        # The cubic's negative lobes overshoot at edges; PIL clips to uint8's range.
        out.clamp_(0.0, 1.0)
    return out.view(views * batch, size, channels, size).permute(0, 2, 1, 3)


def horizontal_flip(images: Tensor, apply: Tensor) -> Tensor:
    """Mirror the samples where ``apply`` [B] is true (torchvision ``hflip``)."""
    return torch.where(_per_sample_bool(apply), images.flip(-1), images)


# -- colour -------------------------------------------------------------------------------


def _luma(images: Tensor) -> Tensor:
    """[B, 1, H, W] ITU-R 601-2 luma with torchvision's tensor weights and op order."""
    red, green, blue = images.unbind(dim=-3)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    # torchvision's _blend: factor * image + (1 - factor) * other, clamped to [0, 1].
    factor = _per_sample(factors, images)
    return (images * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """``clamp(factor * image)`` per sample (torchvision ``adjust_brightness``)."""
    return (images * _per_sample(factors, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with the mean of its own grayscale (torchvision ``adjust_contrast``)."""
    mean = _luma(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with its grayscale, per pixel (torchvision ``adjust_saturation``)."""
    return _blend(images, _luma(images), factors)


def adjust_hue(images: Tensor, factors: Tensor) -> Tensor:
    """Shift the hue by ``factor`` (in [-0.5, 0.5] turns) per sample: torchvision's
    ``adjust_hue`` on tensors (RGB -> HSV, shift, HSV -> RGB), to float rounding (about
    1e-6). images: float RGB [B, 3, H, W] in [0, 1].

    Written without HSV's saturation and sector lookup: a hue shift keeps each pixel's
    max V and min V(1 - S), so with hue h in [0, 6) each channel is V - (V - min) * w(h),
    and w is the piecewise-linear weight that torchvision's (v, p, q, t) table spells out
    sector by sector: red clamp(min(h - 1, 5 - h)), green clamp(max(1 - h, h - 3)), blue
    clamp(max(3 - h, h - 5)), each clamped to [0, 1].
    """
    return _hue_into(images, factors, torch.empty_like(images))


def _hue_into(images: Tensor, factors: Tensor, out: Tensor) -> Tensor:
    """:func:`adjust_hue` written into ``out`` (which may be ``images``): besides ``out``,
    only [B, H, W] planes are allocated."""
    red, green, blue = images.unbind(dim=-3)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    # Hue in sextants as torchvision/Pillow compute it, from the max channel's two
    # neighbours (red wins ties, then green); grey pixels (chroma 0) get hue 0 and any
    # nonzero divisor.
    hue = torch.where(
        value == green,
        (blue - red).add_(chroma, alpha=2.0),
        (red - green).add_(chroma, alpha=4.0),
    )
    hue = torch.where(value == red, green - blue, hue).div_(chroma + (chroma == 0))
    hue = hue.add_(factors.to(images.dtype).view(-1, 1, 1) * 6.0).remainder_(6.0)
    out_red, out_green, out_blue = out.unbind(dim=-3)
    torch.minimum(hue - 1.0, 5.0 - hue, out=out_red)
    torch.maximum(1.0 - hue, hue - 3.0, out=out_green)
    torch.maximum(3.0 - hue, hue - 5.0, out=out_blue)
    out = out.clamp_(0.0, 1.0)
    # value - chroma * weight, per channel.
    return torch.addcmul(value.unsqueeze(-3), chroma.unsqueeze(-3), out, value=-1.0, out=out)


def color_jitter(
    images: Tensor, factors: Tensor, order: Tensor, apply: Tensor, *, hue: bool = True
) -> Tensor:
    """torchvision ``ColorJitter`` with per-sample factors and a per-sample op order.

    factors: [B, 4] brightness, contrast, saturation, hue (columns ``BRIGHTNESS`` ...).
    order: [B, 4], a permutation of 0..3 per sample; ``order[b, k]`` is the op applied
        k-th to sample b (torchvision's ``fn_idx``).
    apply: [B] bool; samples where it is false pass through unchanged (``RandomApply``).
    hue: False skips the hue op for every sample (torchvision's ``ColorJitter(hue=0)``).

    Brightness, contrast and saturation are all ``clamp(f * x + (1 - f) * target)`` with
    target 0, the grayscale mean or the grayscale, and are the identity, bit for bit, at
    f = 1. So instead of evaluating all four ops in each of four slots, the samples' blend
    ops before their hue go into three blend passes, then one hue pass, then their blend
    ops after the hue into three more blend passes (f = 1 in the unused ones): one HSV
    round trip instead of four, with exactly the per-sample order.
    """
    apply = apply.to(torch.bool)
    order = order.to(torch.int64)
    hue_slot = (order == HUE).to(torch.int32).argmax(dim=1)
    slots = torch.arange(order.shape[1], device=order.device)
    before_hue = (slots.view(1, -1) < hue_slot.view(-1, 1)) & apply.view(-1, 1)
    after_hue = (slots.view(1, -1) > hue_slot.view(-1, 1)) & apply.view(-1, 1)
    # One copy of the input, then every pass in place: on the CPU, fresh image-sized
    # buffers cost page faults that measured as much as the arithmetic.
    out = images.clone()
    for slot in (0, 1, 2):
        out = _blend_slot_(out, factors, order[:, slot], before_hue[:, slot])
    if hue:
        shifted = _hue_into(out, factors[:, HUE], torch.empty_like(out))
        out = torch.where(_per_sample_bool(apply), shifted, out, out=out)
    for slot in (1, 2, 3):
        out = _blend_slot_(out, factors, order[:, slot], after_hue[:, slot])
    return out


def _blend_slot_(images: Tensor, factors: Tensor, op: Tensor, active: Tensor) -> Tensor:
    """One of brightness / contrast / saturation per sample (``op``), or the identity
    where ``active`` is false or ``op`` is hue; in place."""
    is_blend = active & (op != HUE)
    factor = torch.where(is_blend, factors.gather(1, op.view(-1, 1)).squeeze(1), 1.0)
    factor = _per_sample(factor, images)
    gray = _luma(images)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    # Brightness blends with 0: adding 0 * gray keeps it exactly torchvision's f * x.
    gray_weight = torch.where(_per_sample_bool(op == SATURATION), 1.0 - factor, 0.0)
    mean_weight = torch.where(_per_sample_bool(op == CONTRAST), 1.0 - factor, 0.0)
    target = gray.mul_(gray_weight).add_(mean * mean_weight)
    return torch.addcmul(target, images, factor, out=images).clamp_(0.0, 1.0)


def grayscale(images: Tensor, apply: Tensor) -> Tensor:
    """Replace the samples where ``apply`` [B] is true by their luma on all three channels
    (torchvision ``rgb_to_grayscale(num_output_channels=3)``, ITU-R 601-2)."""
    return grayscale_(images.clone(), apply)


def grayscale_(images: Tensor, apply: Tensor) -> Tensor:
    """:func:`grayscale` in place."""
    gray = _luma(images).expand_as(images)
    return torch.where(_per_sample_bool(apply), gray, images, out=images)


def _blur_matrices(kernels: Tensor, size: int) -> Tensor:
    """[B, size, size] matrices M with ``M @ v`` = v (length ``size``) convolved with each
    sample's kernel [B, K] under reflect padding (F.pad's "reflect": -1 -> 1), which is
    folded into the band: tap t of output i reads reflect(i + t - K // 2).

    At most two taps land on one entry (K <= size), so scatter_add_'s order, which CUDA
    does not fix, cannot change the sums."""
    batch, kernel_size = kernels.shape
    pad = kernel_size // 2
    positions = torch.arange(size, device=kernels.device).view(-1, 1)
    source = (positions + torch.arange(kernel_size, device=kernels.device) - pad).abs()
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    matrices = torch.zeros(batch, size, size, device=kernels.device, dtype=kernels.dtype)
    return matrices.scatter_add_(
        2,
        source.expand(batch, size, kernel_size),
        kernels.view(batch, 1, kernel_size).expand(batch, size, kernel_size),
    )


def gaussian_blur(
    images: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None
) -> Tensor:
    """Gaussian blur with a per-sample ``sigma`` [B] (torchvision ``gaussian_blur`` with
    ``[kernel_size] * 2`` and ``[sigma] * 2``: same kernel, reflect padding); samples
    where ``apply`` [B] is false are returned unchanged.

    The 2-D kernel is separable: blur = ``M_h @ image @ M_w^T`` with each sample's banded
    ``[H, H]`` and ``[W, W]`` matrices (reflect padding folded in, see
    :func:`_blur_matrices`), as two batched matmuls over the images laid out as
    [B, H, C, W] (rows outermost: the layout :func:`apply_view` keeps from the crop on, so
    there neither matmul needs a copy; other layouts are copied once). Where ``apply`` is
    false the matrices are the identity (exact on the CPU, and on CUDA without TF32). On a
    2-core CPU at 224 px with 23 taps this measured about 2x faster than the grouped
    convolution it replaces, despite ~10x the multiply-adds.

    Returns a [B, C, H, W] view of a [B, H, C, W] buffer.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}.")
    batch, channels, height, width = images.shape
    if kernel_size // 2 >= min(height, width):
        raise ValueError(
            f"kernel_size {kernel_size} is too large for {height}x{width} images (reflect "
            "padding needs kernel_size // 2 < each side)."
        )
    half = (kernel_size - 1) * 0.5
    offsets = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    pdf = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.to(images.dtype).view(-1, 1)).pow(2))
    kernels = pdf / pdf.sum(dim=1, keepdim=True)
    if apply is not None:
        delta = (torch.arange(kernel_size, device=images.device) == kernel_size // 2)
        kernels = torch.where(apply.to(torch.bool).view(-1, 1), kernels, delta.to(kernels.dtype))
    row_matrices = _blur_matrices(kernels, height)
    column_matrices = row_matrices if width == height else _blur_matrices(kernels, width)
    rows_outermost = images.permute(0, 2, 1, 3).contiguous()  # a view in apply_view
    # Under a caller's bf16 autocast the matmuls would lose more than a uint8 step.
    with torch.autocast(device_type=images.device.type, enabled=False):
        out = torch.bmm(row_matrices, rows_outermost.view(batch, height, channels * width))
        out = torch.bmm(out.view(batch, height * channels, width), column_matrices.mT)
    return out.view(batch, height, channels, width).permute(0, 2, 1, 3)


def solarize(images: Tensor, apply: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert (x -> 1 - x) the pixels at or above ``threshold`` in the samples where
    ``apply`` is true (torchvision ``solarize``; BYOL, Grill et al. 2020, Table 6, uses
    threshold 0.5). images: float in [0, 1]."""
    return solarize_(images.clone(), apply, threshold)


def solarize_(images: Tensor, apply: Tensor, threshold: float) -> Tensor:
    """:func:`solarize` in place."""
    invert = (_per_sample_bool(apply) & (images >= threshold)).to(images.dtype)
    # |x - 1| is 1 - x to the bit and |x - 0| is x: cheaper than torch.where with a
    # per-pixel condition on the CPU.
    return images.sub_(invert).abs_()


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """``(image - mean) / std`` per channel (torchvision ``normalize``)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images.sub(mean).div_(std)


# -- samplers -----------------------------------------------------------------------------
