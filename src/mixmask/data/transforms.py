"""Augmentations: two independent views for pretraining, and a fixed view for evaluation.

>>> views = two_view_transform("cifar", 32, *DATASET_STATS["cifar10"])
>>> first, second = views(pil_image)          # two [3, 32, 32] tensors
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import PIL.Image
import torch
from torchvision import transforms as T

TWO_VIEW_PRESETS = ("mocov2", "cifar")


def _blur_kernel_size(image_size: int) -> int:
    # MoCo v2 blurs with PIL's radius=sigma; torchvision needs a kernel size. About 10% of
    # the image side, forced odd, as in SimCLR (Chen et al. 2020, Appendix A): 23 at 224.
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _view_pipeline(preset: str, image_size: int, mean: Sequence[float], std: Sequence[float]):
    # MoCo v2 "aug+" (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
    # Learning", moco/main_moco.py). The CIFAR preset drops the blur, which destroys
    # most of a 32x32 image, as in the Un-Mix / MoCo CIFAR recipes.
    steps = [
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if preset == "mocov2":
        blur = T.GaussianBlur(_blur_kernel_size(image_size), sigma=(0.1, 2.0))
        steps.append(T.RandomApply([blur], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class TwoViews:
    """Applies one random pipeline twice, independently, to the same image. A class
    rather than a closure so DataLoader workers can pickle it."""

    def __init__(self, view: Callable[[PIL.Image.Image], torch.Tensor]):
        self.view = view

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.view!r})"


def two_view_transform(
    preset: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[PIL.Image.Image], tuple[torch.Tensor, torch.Tensor]]:
    """Two independently augmented, normalised views of a PIL image.

    preset: "mocov2" (MoCo v2 aug+, with Gaussian blur; for 224-pixel images) or
    "cifar" (the same without blur; for 32-pixel images).
    """
    if preset not in TWO_VIEW_PRESETS:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}. Use one of: {', '.join(TWO_VIEW_PRESETS)}."
        )
    return TwoViews(_view_pipeline(preset, image_size, mean, std))


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
