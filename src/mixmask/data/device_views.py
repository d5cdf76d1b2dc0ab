"""Two-view batches augmented on the training device (``data.pipeline=device``).

* :class:`DeviceTwoViews`, for datasets that fit in memory (CIFAR, STL-10, Tiny-ImageNet):
  the whole uint8 image tensor lives on the device (CIFAR-10: 147 MiB), each step indexes
  its batch and augments it with :class:`~mixmask.data.gpu_augment.BatchedTwoViewAugment`.
  No DataLoader workers, no host decode, no host-to-device copy per step.
* :class:`DecodedTwoViews`, for ImageFolder files too large to hold decoded: DataLoader
  workers decode each image and cut both views' crops
  (:class:`~mixmask.data.loaders.TwoCropDataset`), the uint8 batch is pinned (on CUDA)
  and copied with ``non_blocking=True``, and the photometric ops run batched on the
  device (``BatchedTwoViewAugment.augment_crops``).

:func:`device_two_views` picks one for an :class:`~mixmask.data.datasets.ImageSet`.

The batches follow the same :class:`~mixmask.engine.EpochBatchSampler` order as the CPU
path; each batch's device generator is seeded from (seed, epoch, batch, rank), and the
workers' crops from (seed, epoch, index), so a resumed run draws exactly the views the
uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mixmask.data.datasets import ImageSet
from mixmask.data.gpu_augment import BatchedTwoViewAugment
from mixmask.data.loaders import UNLABELED, TwoCropDataset

BatchSampler = Iterable[list[tuple[int, int]]]


class _DeviceAugmentedViews:
    """What both loaders share: the preset's batched augmentation, the batch sampler and a
    device generator re-seeded per batch from (seed, epoch, batch, rank)."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler, *, preset: str,
                 image_size: int, device: torch.device, seed: int, rank: int,
                 channels_last: bool):
        self.augment = BatchedTwoViewAugment.from_preset(
            preset, image_size, image_set.mean, image_set.std, channels_last=channels_last)
        self.batch_sampler = batch_sampler
        self.device, self.seed, self.rank = device, seed, rank
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _seed_batch(self, epoch: int, batch: int) -> torch.Generator:
        return self.generator.manual_seed(_batch_seed(self.seed, epoch, batch, self.rank))


class DeviceTwoViews(_DeviceAugmentedViews):
    """Iterates ``(view1, view2, labels)`` on ``device`` for the batches of ``batch_sampler``
    (lists of ``(index, epoch)`` pairs, as :class:`~mixmask.engine.EpochBatchSampler`)."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler, *, preset: str,
                 image_size: int, device: torch.device, seed: int, rank: int = 0,
                 channels_last: bool = False):
        if image_set.images is None:
            raise ValueError("DeviceTwoViews needs a dataset decoded into memory; for files on "
                             "disk use DecodedTwoViews (device_two_views picks it).")
        super().__init__(image_set, batch_sampler, preset=preset, image_size=image_size,
                         device=device, seed=seed, rank=rank, channels_last=channels_last)
        self.images = image_set.images.to(device)
        labels = (image_set.labels if image_set.labels is not None
                  else torch.full((len(image_set),), UNLABELED))
        self.labels = labels.to(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        start = getattr(self.batch_sampler, "start_batch", 0)
        batches = list(self.batch_sampler)
        # The epoch's whole index order crosses to the device in one copy; each step then
        # slices it there, instead of a blocking pageable copy of its indices per step.
        order = torch.tensor([index for batch in batches for index, _ in batch],
                             dtype=torch.int64).to(self.device)
        end = 0
        for offset, batch in enumerate(batches):
            begin, end = end, end + len(batch)
            generator = self._seed_batch(batch[0][1], start + offset)
            index = order[begin:end]
            view1, view2 = self.augment(self.images[index], generator)
            yield view1, view2, self.labels[index]


class DecodedTwoViews(_DeviceAugmentedViews):
    """Iterates ``(view1, view2, labels)`` on ``device`` for the batches of ``batch_sampler``
    (as :class:`DeviceTwoViews`), for an ImageSet of files: crops decoded by ``num_workers``
    DataLoader workers, photometric ops on the device."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler, *, preset: str,
                 image_size: int, device: torch.device, seed: int, rank: int = 0,
                 num_workers: int = 0, channels_last: bool = False):
        super().__init__(image_set, batch_sampler, preset=preset, image_size=image_size,
                         device=device, seed=seed, rank=rank, channels_last=channels_last)
        crops = TwoCropDataset(image_set, self.augment.first, self.augment.second, seed)
        self.loader = DataLoader(crops, batch_sampler=batch_sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        start = getattr(self.batch_sampler, "start_batch", 0)
        for offset, (first, second, labels, epochs) in enumerate(self.loader):
            # epochs is a CPU tensor: reading it does not wait for the device.
            epoch = int(epochs[0])
            first = first.to(self.device, non_blocking=True)
            second = second.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            generator = self._seed_batch(epoch, start + offset)
            view1, view2 = self.augment.augment_crops(first, second, generator)
            yield view1, view2, labels


def device_two_views(image_set: ImageSet, batch_sampler: BatchSampler, *, preset: str,
                     image_size: int, device: torch.device, seed: int, rank: int = 0,
                     num_workers: int = 0,
                     channels_last: bool = False) -> DeviceTwoViews | DecodedTwoViews:
    """The ``data.pipeline=device`` loader: :class:`DeviceTwoViews` for an in-memory
    ImageSet, :class:`DecodedTwoViews` (with ``num_workers`` workers) for files on disk."""
    common = dict(preset=preset, image_size=image_size, device=device, seed=seed, rank=rank,
                  channels_last=channels_last)
    if image_set.images is not None:
        return DeviceTwoViews(image_set, batch_sampler, **common)
    return DecodedTwoViews(image_set, batch_sampler, num_workers=num_workers, **common)


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Distinct, reproducible streams per (seed, epoch, batch, rank); fits in 63 bits.
    return ((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank
