"""The train and test sets of ``transfer.dataset`` for a task, resized and (train)
flipped: what ``mixmask detect`` and ``mixmask segment`` read."""

from __future__ import annotations

import copy
import os

import torch

from mixmask.data.dense.ade20k import ade20k_segmentation
from mixmask.data.dense.coco import coco_dataset
from mixmask.data.dense.mosaic import CifarMosaic
from mixmask.data.dense.sample import DenseDataset
from mixmask.data.dense.transforms import DenseTransformed
from mixmask.data.dense.voc import voc_detection, voc_segmentation
from mixmask.data.splits import load_split
from mixmask.errors import ConfigError

# Which formats hold which task's annotations.
_TASKS = {"detection": ("mosaic", "coco", "voc"),
          "segmentation": ("mosaic", "voc", "ade20k")}


def dense_datasets(config, task: str) -> tuple[DenseDataset, DenseDataset]:
    """The raw (uint8, own size) train and test sets of ``config.transfer.dataset``."""
    transfer = config.transfer
    if transfer.dataset not in _TASKS[task]:
        raise ConfigError(f"transfer.dataset={transfer.dataset} has no {task} annotations; "
                          f"{task} reads {', '.join(_TASKS[task])}.")
    root = os.path.expanduser(transfer.root or config.data.root)
    if transfer.dataset == "mosaic":
        return tuple(_mosaic(config, root, split) for split in ("train", "test"))
    if transfer.dataset == "coco":
        return (coco_dataset(root, "train", skip_empty=True),
                coco_dataset(root, "test", skip_empty=False))
    if transfer.dataset == "voc":
        read = voc_detection if task == "detection" else voc_segmentation
        return read(root, "train"), read(root, "test")
    return ade20k_segmentation(root, "train"), ade20k_segmentation(root, "test")


def _mosaic(config, root: str, split: str) -> DenseDataset:
    transfer = config.transfer
    source_config = copy.deepcopy(config)
    source_config.data.root = root
    wanted = transfer.train_images if split == "train" else transfer.test_images
    # As many source images as the canvases hold at most (a prefix of the split, which is
    # class-balanced for ImageFolder data), or all of them when the canvases are not counted.
    images = load_split(source_config, split, wanted * transfer.mosaic_objects[1])
    canvases = wanted or max(1, len(images) // transfer.mosaic_objects[1])
    return CifarMosaic(images, split=split, canvases=canvases,
                       canvas_size=transfer.image_size, objects=transfer.mosaic_objects,
                       object_size=transfer.mosaic_object_size, seed=config.train.seed)


class _Prefix(torch.utils.data.Dataset):
    """The first ``count`` items of a dataset (its class lists kept)."""

    def __init__(self, dataset: DenseDataset, count: int):
        self.dataset, self.count = dataset, min(count, len(dataset))
        self.name = dataset.name
        self.thing_classes, self.segment_classes = (dataset.thing_classes,
                                                    dataset.segment_classes)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.dataset[index]


def transformed_sets(config, task: str) -> tuple[DenseTransformed, DenseTransformed,
                                                 DenseDataset]:
    """The train set (resized, flipped), the test set (resized) and the raw train set
    (its class lists), ``transfer.train_images`` / ``test_images`` applied to the
    datasets on disk (the mosaic makes that many canvases instead)."""
    transfer = config.transfer
    train, test = dense_datasets(config, task)
    if transfer.dataset != "mosaic":
        train = _Prefix(train, transfer.train_images) if transfer.train_images else train
        test = _Prefix(test, transfer.test_images) if transfer.test_images else test
    max_size = transfer.max_size or round(transfer.image_size * 1333 / 800)
    common = dict(image_size=transfer.image_size, max_size=max_size, seed=config.train.seed)
    return (DenseTransformed(train, train=True, flip=transfer.flip, **common),
            DenseTransformed(test, train=False, **common), train)
