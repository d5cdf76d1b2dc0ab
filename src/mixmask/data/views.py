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

More views than a preset defines (``num_views`` > 2 for BYOL's two, > 1 for the others)
cycle through the preset's views: view k (counting from 0) is the preset's view
k mod (its number of views). Symmetric presets give every view alike; BYOL's alternate
view 1, view 2, view 1, ..., so any even number of views holds as many of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AUGMENTATION_PRESETS", "ViewConfig", "preset_views"]


def _blur_kernel_size(image_size: int) -> int:
    # MoCo v2 blurs with PIL's radius=sigma; torchvision needs a kernel size. About 10% of
    # the image side, forced odd, as in SimCLR (Chen et al. 2020, Appendix A): 23 at 224.
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation: torchvision's parameters, with each op's probability.

    The ops, in order: RandomResizedCrop(image_size, scale, ratio) with bilinear
    resampling (antialiased when downscaling), ColorJitter(brightness, contrast,
    saturation, hue) with probability jitter_p, grayscale with grayscale_p, Gaussian blur
    (blur_kernel_size, sigma ~ U(blur_sigma)) with blur_p, solarize (pixels >=
    solarize_threshold, in [0, 1] units) with solarize_p, horizontal flip with flip_p.

    Defaults are the "cifar" preset (MoCo v2 aug+ without blur). The views of one
    :class:`~mixmask.data.gpu_augment.BatchedViewAugment` must share ``image_size``,
    ``antialias``, the blur kernel size and ``solarize_threshold``; probabilities and
    ranges may differ.
    """

    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    antialias: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel_size: int | None = None  # None: about 10% of image_size, odd (23 at 224)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    flip_p: float = 0.5

    @property
    def kernel_size(self) -> int:
        if self.blur_kernel_size is not None:
            return self.blur_kernel_size
        return _blur_kernel_size(self.image_size)


# Each preset's views as ViewConfig fields (besides image_size) that differ from the
# defaults; one entry for presets whose views are all alike.
_BYOL = {"scale": (0.08, 1.0), "saturation": 0.2}
_PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "mocov2": ({"blur_p": 0.5},),
    "cifar": ({},),
    # BYOL, Table 6: view 1 is always blurred and never solarized; view 2 the reverse, mostly.
    "byol": ({**_BYOL, "blur_p": 1.0}, {**_BYOL, "blur_p": 0.1, "solarize_p": 0.2}),
    "byol_cifar": (dict(_BYOL), {**_BYOL, "solarize_p": 0.2}),
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
