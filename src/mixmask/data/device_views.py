"""N-view batches augmented on the training device (``data.pipeline=device``).

* :class:`DeviceViews`, for datasets that fit in memory (CIFAR, STL-10, Tiny-ImageNet):
  the whole uint8 image tensor lives on the device (CIFAR-10: 147 MiB), each step indexes
  its batch and augments it with :class:`~mixmask.data.multi_size_augment.MultiSizeViewAugment`
  (one :class:`~mixmask.data.gpu_augment.BatchedViewAugment` per group of views that share
  a size; every preset is one group).
  No DataLoader workers, no host decode, no host-to-device copy per step.
* :class:`DecodedViews`, for ImageFolder files too large to hold decoded: DataLoader
  workers decode each image and cut every view's crop
  (:class:`~mixmask.data.loaders.CropDataset`), the uint8 batch is pinned (on CUDA) and
  copied with ``non_blocking=True``, and the flip and the photometric ops run batched on
  the device (``MultiSizeViewAugment.augment_crops``). Views of several sizes (DINO's
  multi-crop: global and local views) are cut each at its own size and cross as one uint8
  tensor per view.

:func:`mixmask.data.pipeline.build_train_loader` picks one for an
:class:`~mixmask.data.image_set.ImageSet`. Both iterate
:class:`~mixmask.data.batch.Batch` objects on the device, with each view's crop box (in
source pixels) and flip.

The batches follow the same :class:`~mixmask.data.loaders.EpochBatchSampler` order as
the CPU path; each batch's device generator is seeded from (seed, epoch, batch, rank),
and the workers' crops from (seed, epoch, index), so a resumed run draws exactly the
views the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from mixmask.data.batch import UNLABELED, Batch
from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import CropDataset, collate_views, ignore_stop_signals
from mixmask.data.multi_size_augment import MultiSizeViewAugment
from mixmask.data.views import ViewConfig

__all__ = ["DecodedViews", "DeviceViews"]

BatchSampler = Iterable[list[tuple[int, int]]]


class _DeviceAugmentedViews:
    """What both loaders share: the views' batched augmentation, the batch sampler and a
    device generator re-seeded per batch from (seed, epoch, batch, rank)."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler,
                 views: Sequence[ViewConfig], *, device: torch.device, seed: int, rank: int,
                 channels_last: bool):
        device = torch.device(device)
        self.augment = MultiSizeViewAugment(views, mean=image_set.mean, std=image_set.std,
                                            channels_last=channels_last)
        self.batch_sampler = batch_sampler
        self.device, self.seed, self.rank = device, seed, rank
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _seed_batch(self, epoch: int, batch: int) -> torch.Generator:
        return self.generator.manual_seed(_batch_seed(self.seed, epoch, batch, self.rank))


class DeviceViews(_DeviceAugmentedViews):
    """Iterates :class:`~mixmask.data.batch.Batch` objects on ``device`` for the batches
    of ``batch_sampler`` (lists of ``(index, epoch)`` pairs, as
    :class:`~mixmask.data.loaders.EpochBatchSampler`), from an in-memory ImageSet."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler,
                 views: Sequence[ViewConfig], *, device: torch.device, seed: int,
                 rank: int = 0, channels_last: bool = False):
        if image_set.images is None:
            raise ValueError("DeviceViews needs a dataset decoded into memory; for files on "
                             "disk use DecodedViews (build_train_loader picks it).")
        super().__init__(image_set, batch_sampler, views, device=device, seed=seed, rank=rank,
                         channels_last=channels_last)
        self.images = image_set.images.to(self.device)
        labels = (image_set.labels if image_set.labels is not None
                  else torch.full((len(image_set),), UNLABELED))
        self.labels = labels.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
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
            views, params = self.augment(self.images[index], generator)
            yield Batch(views, self.labels[index], list(params.boxes.split(len(batch))),
                        list(params.flip.split(len(batch))))


class DecodedViews(_DeviceAugmentedViews):
    """Iterates :class:`~mixmask.data.batch.Batch` objects on ``device`` for the batches
    of ``batch_sampler`` (as :class:`DeviceViews`), for an ImageSet of files: crops
    decoded and cut by ``num_workers`` DataLoader workers (their boxes come from there),
    the flip and the photometric ops drawn and applied on the device."""

    def __init__(self, image_set: ImageSet, batch_sampler: BatchSampler,
                 views: Sequence[ViewConfig], *, device: torch.device, seed: int,
                 rank: int = 0, num_workers: int = 0, channels_last: bool = False):
        super().__init__(image_set, batch_sampler, views, device=device, seed=seed, rank=rank,
                         channels_last=channels_last)
        crops = CropDataset(image_set, self.augment.views, seed)
        self.loader = DataLoader(crops, batch_sampler=batch_sampler, num_workers=num_workers,
                                 collate_fn=collate_views, worker_init_fn=ignore_stop_signals,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[Batch]:
        start = getattr(self.batch_sampler, "start_batch", 0)
        for offset, (crops, labels, boxes, epochs) in enumerate(self.loader):
            # epochs is a CPU tensor: reading it does not wait for the device.
            epoch = int(epochs[0])
            crops = [crop.to(self.device, non_blocking=True) for crop in crops]
            labels = labels.to(self.device, non_blocking=True)
            boxes = boxes.to(self.device, non_blocking=True)  # [V, B, 4]
            generator = self._seed_batch(epoch, start + offset)
            views, params = self.augment.augment_crops(crops, generator,
                                                       boxes=boxes.view(-1, 4))
            yield Batch(views, labels, list(boxes.unbind(0)),
                        list(params.flip.split(len(labels))))


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Distinct, reproducible streams per (seed, epoch, batch, rank); fits in 63 bits.
    return ((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank
