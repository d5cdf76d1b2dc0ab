"""Two-view batches made on the training device from a dataset held there as uint8.

For datasets that fit in memory (CIFAR, STL-10, Tiny-ImageNet; ``data.pipeline=device``):
the whole uint8 image tensor lives on the device (CIFAR-10: 147 MiB), each step indexes
its batch and augments it with :class:`~mixmask.data.gpu_augment.BatchedTwoViewAugment`.
No DataLoader workers, no host decode, no host-to-device copy per step.

The batches follow the same :class:`~mixmask.engine.EpochBatchSampler` order as the CPU
path, and each batch's augmentation generator is seeded from (seed, epoch, batch, rank),
so a resumed run draws exactly the views the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from mixmask.data.datasets import ImageSet
from mixmask.data.gpu_augment import BatchedTwoViewAugment

UNLABELED = -1


class DeviceTwoViews:
    """Iterates ``(view1, view2, labels)`` on ``device`` for the batches of ``batch_sampler``
    (lists of ``(index, epoch)`` pairs, as :class:`~mixmask.engine.EpochBatchSampler`)."""

    def __init__(self, image_set: ImageSet, batch_sampler: Iterable[list[tuple[int, int]]], *,
                 preset: str, image_size: int, device: torch.device, seed: int, rank: int = 0,
                 channels_last: bool = False):
        if image_set.images is None:
            raise ValueError("data.pipeline=device needs a dataset decoded into memory "
                             "(CIFAR, or ImageFolder images up to 96 px); use data.pipeline=cpu.")
        self.images = image_set.images.to(device)
        labels = (image_set.labels if image_set.labels is not None
                  else torch.full((len(image_set),), UNLABELED))
        self.labels = labels.to(device)
        self.batch_sampler = batch_sampler
        self.augment = BatchedTwoViewAugment.from_preset(
            preset, image_size, image_set.mean, image_set.std, channels_last=channels_last)
        self.device, self.seed, self.rank = device, seed, rank
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        start = getattr(self.batch_sampler, "start_batch", 0)
        for offset, batch in enumerate(self.batch_sampler):
            indices, epochs = zip(*batch, strict=True)
            self.generator.manual_seed(_batch_seed(self.seed, epochs[0], start + offset,
                                                   self.rank))
            index = torch.tensor(indices, device=self.device)
            view1, view2 = self.augment(self.images[index], self.generator)
            yield view1, view2, self.labels[index]


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Distinct, reproducible streams per (seed, epoch, batch, rank); fits in 63 bits.
    return ((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank

