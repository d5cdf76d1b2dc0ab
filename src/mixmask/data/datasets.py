"""Image datasets as plain containers: CIFAR and STL-10 (torchvision's files;
:mod:`mixmask.data.stl10`), Tiny-ImageNet (its official folder layout) and ImageFolder
trees or tarballs (ImageNet and any class-folder tree; :mod:`mixmask.data.image_folders`,
archives in :mod:`mixmask.data.files`), and a synthetic set for smoke tests.

`load_image_set` returns an `ImageSet`: small images (up to 96 px: CIFAR, STL-10,
Tiny-ImageNet) live in memory as one uint8 tensor, large ones stay on disk as a list of
paths. Augmentation is not done here; see `mixmask.data.transforms` and
`mixmask.data.loaders`.

Unreadable image files (:mod:`mixmask.data.image_set`) never stop a run silently or
mid-epoch: files decoded into memory
are dropped when the set is loaded (`ImageSet.bad_files`); files on disk are replaced,
when an item is read, by the next file that reads (`ImageSet.load_item`,
`ImageSet.read_failures`). Either way a warning names each one, and more than
`max_bad_fraction` of a split unreadable is a `DatasetError` listing them.

    >>> train = load_image_set("imagefolder", "data/cifar10_jpeg_q75.tar.gz", "train")
    >>> train.images.shape, train.num_classes
    (torch.Size([50000, 3, 32, 32]), 10)
"""

from __future__ import annotations

import numpy as np
import torch

from mixmask.data.files import cache_root
from mixmask.data.image_folders import file_image_set, list_imagefolder, list_tinyimagenet
from mixmask.data.image_set import ImageSet
from mixmask.data.stl10 import load_stl10
from mixmask.errors import DatasetError

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "synthetic", "stl10", "tinyimagenet")
# "pretrain" is what self-supervised pretraining reads: STL-10's unlabeled + train images,
# the train split of every other dataset.
SPLITS = ("train", "test", "pretrain")
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Per-channel (mean, std) in [0, 1] units used to normalise each dataset. ImageFolder and
# synthetic data use the ImageNet statistics; the engine may override `ImageSet.mean/std`.
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": _IMAGENET_STATS,
    "synthetic": _IMAGENET_STATS,
    # solo-learn's STL-10 normalisation (solo/data/pretrain_dataloader.py, STLTransform,
    # which pretrains on torchvision's "train+unlabeled"), kept so that STL-10 runs are
    # comparable with its results. (The numbers are CIFAR-10's statistics, rounded; STL-10's
    # own are close: about (0.447, 0.440, 0.407) and (0.260, 0.257, 0.271).)
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
    # The Tiny-ImageNet statistics most Tiny-ImageNet code uses, from
    # github.com/tjmoon0104/pytorch-tiny-imagenet (ResNet18_224.ipynb), computed on its
    # train split.
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}

