"""torch Datasets pairing an `ImageSet` with a transform.

    >>> train = load_image_set("synthetic", "", "train")
    >>> dataset = TwoViewDataset(train, two_view_transform("cifar", 32, train.mean, train.std))
    >>> first_view, second_view, label = dataset[0]

In-memory images go through PIL too, so both storage kinds share one torchvision pipeline.

`TwoCropDataset` is the CPU half of ``data.pipeline=device`` for images on disk: decode
and crop in DataLoader workers, everything else batched on the device (see
:class:`mixmask.data.device_views.DecodedTwoViews`).
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from mixmask.data.datasets import ImageSet
from mixmask.data.gpu_augment import ViewConfig, sample_crop_boxes

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


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's random draws (in ``mixmask.engine.SeededViews`` and
    :class:`TwoCropDataset`): the views are a pure function of (seed, epoch, index),
    whatever the worker count, and a resumed run draws what the uninterrupted run would
    have drawn."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class TwoCropDataset(Dataset):
    """Items, for keys ``(index, epoch)``, are ``(first_crop, second_crop, label, epoch)``:
    each crop uint8 [3, S, S], the image's RandomResizedCrop for that view (torchvision's
    box distribution with the view's ``scale`` and ``ratio``, and its PIL resize:
    antialiased bilinear), drawn from a generator seeded by :func:`item_seed`.

    Only the geometry runs here, so a DataLoader worker decodes and crops and the batch
    crosses to the device as uint8 (a quarter of float32's bytes); the photometric rest
    runs there, batched (``BatchedTwoViewAugment.augment_crops``).
    """

    def __init__(self, image_set: ImageSet, first: ViewConfig, second: ViewConfig, seed: int):
        if first.image_size != second.image_size:
            raise ValueError("Both views must have the same image_size.")
        self.image_set, self.views, self.seed = image_set, (first, second), seed

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        index, epoch = key
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        image = self.image_set.load_pil(index)
        width, height = image.size
        crops = []
        for view in self.views:
            box = sample_crop_boxes(1, height, width, view.scale, view.ratio,
                                    generator=generator)[0].tolist()
            crop = TF.resized_crop(image, *box, [view.image_size] * 2,
                                   interpolation=InterpolationMode.BILINEAR, antialias=True)
            crops.append(TF.pil_to_tensor(crop))
        return crops[0], crops[1], _label(self.image_set, index), epoch
