"""Augmentations: two views for pretraining, and a fixed view for evaluation.

>>> views = two_view_transform("cifar", 32, *DATASET_STATS["cifar10"])
>>> first, second = views(pil_image)          # two [3, 32, 32] tensors

Presets (``data.augmentation``):

* "mocov2": MoCo v2 "aug+" (Chen et al. 2020, arXiv 2003.04297), for 224 px; both views
  alike, Gaussian blur with p=0.5.
* "cifar": the same without the blur, which destroys most of a 32 px image (the Un-Mix /
  MoCo CIFAR recipes).
* "byol": BYOL's asymmetric views (Grill et al. 2020, arXiv 2006.07733, Table 6), for
  224 px: crop scale (0.08, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale
  p=0.2, blur p=1.0 in view 1 and 0.1 in view 2, solarize p=0.0 in view 1 and 0.2 in
  view 2.
* "byol_cifar": solo-learn's CIFAR recipe for BYOL and Barlow Twins
  (``scripts/pretrain/cifar/{byol,barlow}.yaml``): "byol" without the blur.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from torchvision import transforms as T

TWO_VIEW_PRESETS = ("mocov2", "cifar", "byol", "byol_cifar")


@dataclass(frozen=True)
class PresetView:
    """The parameters of one view of a preset that differ between presets or views."""

    scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    blur_p: float = 0.0
    solarize_p: float = 0.0


_MOCOV2 = PresetView(blur_p=0.5)
_CIFAR = PresetView()
# BYOL, Table 6: view 1 is always blurred and never solarized; view 2 the reverse, mostly.
_BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)
_BYOL = (PresetView((0.08, 1.0), _BYOL_JITTER, blur_p=1.0, solarize_p=0.0),
         PresetView((0.08, 1.0), _BYOL_JITTER, blur_p=0.1, solarize_p=0.2))
_BYOL_CIFAR = (PresetView((0.08, 1.0), _BYOL_JITTER, solarize_p=0.0),
               PresetView((0.08, 1.0), _BYOL_JITTER, solarize_p=0.2))

PRESET_VIEWS: dict[str, tuple[PresetView, PresetView]] = {
    "mocov2": (_MOCOV2, _MOCOV2),
    "cifar": (_CIFAR, _CIFAR),
    "byol": _BYOL,
    "byol_cifar": _BYOL_CIFAR,
}
"""(view 1, view 2) of each preset; :mod:`mixmask.data.gpu_augment` builds its batched
views from the same table."""

SOLARIZE_THRESHOLD = 128  # uint8, i.e. 0.5 (BYOL, Table 6)


def preset_views(preset: str) -> tuple[PresetView, PresetView]:
    """(view 1, view 2) of a preset; a short error for an unknown name."""
    if preset not in PRESET_VIEWS:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}. Use one of: {', '.join(TWO_VIEW_PRESETS)}."
        )
    return PRESET_VIEWS[preset]


def _blur_kernel_size(image_size: int) -> int:
    # MoCo v2 blurs with PIL's radius=sigma; torchvision needs a kernel size. About 10% of
    # the image side, forced odd, as in SimCLR (Chen et al. 2020, Appendix A): 23 at 224.
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _view_pipeline(view: PresetView, image_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> T.Compose:
    # Order of MoCo v2 (moco/main_moco.py) and of solo-learn's BYOL: crop, jitter,
    # grayscale, blur, solarize, flip. Ops with p=0 are left out.
    steps = [
        T.RandomResizedCrop(image_size, scale=view.scale),
        T.RandomApply([T.ColorJitter(*view.jitter)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if view.blur_p > 0:
        blur = T.GaussianBlur(_blur_kernel_size(image_size), sigma=(0.1, 2.0))
        steps.append(T.RandomApply([blur], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=view.solarize_p))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class TwoViews:
    """Applies ``first`` and ``second`` (default: ``first`` again), each with its own random
    draws, to the same image. A class rather than a closure so DataLoader workers can
    pickle it."""

    def __init__(self, first: Callable[[PIL.Image.Image], torch.Tensor],
                 second: Callable[[PIL.Image.Image], torch.Tensor] | None = None):
        self.first = first
        self.second = first if second is None else second

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)

    def __repr__(self) -> str:
        if self.second is self.first:
            return f"TwoViews({self.first!r})"
        return f"TwoViews(first={self.first!r}, second={self.second!r})"


def two_view_transform(
    preset: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> TwoViews:
    """Two augmented, normalised views of a PIL image (see the module docstring for the
    presets). ``.first`` and ``.second`` are the two views' ``T.Compose``; symmetric
    presets use one Compose for both."""
    first, second = preset_views(preset)
    first_pipeline = _view_pipeline(first, image_size, mean, std)
    if second == first:
        return TwoViews(first_pipeline)
    return TwoViews(first_pipeline, _view_pipeline(second, image_size, mean, std))


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_from_larger: bool
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """The deterministic view used by linear probes and k-NN.

    resize_from_larger: ImageNet-style resize to image_size / 0.875 (256 for 224) and
    centre crop; otherwise resize the shorter side to image_size (a no-op for images that
    already have it) and centre crop to a square.
    """
    if resize_from_larger:
        resize = [T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)]
    else:
        resize = [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
