"""What one augmented view is: :class:`ViewConfig`, shared by both pipelines, and the
presets (``data.augmentation``) as lists of them.

>>> first, second = preset_views("byol", 224)            # BYOL's two asymmetric views
>>> (only,) = preset_views("cifar", 32, num_views=1)     # one view, for MAE / A2MIM

The CPU pipeline (:func:`mixmask.data.transforms.view_transform`, PIL and torchvision in
DataLoader workers) and the device pipeline
(:class:`mixmask.data.gpu_augment.BatchedViewAugment`, batched tensors) read the same
:class:`ViewConfig`, so a preset means the same recipe on either.

Presets:

* "mocov2": MoCo v2 "aug+" (Chen et al. 2020, arXiv 2003.04297), for 224 px; every view
  alike, Gaussian blur with p=0.5.
* "cifar": the same without the blur, which destroys most of a 32 px image (the Un-Mix /
  MoCo CIFAR recipes).
* "byol": BYOL's asymmetric views (Grill et al. 2020, arXiv 2006.07733, Table 6), for
  224 px: crop scale (0.08, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
  p=0.2, blur p=1.0 in view 1 and 0.1 in view 2, solarize p=0.0 in view 1 and 0.2 in
  view 2.
* "byol_cifar": solo-learn's CIFAR recipe for BYOL and Barlow Twins
  (``scripts/pretrain/cifar/{byol,barlow}.yaml``): "byol" without the blur.
* "conservative": PixMIM's conservative transform (Liu et al., arXiv 2303.02416; mmselfsup
  ``configs/selfsup/pixmim/pixmim_vit-base-p16_8xb512-amp-coslr-300e_in1k.py``), one view:
  ``Resize(S)`` of the shorter side, ``RandomCrop(S, padding=4, padding_mode="reflect")``,
  horizontal flip; no scale jitter, no colour. At 32 px the resize is a no-op and this is
  the CIFAR pad-4 crop and flip, with PixMIM's reflect padding (torchvision's
  ``RandomCrop(32, padding=4)`` of the usual CIFAR recipe pads with zeros:
  ``padding_mode="constant"``). CPU pipeline only (:func:`require_device_support`).

* "mae": MAE's one view (He et al. 2022, ``main_pretrain.py``): RandomResizedCrop with
  scale (0.2, 1), bicubic, and a flip, no colour ops.
* "a2mim_vit", "a2mim_resnet": A2MIM's one view (openmixup ``configs/selfsup/a2mim``):
  RandomResizedCrop with scale (0.67, 1) for ViTs, (0.8, 1) for ResNets, a flip, no colour.
* "siameseim": SiameseIM's two views (``main_pretrain.py: DataAugmentationForSIM``), which
  are BYOL's colour ops: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur 1.0 / 0.1,
  solarize 0 / 0.2, crop scale (0.08, 1) (its 1600-epoch script's crop_min), the flip drawn
  per view (the reference flips before cropping: the same views, see
  :mod:`mixmask.ops.relative_position`), bicubic as the reference resamples.
* "siameseim_cifar": the same at 32 px with crop scale (0.2, 1) (0.08 of a 32 px image is
  a few pixels) and no blur, as the CIFAR recipes of BYOL do.

More views than a preset defines (``num_views`` > 2 for BYOL's two, > 1 for the others)
cycle through the preset's views: view k (counting from 0) is the preset's view
k mod (its number of views). Symmetric presets give every view alike; BYOL's alternate
view 1, view 2, view 1, ..., so any even number of views holds as many of each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mixmask.errors import ConfigError

__all__ = ["AUGMENTATION_PRESETS", "ViewConfig", "multi_crop_views", "preset_views",
           "require_device_support"]


def _blur_kernel_size(image_size: int) -> int:
    # MoCo v2 blurs with PIL's radius=sigma; torchvision needs a kernel size. About 10% of
    # the image side, forced odd, as in SimCLR (Chen et al. 2020, Appendix A): 23 at 224.
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation: torchvision's parameters, with each op's probability.

    The ops, in order: the crop, ColorJitter(brightness, contrast, saturation, hue) with
    probability jitter_p, grayscale with grayscale_p, Gaussian blur (blur_kernel_size,
    sigma ~ U(blur_sigma)) with blur_p, solarize (pixels >= solarize_threshold, in [0, 1]
    units) with solarize_p, horizontal flip with flip_p. The crop: ``crop="resized"``,
    RandomResizedCrop(image_size, scale, ratio) resampled with ``interpolation``
    (bilinear or bicubic, antialiased when downscaling); ``crop="padded"`` (PixMIM's
    conservative transform; ``scale`` and ``ratio`` unused), Resize(image_size) of the
    shorter side (bilinear, antialiased), then RandomCrop(image_size, padding,
    padding_mode).

    Defaults are the "cifar" preset (MoCo v2 aug+ without blur). The views of one
    :class:`~mixmask.data.gpu_augment.BatchedViewAugment` must share ``image_size``,
    ``antialias``, ``interpolation``, the blur kernel size and ``solarize_threshold``;
    probabilities and ranges may differ. Both pipelines take views that differ in those
    too (DINO's multi-crop: 2 global views at the image size and K local ones smaller):
    the CPU pipeline collates each view on its own, the device pipeline runs one
    BatchedViewAugment per group of alike views
    (:class:`~mixmask.data.multi_size_augment.MultiSizeViewAugment`).
    """

    image_size: int
    crop: Literal["resized", "padded"] = "resized"
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    antialias: bool = True
    # The RandomResizedCrop's resampling: torchvision's default, bilinear, for the Siamese
    # recipes and A2MIM (openmixup's pipelines leave it so); bicubic (PIL's, a = -0.5) where
    # the reference asks for it: MAE's and SiameseIM's main_pretrain.py (interpolation=3).
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel_size: int | None = None  # None: by blur_support
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # The blur's kernel when blur_kernel_size is None: "image", about 10% of image_size, odd
    # (SimCLR's rule, app. A: 23 at 224, 3 at 32); "sigma", at least +-3 x the largest sigma
    # as well (13 at 32 px for sigma up to 2), as PIL's GaussianBlur(radius=sigma) of
    # solo-learn's and lightly's CIFAR views blurs: its support grows with sigma.
    blur_support: Literal["image", "sigma"] = "image"
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    flip_p: float = 0.5
    padding: int = 4
    padding_mode: Literal["constant", "edge", "reflect", "symmetric"] = "reflect"

    @property
    def kernel_size(self) -> int:
        if self.blur_kernel_size is not None:
            return self.blur_kernel_size
        size = _blur_kernel_size(self.image_size)
        if self.blur_support == "sigma":
            size = max(size, 2 * math.ceil(3 * self.blur_sigma[1]) + 1)
        return size


