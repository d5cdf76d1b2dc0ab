"""torch Datasets pairing an `ImageSet` with a transform, the batch order of training, the
CPU pipeline's loader, and what DataLoader workers share. The training loader of either
pipeline is :func:`mixmask.data.pipeline.build_train_loader`.

    >>> train = load_image_set("synthetic", "", "train")
    >>> views = preset_views("cifar", 32, num_views=2)
    >>> sampler = EpochBatchSampler(len(train), 256, seed=0)
    >>> loader = build_train_loader(train, sampler, views, pipeline="cpu",
    ...                             device=torch.device("cpu"), seed=0)
    >>> for batch in loader:                  # a mixmask.data.batch.Batch per step
    ...     first, second = batch.views

* ``pipeline="cpu"``: :class:`MultiViewDataset` (PIL and torchvision, one
  :func:`~mixmask.data.transforms.view_transform` per view) in DataLoader workers; each
  collated batch is moved to the device. In-memory images go through PIL too, so both
  storage kinds share one torchvision pipeline.
* ``pipeline="device"``: the views are augmented batched on the device
  (:mod:`mixmask.data.device_views`); for images on disk the DataLoader workers only
  decode and crop (:class:`CropDataset`).

Both pipelines key their items by ``(index, epoch)`` as :class:`EpochBatchSampler`
yields them and seed every item's (and on the device every batch's) draws from the run's
seed, the epoch and the index (batch), so the views are a pure function of those:
identical across worker counts, and a run resumed mid-epoch
(``EpochBatchSampler.set_epoch(epoch, start_batch)``) draws exactly the views the
uninterrupted run would have drawn.

Every item is read with :meth:`~mixmask.data.image_set.ImageSet.load_item`: a file that
cannot be decoded in a worker is replaced by the next readable file (the same one every
time), warned about once and flagged in ``ImageSet.read_failures``, shared memory the
main process reads for ``summary.json``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset, default_collate

from mixmask.data.batch import UNLABELED, Batch
from mixmask.data.gpu_augment import sample_crop_boxes
from mixmask.data.image_set import ImageSet
from mixmask.data.transforms import INTERPOLATION, view_transform
from mixmask.data.views import ViewConfig

__all__ = [
    "UNLABELED",
    "CropDataset",
    "EpochBatchSampler",
    "EvalDataset",
    "HostViews",
    "MultiViewDataset",
    "item_seed",
]


class EvalDataset(Dataset):
    """Items are (image, label); label is -1 for unlabeled data. An unreadable file is
    replaced by the next readable one, with its label (:meth:`ImageSet.load_item`)."""

    def __init__(self, image_set: ImageSet, transform: Callable[[PIL.Image.Image], torch.Tensor]):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.image_set.load_item(index)
        return self.transform(image), label


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's random draws (in :class:`MultiViewDataset` and
    :class:`CropDataset`): the views are a pure function of (seed, epoch, index),
    whatever the worker count, and a resumed run draws what the uninterrupted run would
    have drawn."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class EpochBatchSampler:
    """Shuffled batches, the same order for a given (seed, epoch) on every run, so a
    resumed run sees exactly the batches it would have seen; drops the last partial
    batch; shards each global batch across processes."""

    def __init__(self, num_samples: int, global_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        local = self.global_batch // self.world_size
        for batch in range(self.start_batch, self.num_samples // self.global_batch):
            start = batch * self.global_batch + self.rank * local
            yield [(index, self.epoch) for index in order[start:start + local].tolist()]


class MultiViewDataset(Dataset):
    """Items, for keys ``(index, epoch)``, are ``(views, label, boxes, flips)``: a tuple of
    V normalised float views [3, S, S] (one :func:`~mixmask.data.transforms.view_transform`
    per entry of ``views``, normalised with ``image_set.mean`` / ``.std``), the label (-1
    for unlabeled data), the crop boxes int64 [V, 4] (top, left, height, width in source
    pixels) and the flips bool [V].

    Before drawing, torch's global CPU generator (``torch.default_generator``, which
    torchvision's random transforms draw from) is seeded with :func:`item_seed` (seed,
    epoch, index); then view 1, view 2, ... draw in order from it. (Not
    ``torch.manual_seed``, which also seeds every CUDA device, lazily where CUDA is not
    initialised, as in DataLoader workers, by formatting a Python traceback per call:
    measured as a third of a 32 px two-view item's time on the CPU. The views are the
    same either way.)
    """

    def __init__(self, image_set: ImageSet, views: Sequence[ViewConfig], seed: int):
        if not views:
            raise ValueError("MultiViewDataset needs at least one view.")
        self.image_set, self.views, self.seed = image_set, tuple(views), seed
        self.transforms = [view_transform(view, image_set.mean, image_set.std)
                           for view in self.views]

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(
        self, key: tuple[int, int]
    ) -> tuple[tuple[torch.Tensor, ...], int, torch.Tensor, torch.Tensor]:
        index, epoch = key
        torch.default_generator.manual_seed(item_seed(self.seed, epoch, index))
        image, label = self.image_set.load_item(index)
        drawn = [transform(image) for transform in self.transforms]
        views = tuple(view for view, _, _ in drawn)
        boxes = torch.tensor([box for _, box, _ in drawn], dtype=torch.int64)
        flips = torch.tensor([flipped for _, _, flipped in drawn], dtype=torch.bool)
        return views, label, boxes, flips


class CropDataset(Dataset):
    """Items, for keys ``(index, epoch)``, are ``(crops, label, boxes, epoch)``: a tuple of
    V uint8 crops [3, S_v, S_v] (S_v the view's ``image_size``: views may differ in size,
    as multi-crop's global and local views do, and collate into one tensor per view),
    each the image's RandomResizedCrop for that view
    (torchvision's box distribution with the view's ``scale`` and ``ratio``, and its PIL
    resize: antialiased, the view's ``interpolation``), their boxes int64 [V, 4] (top,
    left, height, width in source pixels), drawn view by view from a generator seeded by
    :func:`item_seed`.

    Only the geometry runs here, so a DataLoader worker decodes and crops and the batch
    crosses to the device as uint8 (a quarter of float32's bytes); the flip and the
    photometric rest run there, batched (``MultiSizeViewAugment.augment_crops``).
    """

    def __init__(self, image_set: ImageSet, views: Sequence[ViewConfig], seed: int):
        if not views:
            raise ValueError("CropDataset needs at least one view.")
        self.image_set, self.views, self.seed = image_set, tuple(views), seed

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(
        self, key: tuple[int, int]
    ) -> tuple[tuple[torch.Tensor, ...], int, torch.Tensor, int]:
        index, epoch = key
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        image, label = self.image_set.load_item(index)
        width, height = image.size
        crops, boxes = [], []
        for view in self.views:
            box = sample_crop_boxes(1, height, width, view.scale, view.ratio,
                                    generator=generator)[0]
            crop = TF.resized_crop(image, *box.tolist(), [view.image_size] * 2,
                                   interpolation=INTERPOLATION[view.interpolation],
                                   antialias=True)
            crops.append(TF.pil_to_tensor(crop))
            boxes.append(box)
        return tuple(crops), label, torch.stack(boxes), epoch


def worker_error_message(error: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's
    traceback that the DataLoader folds into it (its last line is the original error)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``. SIGINT (Ctrl-C reaches the whole process group) is
    the main process's to handle: it stops at a step boundary, saves, then shuts its
    workers down. SIGTERM (SLURM signals every process of a job; the DataLoader's own
    shutdown and multiprocessing's exit handler terminate workers with it) ends the worker
    cleanly, with exit code 0, so the main process's SIGCHLD check does not fail the step
    in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def collate_views(items: list[tuple]) -> tuple:
    """The DataLoader ``collate_fn`` of :class:`MultiViewDataset` and :class:`CropDataset`
    items: ``(views, labels, boxes, last)`` with views a list of V [B, ...] tensors,
    labels [B], boxes [V, B, 4] and last the flips [V, B] (MultiViewDataset) or the
    epochs [B] (CropDataset); boxes and flips view-major, so each view's rows are one
    contiguous slice."""
    views, labels, boxes, last = default_collate(items)
    boxes = boxes.transpose(0, 1).contiguous()
    if last.dim() == 2:  # flips [B, V]
        last = last.transpose(0, 1).contiguous()
    return views, labels, boxes, last


class HostViews:
    """The ``pipeline="cpu"`` loader: iterates :class:`~mixmask.data.batch.Batch` objects
    on ``device``, made by a DataLoader over :class:`MultiViewDataset` with
    ``batch_sampler`` (``num_workers`` workers, pinned memory on CUDA, persistent workers
    when there are any) and copied with ``non_blocking=True``."""

    def __init__(self, image_set: ImageSet, batch_sampler, views: Sequence[ViewConfig], *,
                 device: torch.device, seed: int, num_workers: int = 0,
                 channels_last: bool = False):
        self.device, self.channels_last = torch.device(device), channels_last
        self.dataset = MultiViewDataset(image_set, views, seed)
        self.batch_sampler = batch_sampler
        self.loader = DataLoader(self.dataset, batch_sampler=batch_sampler,
                                 num_workers=num_workers, collate_fn=collate_views,
                                 worker_init_fn=ignore_stop_signals,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Batch]:
        move = self._move
        for views, labels, boxes, flips in self.loader:
            batch = Batch([move(view) for view in views], move(labels),
                          list(move(boxes).unbind(0)), list(move(flips).unbind(0)))
            yield batch.channels_last() if self.channels_last else batch


