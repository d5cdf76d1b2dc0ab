"""torch Datasets pairing an `ImageSet` with a transform.

    >>> train = load_image_set("synthetic", "", "train")
    >>> dataset = TwoViewDataset(train, two_view_transform("cifar", 32, train.mean, train.std))
    >>> first_view, second_view, label = dataset[0]

In-memory images go through PIL too, so both storage kinds share one torchvision pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from torch.utils.data import Dataset

from mixmask.data.datasets import ImageSet

UNLABELED = -1


def _label(image_set: ImageSet, index: int) -> int:
    return UNLABELED if image_set.labels is None else int(image_set.labels[index])


class TwoViewDataset(Dataset):
    """Items are (first_view, second_view, label); label is -1 for unlabeled data."""

    def __init__(
        self,
        image_set: ImageSet,
        transform: Callable[[PIL.Image.Image], tuple[torch.Tensor, torch.Tensor]],
    ):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        first_view, second_view = self.transform(self.image_set.load_pil(index))
        return first_view, second_view, _label(self.image_set, index)


class EvalDataset(Dataset):
    """Items are (image, label); label is -1 for unlabeled data."""

    def __init__(self, image_set: ImageSet, transform: Callable[[PIL.Image.Image], torch.Tensor]):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image_set.load_pil(index)), _label(self.image_set, index)