# Each preset's views as ViewConfig fields (besides image_size) that differ from the
# defaults; one entry for presets whose views are all alike.
_BYOL = {"scale": (0.08, 1.0), "saturation": 0.2}
_SIAMESEIM = {**_BYOL, "interpolation": "bicubic"}
_PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "mocov2": ({"blur_p": 0.5},),
    "cifar": ({},),
    # BYOL, Table 6: view 1 is always blurred and never solarized; view 2 the reverse, mostly.
    "byol": ({**_BYOL, "blur_p": 1.0}, {**_BYOL, "blur_p": 0.1, "solarize_p": 0.2}),
    "byol_cifar": (dict(_BYOL), {**_BYOL, "solarize_p": 0.2}),
    # SimCLR's views (arXiv 2002.05709, app. A; solo-learn's CIFAR recipe alike:
    # augmentations/symmetric.yaml): crop 0.08-1, jitter 0.8/0.8/0.8/0.2 with p 0.8
    # (colour strength 1), grayscale 0.2, blur p 0.5 (sigma 0.1-2) with the support of
    # solo-learn's PIL blur (13 px at 32, SimCLR's 23 at 224), flip; both views alike.
    "simclr": ({"scale": (0.08, 1.0), "brightness": 0.8, "contrast": 0.8, "saturation": 0.8,
                "hue": 0.2, "blur_p": 0.5, "blur_support": "sigma"},),
    # PixMIM's conservative transform: no colour ops at all (its train_pipeline has none).
    "conservative": ({"crop": "padded", "jitter_p": 0.0, "grayscale_p": 0.0},),
    # MAE (main_pretrain.py): RandomResizedCrop(scale=(0.2, 1.0), bicubic) + flip, no colour.
    "mae": ({"scale": (0.2, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0,
             "interpolation": "bicubic"},),
    # A2MIM (configs/selfsup/a2mim/imagenet/*): RandomResizedCrop (0.67, 1) for ViTs and
    # (0.8, 1) for ResNets, flip, no colour jitter.
    "a2mim_vit": ({"scale": (0.67, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0},),
    "a2mim_resnet": ({"scale": (0.8, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0},),
    # SiameseIM (main_pretrain.py: DataAugmentationForSIM): BYOL's views, resampled bicubic.
    "siameseim": ({**_SIAMESEIM, "blur_p": 1.0},
                  {**_SIAMESEIM, "blur_p": 0.1, "solarize_p": 0.2}),
    "siameseim_cifar": ({**_SIAMESEIM, "scale": (0.2, 1.0)},
                        {**_SIAMESEIM, "scale": (0.2, 1.0), "solarize_p": 0.2}),
}

AUGMENTATION_PRESETS = tuple(_PRESETS)
"""The preset names, as ``data.augmentation`` takes them."""


def preset_views(preset: str, image_size: int, num_views: int = 2) -> list[ViewConfig]:
    """The ``num_views`` views of a preset at ``image_size`` px, in view order; beyond the
    preset's own views they cycle (view k is the preset's view k mod its count; see the
    module docstring). A short ValueError for an unknown name or num_views < 1."""
    if preset not in _PRESETS:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}. Use one of: "
            f"{', '.join(AUGMENTATION_PRESETS)}."
        )
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, got {num_views}.")
    fields = _PRESETS[preset]
    return [ViewConfig(image_size, **fields[k % len(fields)]) for k in range(num_views)]