def load_image_set(
    name: str,
    root: str,
    split: str,
    *,
    download: bool = False,
    subset: int = 0,
    in_memory_max_side: int = 96,
    cache_dir: str | None = None,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
) -> ImageSet:
    """Load one split of a dataset.

    name: "cifar10" | "cifar100" | "stl10" (torchvision's files under `root`),
      "tinyimagenet" (the official tiny-imagenet-200 folder, in or at `root`),
      "imagefolder" (a folder tree or a .tar/.tar.gz/.tgz of one) or "synthetic" (smoke
      tests; `root` is ignored).
    split: "train" | "test" | "pretrain". "pretrain" is what self-supervised pretraining
      reads: STL-10's unlabeled and train images (labels -1 for the unlabeled ones), the
      "train" split of every other dataset. STL-10's "train" and "test" are its labelled
      5,000 and 8,000 images; Tiny-ImageNet's "test" is its labelled val folder.
    subset: keep only the first `subset` images (0 = all; more than there are = all).
      Labelled images are ordered round-robin over classes (the first image of each
      class in class order, then the second of each, ...; files sorted within a class,
      binary files in file order), so the first N images are class-balanced. STL-10's
      pretraining split spreads its labelled images evenly among the unlabeled ones, so
      every prefix holds both in the ratio of the whole (1 in 21).
    in_memory_max_side: ImageFolder images are decoded into one in-memory uint8 tensor
      when the first image's longer side is at most this (and all images share its
      size); otherwise they stay on disk as paths.
    cache_dir: where archives are unpacked and decoded tensors are cached; defaults to
      $MIXMASK_CACHE, else ~/.cache/mixmask.
    max_bad_fraction: unreadable image files are skipped with a warning (see ImageSet);
      more than this share of the split's files unreadable is a DatasetError.
    progress: show bars (rate, ETA) while an archive is unpacked and images are decoded.

    ImageFolder layout: if the tree has a `train` folder, it is the train split and
    `test` (or else `val`) is the test split; otherwise the whole tree is the train
    split. Class subfolders give the labels (sorted names, as torchvision's
    ImageFolder; images loose beside class folders are ignored, as there); images with
    no class subfolders make an unlabeled set. A folder whose only entry is one folder
    (e.g. an archive of `mydata/train/...`) is unwrapped.
    """
    if name not in DATASET_NAMES:
        raise DatasetError(
            f"Unknown dataset {name!r}. Set data.dataset to one of: {', '.join(DATASET_NAMES)}."
        )
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r}. Use one of: {', '.join(SPLITS)}.")
    if subset < 0:
        raise DatasetError(f"data.subset must be 0 (all images) or positive, got {subset}.")
    if split == "pretrain" and name != "stl10":
        split = "train"
    mean, std = DATASET_STATS[name]
    if name in ("cifar10", "cifar100"):
        images, labels, classes = _load_cifar(name, root, split, download)
        if subset:
            images, labels = images[:subset], labels[:subset]
        return ImageSet(images, None, labels, classes, mean, std)
    if name == "stl10":
        images, labels, classes = load_stl10(root, split, download, subset)
        return ImageSet(images, None, labels, classes, mean, std)
    if name == "synthetic":
        images, labels, classes = _synthetic(split, subset)
        return ImageSet(images, None, labels, classes, mean, std)
    cache = cache_root(cache_dir)
    listing = (list_tinyimagenet(root, split, cache, progress) if name == "tinyimagenet"
               else list_imagefolder(root, split, cache, progress))
    return file_image_set(listing, subset, in_memory_max_side, cache, mean, std,
                           max_bad_fraction, progress)


# --- CIFAR ------------------------------------------------------------------------------

_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _load_cifar(
    name: str, root: str, split: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision import datasets

    dataset_cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    remedy = (
        f"Set data.download=true on a machine with internet, or place torchvision's "
        f"'{_CIFAR_FOLDERS[name]}' folder under data.root, or point data.root at an "
        f"ImageFolder tree or tarball and set data.dataset=imagefolder."
    )
    try:
        dataset = dataset_cls(root, train=(split == "train"), download=download)
    except RuntimeError as exc:
        # torchvision's "Dataset not found or corrupted" (also after a bad download).
        raise DatasetError(
            f"{pretty} was not found or is corrupt under {root!r}. {remedy}"
        ) from exc
    except OSError as exc:
        # urllib's URLError and socket errors are OSErrors: no internet, proxy, DNS.
        raise DatasetError(f"Downloading {pretty} into {root!r} failed ({exc}). {remedy}") from exc
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images, labels, list(dataset.classes)


# --- STL-10 -----------------------------------------------------------------------------

# matplotlib's "tab10" colours: ten distinct hues.
_SYNTHETIC_PALETTE = torch.tensor(
    [
        [0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
        [0.58, 0.40, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.50, 0.50, 0.50],
        [0.74, 0.74, 0.13], [0.09, 0.75, 0.81],
    ]
)  # fmt: skip


def _synthetic(split: str, subset: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """10 classes of 32x32 images: class c is a stripe pattern with its own hue,
    orientation and frequency, at a random phase, plus Gaussian noise. Fixed seeds
    (different for train and test), so the same call always gives the same images."""
    num_images = subset or (512 if split == "train" else 256)
    num_classes, size = 10, 32
    generator = torch.Generator().manual_seed(1234 if split == "train" else 5678)
    labels = torch.arange(num_images) % num_classes  # round-robin, like ImageFolder
    colour_a = _SYNTHETIC_PALETTE[labels][:, :, None, None]
    colour_b = 0.3 * colour_a  # each class: stripes of one hue, light and dark
    angle = torch.arange(num_classes) * (torch.pi / num_classes)
    frequency = 2.0 + (torch.arange(num_classes) % 3)  # stripes per image
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    along = (
        xx[None] * torch.cos(angle[labels])[:, None, None]
        + yy[None] * torch.sin(angle[labels])[:, None, None]
    )
    phase = torch.rand(num_images, generator=generator)[:, None, None]
    stripe = 0.5 + 0.5 * torch.sin(
        2 * torch.pi * (frequency[labels][:, None, None] * along + phase)
    )
    images = colour_a * stripe[:, None] + colour_b * (1 - stripe[:, None])
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = [f"class_{c}" for c in range(num_classes)]
    return images, labels.to(torch.int64), classes


# --- ImageFolder ------------------------------------------------------------------------


