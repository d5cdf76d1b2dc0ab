"""The splits a run reads: its training images and the labelled evaluation sets."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mixmask.data.datasets import DATASET_STATS, load_image_set
from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import EvalDataset
from mixmask.data.transforms import eval_transform
from mixmask.errors import MixmaskError

_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_split(config, split: str, subset: int) -> ImageSet:
    """One split of ``data.dataset``: "pretrain" (what pretraining reads: STL-10's unlabeled
    + train images, the train split of every other dataset), "train" or "test" (the
    labelled evaluation sets). A CIFAR dataset whose ``data.root`` is an ImageFolder
    tree or tarball (a copy of CIFAR as image files) is read as such, with CIFAR's
    normalisation statistics, so one ``data.root=`` override is all an offline user needs."""
    data = config.data
    name, root = data.dataset, os.path.expanduser(data.root)
    if name in _TORCHVISION_FOLDERS and _looks_like_imagefolder(root, name):
        image_set = load_image_set("imagefolder", root, split, subset=subset,
                                   max_bad_fraction=data.max_bad_fraction,
                                   progress=config.train.progress_bar)
        image_set.mean, image_set.std = DATASET_STATS[name]
        return image_set
    return load_image_set(name, root, split, download=data.download, subset=subset,
                          max_bad_fraction=data.max_bad_fraction,
                          progress=config.train.progress_bar)


def _looks_like_imagefolder(root: str, name: str) -> bool:
    if os.path.isfile(root):
        return root.endswith((".tar", ".tar.gz", ".tgz"))
    return (os.path.isdir(os.path.join(root, "train"))
            and not os.path.isdir(os.path.join(root, _TORCHVISION_FOLDERS[name])))


@dataclass
class EvalData:
    """Labelled train/test sets with the evaluation transform (kNN bank and probes)."""

    train: EvalDataset
    test: EvalDataset
    num_classes: int


def load_eval_data(config) -> tuple[EvalData | None, str]:
    """The labelled evaluation sets, or None and the reason they are unavailable."""
    train_set = load_split(config, "train", config.data.eval_train_subset)
    if train_set.labels is None:
        return None, "the dataset has no labels (no class folders)"
    try:
        test_set = load_split(config, "test", config.data.eval_test_subset)
    except MixmaskError as error:
        return None, f"no test split ({error})"
    transform = eval_transform(config.data.image_size, train_set.mean, train_set.std,
                               resize_from_larger=config.data.image_size >= 128)
    return EvalData(EvalDataset(train_set, transform), EvalDataset(test_set, transform),
                    train_set.num_classes), ""