def multi_crop_views(preset: str, image_size: int, *, global_scale: tuple[float, float],
                     local_crops: int, local_size: int,
                     local_scale: tuple[float, float]) -> list[ViewConfig]:
    """DINO's multi-crop (Caron et al. 2021, arXiv 2104.14294, sec. 3.1;
    ``main_dino.py: DataAugmentationDINO``): the preset's two views at ``image_size`` with
    crop scale ``global_scale``, then ``local_crops`` views of ``local_size`` px with crop
    scale ``local_scale``. A local view takes the preset's first view's colour ops with no
    solarisation and a blur probability of at most 0.5 (DINO's local transform: BYOL's
    colours, blur p 0.5; a preset without blur, as at 32 px, keeps none)."""
    global_views = [dataclasses.replace(view, scale=tuple(global_scale))
                    for view in preset_views(preset, image_size, 2)]
    first = global_views[0]
    local = dataclasses.replace(first, image_size=local_size, scale=tuple(local_scale),
                                solarize_p=0.0, blur_p=min(first.blur_p, 0.5))
    return [*global_views, *([local] * local_crops)]


def require_device_support(views: Sequence[ViewConfig]) -> None:
    """A ConfigError if a view needs an op the device pipeline does not implement (today
    the padded crop of the "conservative" preset), so it stops before any batch."""
    if any(view.crop != "resized" for view in views):
        raise ConfigError("data.augmentation=conservative (PixMIM's resize and padded crop) "
                          "runs on the cpu pipeline only; set data.pipeline=cpu.")
