"""Batched, per-sample-random augmentation on tensors: the view pipelines of
:mod:`mixmask.data.transforms`, run on a whole uint8 batch on its own device (GPU or CPU).

The PIL pipelines (one :class:`~mixmask.data.views.ViewConfig` per view; presets "cifar",
"mocov2": MoCo v2 aug+, Chen et al. 2020, arXiv 2003.04297; "byol", "byol_cifar": BYOL's
asymmetric views, Grill et al. 2020, Table 6) draw one set of random parameters per
image in a DataLoader worker. Here every random parameter is a tensor with one entry per
sample, drawn in one vectorised call, and every op is a pure function of the images and
those parameters, so that

* a fixed-parameter call can be checked against torchvision's functional ops
  (``tests/test_gpu_augment.py`` does, op by op and end to end);
* nothing loops over samples in Python, reads a value back to the host or branches on
  tensor values, so a CUDA training step is never synchronised by its data pipeline.

Usage::

    views = preset_views("cifar", 32, num_views=2)
    augment = BatchedViewAugment(views, mean=mean, std=std)
    generator = torch.Generator(device="cuda").manual_seed(0)
    (first, second), params = augment(uint8_images, generator)  # [B, 3, 32, 32] float32

The pieces, for composing other pipelines (a preset is one :class:`ViewConfig` per view;
BYOL's two differ in ``blur_p`` and ``solarize_p``):

* ops (:mod:`mixmask.data.gpu_ops`): ``resized_crop``, ``horizontal_flip``, the colour
  ops and ``color_jitter``, ``grayscale``, ``gaussian_blur``, ``solarize``, ``normalize``;
  each takes float images ``[B, C, H, W]`` in [0, 1] (the crop also uint8) and per-sample
  parameter tensors ``[B]`` / ``[B, k]``;
* samplers: :func:`sample_crop_boxes`, :func:`sample_color_jitter`,
  :func:`sample_apply`, :func:`sample_uniform`, :func:`sample_view_params`;
* pipeline: :class:`ViewConfig` (from :mod:`mixmask.data.views`, with
  :func:`~mixmask.data.views.preset_views`), :func:`apply_view`,
  :class:`BatchedViewAugment` (``__call__`` crops on the device; ``augment_crops`` takes
  views cropped elsewhere, e.g. by DataLoader workers that decode files:
  :class:`mixmask.data.device_views.DecodedViews`);
  :class:`mixmask.data.multi_size_augment.MultiSizeViewAugment` for views of several
  sizes (DINO's multi-crop): one BatchedViewAugment per group of views that can share one.

The ops, how they differ from the PIL pipeline and what they cost:
:mod:`mixmask.data.gpu_ops`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mixmask.data.gpu_ops import (
    color_jitter,
    gaussian_blur,
    grayscale_,
    horizontal_flip,
    resized_crop_rows_outermost,
    solarize_,
)
from mixmask.data.views import ViewConfig, preset_views, require_device_support

__all__ = [
    "SHARED_ATTRIBUTES",
    "BatchedViewAugment",
    "ViewParams",
    "apply_view",
    "sample_apply",
    "sample_color_jitter",
    "sample_crop_boxes",
    "sample_uniform",
    "sample_view_params",
]


def _device(generator: torch.Generator | None, device: torch.device | str | None):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def sample_uniform(
    batch: int,
    low: float,
    high: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """[B] float32 uniform on [low, high) (torchvision's ``torch.empty(1).uniform_``)."""
    uniform = torch.rand(batch, generator=generator, device=_device(generator, device))
    return low + (high - low) * uniform


def sample_apply(
    batch: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """[B] bool, true with probability p (``RandomApply``, ``RandomGrayscale``, flips)."""
    return torch.rand(batch, generator=generator, device=_device(generator, device)) < p


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    *,
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """[B, 4] int64 boxes (top, left, height, width), distributed as torchvision's
    ``RandomResizedCrop.get_params`` draws them.

    torchvision tries up to 10 times: area ~ U(scale) * H * W, log aspect ratio ~
    U(log ratio), w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first
    box that fits is placed uniformly; if none fits, the centre crop of the whole image
    with its aspect ratio clamped to ``ratio``. Here all 10 attempts are drawn for every
    sample at once and the first that fits is picked with argmax.
    """
    device = _device(generator, device)
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    uniform = torch.rand(batch, attempts, 2, generator=generator, device=device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform[..., 1])
    # torch.round rounds half to even, as Python's round in torchvision.
    box_width = torch.round(torch.sqrt(target_area * aspect))
    box_height = torch.round(torch.sqrt(target_area / aspect))
    fits = (box_width > 0) & (box_width <= width) & (box_height > 0) & (box_height <= height)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)
    any_fits = fits.any(dim=1)
    box_height = box_height.gather(1, first).squeeze(1)
    box_width = box_width.gather(1, first).squeeze(1)

    # torchvision's fallback, a constant of the image shape.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_width, fallback_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_width, fallback_height = int(round(height * max(ratio))), height
    else:
        fallback_width, fallback_height = width, height
    box_height = torch.where(any_fits, box_height, float(fallback_height))
    box_width = torch.where(any_fits, box_width, float(fallback_width))

    # randint(0, n) as floor(U * n); the clamp guards float rounding of U * n up to n.
    position = torch.rand(batch, 2, generator=generator, device=device)
    top = torch.minimum(
        torch.floor(position[:, 0] * (height - box_height + 1)), height - box_height
    )
    left = torch.minimum(torch.floor(position[:, 1] * (width - box_width + 1)), width - box_width)
    top = torch.where(any_fits, top, float((height - fallback_height) // 2))
    left = torch.where(any_fits, left, float((width - fallback_width) // 2))
    return torch.stack((top, left, box_height, box_width), dim=1).to(torch.int64)


def sample_color_jitter(
    batch: int,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(factors [B, 4], order [B, 4]) as torchvision's ``ColorJitter.get_params``:
    brightness, contrast, saturation ~ U(max(0, 1 - x), 1 + x), hue ~ U(-hue, hue), and a
    uniformly random permutation of the four ops per sample (argsort of uniforms)."""
    device = _device(generator, device)
    uniform = torch.rand(batch, 4, generator=generator, device=device)
    ranges = [(max(0.0, 1.0 - x), 1.0 + x) for x in (brightness, contrast, saturation)]
    ranges.append((-hue, hue))
    factors = torch.stack(
        [low + (high - low) * uniform[:, column] for column, (low, high) in enumerate(ranges)],
        dim=1,
    )
    order = torch.rand(batch, 4, generator=generator, device=device).argsort(dim=1)
    return factors, order


# -- pipelines ----------------------------------------------------------------------------


@dataclass
class ViewParams:
    """Every random parameter of a batch of views, one row per sample."""

    boxes: Tensor  # [B, 4] int64 top, left, height, width
    flip: Tensor  # [B] bool
    jitter_factors: Tensor  # [B, 4] brightness, contrast, saturation, hue
    jitter_order: Tensor  # [B, 4] permutation of 0..3
    jitter_apply: Tensor  # [B] bool
    grayscale_apply: Tensor  # [B] bool
    blur_sigma: Tensor  # [B]
    blur_apply: Tensor  # [B] bool
    solarize_apply: Tensor  # [B] bool

    @staticmethod
    def cat(params: Sequence[ViewParams]) -> ViewParams:
        return ViewParams(
            **{
                field.name: torch.cat([getattr(p, field.name) for p in params])
                for field in dataclasses.fields(ViewParams)
            }
        )


def sample_view_params(
    batch: int,
    height: int,
    width: int,
    config: ViewConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParams:
    """Draw one view's parameters for a batch of ``height x width`` images."""
    device = _device(generator, device)
    draw = {"generator": generator, "device": device}
    boxes = sample_crop_boxes(batch, height, width, config.scale, config.ratio, **draw)
    factors, order = sample_color_jitter(
        batch, config.brightness, config.contrast, config.saturation, config.hue, **draw
    )
    return ViewParams(
        boxes=boxes,
        flip=sample_apply(batch, config.flip_p, **draw),
        jitter_factors=factors,
        jitter_order=order,
        jitter_apply=sample_apply(batch, config.jitter_p, **draw),
        grayscale_apply=sample_apply(batch, config.grayscale_p, **draw),
        blur_sigma=sample_uniform(batch, *config.blur_sigma, **draw),
        blur_apply=sample_apply(batch, config.blur_p, **draw),
        solarize_apply=sample_apply(batch, config.solarize_p, **draw),
    )


def _rows_outermost(images: Tensor) -> Tensor:
    """A float32 copy of [B, C, H, W] images laid out as [B, H, C, W] (returned as a
    [B, C, H, W] view), the layout that :func:`apply_view` works in."""
    batch, channels, height, width = images.shape
    out = torch.empty(batch, height, channels, width, device=images.device, dtype=torch.float32)
    return out.copy_(images.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def apply_view(
    images: Tensor, params: ViewParams, config: ViewConfig, *, crop: bool = True
) -> Tensor:
    """The augmented views, in [0, 1] and before normalisation: crop (with the flip folded
    in) -> colour jitter -> grayscale -> blur -> solarize, each per sample.

    images: [B, C, H, W] uint8 or float; params: drawn for V * B rows (V views of each
    image, see :func:`resized_crop`). config gives the sizes and, by whether each
    probability is above 0, which passes run at all; which samples each pass changes is
    up to ``params``.
    crop: False for images already cropped to ``config.image_size`` (one row per row of
        ``params``; e.g. by DataLoader workers, :class:`mixmask.data.loaders.CropDataset`):
        ``params.boxes`` is ignored and everything after the crop runs as above.

    torchvision flips last; the flip commutes with every op here (the colour ops are per
    pixel, the blur kernel and its reflect padding are symmetric), so it rides on the
    crop's column weights for free.
    """
    # The blur's matmuls read the views laid out rows outermost, [B, S, C, S], as the crop
    # writes them; without a blur the plain layout is a little faster for the elementwise
    # passes (measured 15% on colour jitter at 32 px).
    rows_outermost = config.blur_p > 0
    if crop:
        out = resized_crop_rows_outermost(
            images, params.boxes, config.image_size, antialias=config.antialias,
            flip=params.flip, interpolation=config.interpolation,
        )
        if not rows_outermost:
            out = out.contiguous()
    else:
        size = config.image_size
        if images.shape[-2:] != (size, size) or images.shape[0] != params.flip.shape[0]:
            raise ValueError(
                f"crop=False needs one {size}x{size} image per row of params, got shape "
                f"{tuple(images.shape)} for {params.flip.shape[0]} rows."
            )
        if rows_outermost:
            out = _rows_outermost(images)
        else:
            out = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if images.dtype == torch.uint8:
            out = out.div_(255.0)
        out = horizontal_flip(out, params.flip)
    if config.jitter_p > 0:
        out = color_jitter(
            out,
            params.jitter_factors,
            params.jitter_order,
            params.jitter_apply,
            hue=config.hue > 0,
        )
    # From here on `out` is this function's own buffer: the passes work in place.
    if config.grayscale_p > 0:
        out = grayscale_(out, params.grayscale_apply)
    if config.blur_p > 0:
        out = gaussian_blur(out, params.blur_sigma, config.kernel_size, params.blur_apply)
    if config.solarize_p > 0:
        out = solarize_(out, params.solarize_apply, config.solarize_threshold)
    return out


# What the views of one BatchedViewAugment share: its V * B rows are one batch, resampled
# to one size with one filter, blurred with one kernel size, solarized at one threshold.
SHARED_ATTRIBUTES = ("image_size", "antialias", "interpolation", "kernel_size",
                     "solarize_threshold")


class BatchedViewAugment:
    """N independently augmented, normalised float32 views of a uint8 batch, on the
    batch's device; the tensor counterpart of N
    :func:`mixmask.data.transforms.view_transform` pipelines.

    >>> augment = BatchedViewAugment(preset_views("cifar", 32), mean=mean, std=std)
    >>> (first, second), params = augment(images_uint8, generator)   # generator on the device

    views: one :class:`ViewConfig` per view, in view order; they must share
    ``image_size``, ``antialias``, ``interpolation``, the blur kernel size and
    ``solarize_threshold`` (:data:`SHARED_ATTRIBUTES`; probabilities and ranges may
    differ, as BYOL's asymmetric views do; views that differ in those, as multi-crop's
    global and local views: :class:`MultiSizeViewAugment`). All views run as
    one batch of V * B rows, so the op count and kernel launches do not grow with V.
    channels_last: return the views in ``torch.channels_last`` memory format.

    Random draws: :func:`sample_view_params` for view 1, then view 2, ..., each for the
    whole batch, from the one generator, concatenated (:meth:`sample_params`). The
    returned :class:`ViewParams` hold those V * B rows: rows ``v * B`` to ``(v + 1) * B``
    are view v's, with its boxes (source pixels) and flips.
    """

    def __init__(
        self,
        views: Sequence[ViewConfig],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
    ):
        views = tuple(views)
        if not views:
            raise ValueError("BatchedViewAugment needs at least one view.")
        require_device_support(views)
        first = views[0]
        for name in SHARED_ATTRIBUTES:
            for other in views[1:]:
                if getattr(first, name) != getattr(other, name):
                    raise ValueError(
                        f"All views must share {name} ({getattr(first, name)} vs "
                        f"{getattr(other, name)}); probabilities and ranges may differ."
                    )
        self.views = views
        # The passes that run on the V * B batch: those any view uses.
        self._passes = dataclasses.replace(
            first,
            **{
                name: max(getattr(view, name) for view in views)
                for name in ("jitter_p", "hue", "grayscale_p", "blur_p", "solarize_p")
            },
        )
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels_last = channels_last
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_preset(
        cls,
        preset: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        num_views: int = 2,
        channels_last: bool = False,
    ) -> BatchedViewAugment:
        """The views of the preset of that name (:func:`mixmask.data.views.preset_views`)."""
        return cls(preset_views(preset, image_size, num_views), mean=mean, std=std,
                   channels_last=channels_last)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def image_size(self) -> int:
        return self.views[0].image_size

    def sample_params(
        self, batch: int, height: int, width: int, *, generator=None, device=None
    ) -> ViewParams:
        """Parameters of every view: view 1's B rows, then view 2's, ..."""
        return ViewParams.cat(
            [
                sample_view_params(batch, height, width, config, generator=generator, device=device)
                for config in self.views
            ]
        )

    def _normalize(self, views: Tensor, out: Tensor) -> Tensor:
        # Mean and std are moved to the device once, not once per batch.
        if views.device not in self._stats:
            self._stats[views.device] = (
                torch.tensor(self.mean, device=views.device).view(-1, 1, 1),
                torch.tensor(self.std, device=views.device).view(-1, 1, 1),
            )
        mean, std = self._stats[views.device]
        return torch.sub(views, mean, out=out).div_(std)

    def _check(self, images: Tensor, generator: torch.Generator | None) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}.")
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(
                f"The generator is on {generator.device} but the images are on "
                f"{images.device}; pass torch.Generator(device=images.device)."
            )

    def _finish(self, views: Tensor, batch: int) -> list[Tensor]:
        # apply_view's [V * B, H, C, W] layout goes to the requested one in normalize's pass.
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        views = self._normalize(views, torch.empty_like(views, memory_format=memory_format))
        return list(views.split(batch))

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], ViewParams]:
        """images: [B, 3, H, W] uint8 (or float in [0, 1]) on any device; generator: on
        the same device (None: torch's default generator of that device).

        Returns (views, params): V float32 [B, 3, S, S] views and their parameters
        (``params.boxes`` [V * B, 4] in the images' pixels, ``params.flip`` [V * B])."""
        self._check(images, generator)
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, generator=generator, device=images.device)
        return self._finish(apply_view(images, params, self._passes), batch), params

    def augment_crops(
        self,
        crops: Sequence[Tensor],
        generator: torch.Generator | None = None,
        *,
        boxes: Tensor | None = None,
    ) -> tuple[list[Tensor], ViewParams]:
        """Everything but the crop, for views already cropped (by DataLoader workers, say):
        crops: one [B, 3, S, S] uint8 (or float in [0, 1]) tensor per view, S = image_size.
        The flip and the colour, blur and solarize parameters are drawn as in
        :meth:`__call__` (crop boxes are drawn too, for an S x S image, to keep the draws
        :meth:`__call__`'s; they are unused). boxes: optional [V * B, 4], the crops' real
        boxes, returned in ``params.boxes`` in place of the unused ones."""
        if len(crops) != self.num_views:
            raise ValueError(f"Expected {self.num_views} crops (one per view), got {len(crops)}.")
        images = torch.cat(tuple(crops))
        self._check(images, generator)
        batch, size = crops[0].shape[0], self.image_size
        params = self.sample_params(batch, size, size, generator=generator, device=images.device)
        views = self._finish(apply_view(images, params, self._passes, crop=False), batch)
        if boxes is not None:
            params.boxes = boxes
        return views, params
