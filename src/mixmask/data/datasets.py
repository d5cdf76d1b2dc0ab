"""Image datasets as plain containers: CIFAR and STL-10 (torchvision's files),
Tiny-ImageNet (its official folder layout), ImageFolder trees or tarballs (ImageNet and
any class-folder tree), and a synthetic set for smoke tests.

`load_image_set` returns an `ImageSet`: small images (up to 96 px: CIFAR, STL-10,
Tiny-ImageNet) live in memory as one uint8 tensor, large ones stay on disk as a list of
paths. Augmentation is not done here; see `mixmask.data.transforms` and
`mixmask.data.loaders`.

Unreadable image files never stop a run silently or mid-epoch: files decoded into memory
are dropped when the set is loaded (`ImageSet.bad_files`); files on disk are replaced,
when an item is read, by the next file that reads (`ImageSet.load_item`,
`ImageSet.read_failures`). Either way a warning names each one, and more than
`max_bad_fraction` of a split unreadable is a `DatasetError` listing them.

    >>> train = load_image_set("imagefolder", "data/cifar10_jpeg_q75.tar.gz", "train")
    >>> train.images.shape, train.num_classes
    (torch.Size([50000, 3, 32, 32]), 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from mixmask.data.batch import UNLABELED
from mixmask.data.progress import image_progress
from mixmask.errors import DatasetError

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "synthetic", "stl10", "tinyimagenet")
# "pretrain" is what self-supervised pretraining reads: STL-10's unlabeled + train images,
# the train split of every other dataset.
SPLITS = ("train", "test", "pretrain")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")

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

# Bump when the layout of the decoded-image cache changes, so old entries are ignored.
# v2: images.npy holds the readable images only; meta.json lists the unreadable ones.
_DECODED_CACHE_VERSION = "v2"


class UnreadableImageWarning(UserWarning):
    """An image file that could not be decoded was skipped."""


@dataclass
class ImageSet:
    """Images of one split, either decoded in memory or as files on disk.

    Exactly one of `images` (uint8 [N, 3, H, W]) and `paths` is set. `labels` is int64
    [N], or None for an unlabeled dataset (then `classes` is empty); a labelled set may
    hold unlabeled images too, with label -1 (STL-10's pretraining split).

    bad_files: files found unreadable when the set was loaded, already left out of it.
    max_bad_fraction: reading items (`load_item`) stops with a DatasetError once more than
      this share of the files has turned out unreadable.
    read_failures: (set for files on disk) uint8 [N], 1 where reading that file failed.
    """

    images: torch.Tensor | None
    paths: list[str] | None
    labels: torch.Tensor | None
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bad_files: list[str] = field(default_factory=list)
    max_bad_fraction: float = 0.01
    read_failures: torch.Tensor | None = field(init=False, default=None, repr=False,
                                               compare=False)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageSet needs exactly one of images and paths.")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError("ImageSet.images must be a uint8 tensor [N, 3, H, W].")
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError("ImageSet.labels must have one entry per image.")
        if self.paths is not None:
            # DataLoader workers read the files, but the main process reports the failures
            # (summary.json), so the flags live in shared memory: forked workers write the
            # same pages, and spawned ones get a handle (torch pickles shared tensors that
            # way). One byte per file (1.3 MB for ImageNet), no lock: a flag only ever goes
            # from 0 to 1, so concurrent writers cannot lose a failure.
            self.read_failures = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, index: int) -> int:
        """The `index`-th label; -1 for an unlabeled image."""
        return UNLABELED if self.labels is None else int(self.labels[index])

    def load_pil(self, index: int) -> PIL.Image.Image:
        """The `index`-th image as an RGB PIL image; DatasetError if its file is unreadable."""
        if self.images is not None:
            return PIL.Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return _open_rgb(self.paths[index])

    def load_item(self, index: int) -> tuple[PIL.Image.Image, int]:
        """The `index`-th image (RGB PIL) and its label, for training and evaluation.

        An unreadable file is replaced by the next file that reads (wrapping around), with
        that file's label, so one bad file never stops an epoch and the substitute is the
        same on every epoch, worker count and run. The first failure of each file warns
        (UnreadableImageWarning) and sets its `read_failures` flag; once more than
        `max_bad_fraction` of the files have failed, this raises a DatasetError.
        """
        if self.images is not None:
            return self.load_pil(index), self.label(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self.read_failures[candidate]:
                continue  # known bad (in this or any process): not tried again
            try:
                return _open_rgb(self.paths[candidate]), self.label(candidate)
            except DatasetError as error:
                self._record_failure(candidate, error)
        raise DatasetError(f"None of the {len(self)} image files of the split can be read "
                           f"(e.g. {self.paths[0]!r}). Check data.root.")

    def _record_failure(self, index: int, error: DatasetError) -> None:
        self.read_failures[index] = 1
        failed = self.skipped_files()
        total = len(self) + len(self.bad_files)
        if _too_many_bad(len(failed), total, self.max_bad_fraction):
            message = _bad_files_message(failed, total, self.max_bad_fraction)
            raise DatasetError(f"{error} {message}")
        # stacklevel=3: name the dataset's __getitem__ that read the item.
        warnings.warn(f"{error} Skipped: the next readable image is used in its place, and "
                      "the file is counted in summary.json (bad_images).",
                      UnreadableImageWarning, stacklevel=3)

    def skipped_files(self, read_failures: torch.Tensor | None = None) -> list[str]:
        """Every file skipped as unreadable: those left out when loading, then those met
        while reading items (`read_failures`, or the given flags, e.g. merged over the
        processes of a distributed run)."""
        flags = self.read_failures if read_failures is None else read_failures
        if flags is None:
            return list(self.bad_files)
        met = flags.cpu().nonzero().flatten().tolist()
        return self.bad_files + [self.paths[index] for index in met]


def _too_many_bad(num_bad: int, total: int, max_fraction: float) -> bool:
    return num_bad > max_fraction * total


def _bad_files_message(bad: list[str], total: int, max_fraction: float) -> str:
    """'N images could not be read (...): first ten paths and M more. What to do.'"""
    shown = ", ".join(repr(path) for path in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{len(bad)} images could not be read ({len(bad)} of {total} files of the split, "
            f"more than data.max_bad_fraction={max_fraction} allows): {shown}{more}. Remove "
            "or replace them, or raise data.max_bad_fraction to skip them.")


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
        images, labels, classes = _load_stl10(root, split, download, subset)
        return ImageSet(images, None, labels, classes, mean, std)
    if name == "synthetic":
        images, labels, classes = _synthetic(split, subset)
        return ImageSet(images, None, labels, classes, mean, std)
    cache = _cache_root(cache_dir)
    listing = (_list_tinyimagenet(root, split, cache, progress) if name == "tinyimagenet"
               else _list_imagefolder(root, split, cache, progress))
    return _file_image_set(listing, subset, in_memory_max_side, cache, mean, std,
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

_STL10_FOLDER = "stl10_binary"
_STL10_SIDE = 96
_STL10_IMAGE_BYTES = 3 * _STL10_SIDE * _STL10_SIDE
# Per part: the images file and the labels file (None: unlabeled).
_STL10_PARTS = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
# class_names.txt of the official archive, for a copy without it.
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                  "truck"]


def _load_stl10(
    root: str, split: str, download: bool, subset: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """STL-10 (Coates et al., 2011) from torchvision's `stl10_binary` files, read here
    rather than through torchvision, whose loader first checks the md5 sums of all five
    files (2.6 GB). "pretrain" is unlabeled + train, labels -1 for unlabeled images."""
    parts = ["train", "unlabeled"] if split == "pretrain" else [split]
    folder = _stl10_folder(root)
    needed = [name for part in parts for name in _STL10_PARTS[part] if name]
    if download and not all(os.path.isfile(os.path.join(folder, n)) for n in needed):
        _download_stl10(root)
        folder = _stl10_folder(root)
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DatasetError(
            f"STL-10 was not found under {root!r}: its {split} split needs "
            f"{', '.join(needed)} in {folder!r}; missing: {', '.join(missing)} "
            f"({_describe_folder(folder if os.path.isdir(folder) else root)}). Set "
            f"data.download=true on a machine with internet, or place torchvision's "
            f"'{_STL10_FOLDER}' folder under data.root."
        )
    images = [_stl10_images(os.path.join(folder, _STL10_PARTS[part][0])) for part in parts]
    labels = [
        _stl10_labels(os.path.join(folder, _STL10_PARTS[part][1]), len(part_images))
        if _STL10_PARTS[part][1] else np.full(len(part_images), UNLABELED, dtype=np.int64)
        for part, part_images in zip(parts, images, strict=True)
    ]
    # Each part in class-balanced order; the pretraining split then interleaves them.
    rows = [_round_robin_order(part_labels) for part_labels in labels]
    order = _spread_evenly([len(r) for r in rows])
    if subset:
        order = order[:subset]
    return (torch.from_numpy(_gather_stl10(images, rows, order)),
            torch.from_numpy(np.concatenate(labels)[_global_rows(rows, labels, order)]),
            _stl10_classes(folder))


def _stl10_folder(root: str) -> str:
    # data.root may hold stl10_binary/ (torchvision's root) or be that folder itself.
    if os.path.isfile(os.path.join(root, _STL10_PARTS["train"][0])):
        return root
    return os.path.join(root, _STL10_FOLDER)


def _download_stl10(root: str) -> None:
    from torchvision import datasets

    remedy = (f"Set data.download=true on a machine with internet, or place torchvision's "
              f"'{_STL10_FOLDER}' folder under data.root.")
    try:
        # Downloads and unpacks the whole archive; "test" is the smallest split it loads.
        datasets.STL10(root, split="test", download=True)
    except RuntimeError as exc:
        raise DatasetError(f"STL-10 under {root!r} is corrupt after downloading ({exc}). "
                           f"{remedy}") from exc
    except OSError as exc:  # no internet, proxy, DNS, full disk
        raise DatasetError(f"Downloading STL-10 into {root!r} failed ({exc}). {remedy}") from exc


def _stl10_images(path: str) -> np.ndarray:
    """The images of one .bin file as stored: uint8 [N, 3, 96, 96], each channel
    column-major (memory-mapped; transposed when gathered)."""
    size = os.path.getsize(path)
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise DatasetError(
            f"{path!r} holds {size} bytes, not a whole number of 3x96x96 images "
            f"({_STL10_IMAGE_BYTES} bytes each): the file is truncated or not STL-10's. "
            "Re-download it."
        )
    return np.memmap(path, dtype=np.uint8, mode="r",
                     shape=(size // _STL10_IMAGE_BYTES, 3, _STL10_SIDE, _STL10_SIDE))


def _stl10_labels(path: str, count: int) -> np.ndarray:
    """Labels 1..10 on disk, 0..9 here (as torchvision)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count or not np.all((raw >= 1) & (raw <= len(_STL10_CLASSES))):
        found = f"{len(raw)} labels" if len(raw) != count else "labels outside 1..10"
        raise DatasetError(
            f"{path!r} should hold {count} labels in 1..10, one per image of its _X.bin "
            f"file, but holds {found}. Re-download STL-10."
        )
    return raw.astype(np.int64) - 1


def _stl10_classes(folder: str) -> list[str]:
    path = os.path.join(folder, "class_names.txt")
    if not os.path.isfile(path):
        return list(_STL10_CLASSES)
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    return names if len(names) == len(_STL10_CLASSES) else list(_STL10_CLASSES)


def _round_robin_order(labels: np.ndarray) -> np.ndarray:
    """Row order visiting the i-th image of every class (in class order) before the
    (i+1)-th of any, images of one class in file order: every prefix is class-balanced.
    Unlabeled rows (-1) keep file order."""
    if len(labels) == 0 or labels[0] < 0:
        return np.arange(len(labels))
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rank_in_class[where] = np.arange(len(where))
    return np.lexsort((labels, rank_in_class))  # by rank, then by class


def _spread_evenly(sizes: list[int]) -> np.ndarray:
    """Positions [0, sum(sizes)) of the parts' items (part 0's first), in an order that
    spreads each part evenly, so every prefix mixes the parts in the ratio of the
    whole: item i of a part of size n sits at (i + 0.5) / n, merged in that order."""
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in sizes])
    return np.argsort(keys, kind="stable")


def _global_rows(rows: list[np.ndarray], labels: list[np.ndarray], order: np.ndarray
                 ) -> np.ndarray:
    """For `order` over the concatenated parts, the row of each item in the concatenated
    label arrays (part offsets added)."""
    offsets = np.cumsum([0] + [len(part) for part in labels[:-1]])
    return np.concatenate([row + offset for row, offset in zip(rows, offsets, strict=True)]
                          )[order]


def _gather_stl10(images: list[np.ndarray], rows: list[np.ndarray], order: np.ndarray
                  ) -> np.ndarray:
    """uint8 [len(order), 3, 96, 96] in row-major (H, W) order, read part by part."""
    # The column-major transposition is torchvision's:
    # np.transpose(np.reshape(x, (-1, 3, 96, 96)), (0, 1, 3, 2)).
    out = np.empty((len(order), 3, _STL10_SIDE, _STL10_SIDE), dtype=np.uint8)
    part_of = np.concatenate([np.full(len(r), p) for p, r in enumerate(rows)])[order]
    row_of = np.concatenate(rows)[order]
    chunk = 4096  # bounds the temporary copy: 113 MB
    for part, part_images in enumerate(images):
        positions = np.flatnonzero(part_of == part)
        for start in range(0, len(positions), chunk):
            where = positions[start:start + chunk]
            rows_here = row_of[where]
            sorted_rows = np.argsort(rows_here)  # read the memory map front to back
            block = part_images[rows_here[sorted_rows]].transpose(0, 1, 3, 2)
            out[where[sorted_rows]] = block
    return out


# --- synthetic --------------------------------------------------------------------------


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


@dataclass
class _Listing:
    """The files of one split of a folder dataset, in round-robin class order."""

    split_dir: str
    paths: list[str]
    labels: list[int]
    classes: list[str]


def _list_imagefolder(root: str, split: str, cache: str, progress: bool = False) -> _Listing:
    tree = _unwrap_single_folder(_resolve_tree(root, cache, progress))
    split_dir, sibling_splits = _split_dir(tree, split, root)
    classes = _class_names(split_dir, sibling_splits)
    paths, labels = _round_robin_files(split_dir, classes)
    return _Listing(split_dir, paths, labels, classes)


def _file_image_set(
    listing: _Listing,
    subset: int,
    in_memory_max_side: int,
    cache: str,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    max_bad_fraction: float,
    progress: bool = False,
) -> ImageSet:
    """The first `subset` files of `listing`: decoded into memory (through the decoded
    cache) when small, else as paths. Unreadable files are left out of an in-memory set
    and flagged in an on-disk one (ImageSet.read_failures)."""
    split_dir, paths, labels, classes = (listing.split_dir, listing.paths, listing.labels,
                                         listing.classes)
    if not paths:
        raise DatasetError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir!r}. Check data.root."
        )
    num_kept = min(subset, len(paths)) if subset else len(paths)
    kept_paths = paths[:num_kept]

    def label_tensor(indices: list[int]) -> torch.Tensor | None:
        return torch.as_tensor([labels[i] for i in indices], dtype=torch.int64) if classes else None

    unreadable, first_size = _first_readable_size(kept_paths, max_bad_fraction)
    if max(first_size) <= in_memory_max_side:
        cache_entry = os.path.join(cache, f"decoded-{_listing_key(split_dir, paths, labels)}")
        if os.path.isdir(cache_entry):
            decoded = _read_decoded_cache(cache_entry, num_kept, paths, labels)
        else:
            decoded = _decode_all(kept_paths, first_size, progress)
            if decoded is not None and num_kept == len(paths):
                _write_decoded_cache(cache_entry, cache, *decoded, labels, classes)
        if decoded is not None:
            images, bad = decoded
            bad_paths = [kept_paths[i] for i in bad]
            if _too_many_bad(len(bad), num_kept, max_bad_fraction):
                raise DatasetError(_bad_files_message(bad_paths, num_kept, max_bad_fraction))
            if bad_paths:
                _warn_skipped(bad_paths, num_kept, split_dir)
            kept = sorted(set(range(num_kept)) - set(bad))
            return ImageSet(images, None, label_tensor(kept), classes, mean, std,
                            bad_files=bad_paths, max_bad_fraction=max_bad_fraction)
        # Images of different sizes cannot be stacked: they stay on disk.
    image_set = ImageSet(None, kept_paths, label_tensor(list(range(num_kept))), classes, mean,
                         std, max_bad_fraction=max_bad_fraction)
    for index in unreadable:  # met while finding the size; the rest are met when read
        image_set.read_failures[index] = 1
    if unreadable:
        _warn_skipped([kept_paths[i] for i in unreadable], num_kept, split_dir)
    return image_set


def _first_readable_size(paths: list[str], max_bad_fraction: float
                         ) -> tuple[list[int], tuple[int, int]]:
    """The indices of the unreadable files before the first readable one, and its size."""
    unreadable = []
    for index, path in enumerate(paths):
        try:
            return unreadable, _open_rgb(path).size
        except DatasetError:
            unreadable.append(index)
            if _too_many_bad(len(unreadable), len(paths), max_bad_fraction):
                bad = [paths[i] for i in unreadable]
                raise DatasetError(_bad_files_message(bad, len(paths), max_bad_fraction)
                                   ) from None
    raise DatasetError(_bad_files_message(paths, len(paths), max_bad_fraction))


def _warn_skipped(bad_paths: list[str], total: int, split_dir: str) -> None:
    shown = ", ".join(repr(path) for path in bad_paths[:10])
    more = f" and {len(bad_paths) - 10} more" if len(bad_paths) > 10 else ""
    warnings.warn(f"Skipped {len(bad_paths)} unreadable image files of the {total} under "
                  f"{split_dir!r}: {shown}{more}. They are counted in summary.json "
                  "(bad_images).", UnreadableImageWarning, stacklevel=4)  # load_image_set's caller


def _cache_root(cache_dir: str | None) -> str:
    path = cache_dir or os.environ.get("MIXMASK_CACHE") or os.path.join("~", ".cache", "mixmask")
    return os.path.abspath(os.path.expanduser(path))


def _resolve_tree(root: str, cache: str, progress: bool = False) -> str:
    """The folder tree behind `root`, unpacking an archive into the cache if needed."""
    if os.path.isdir(root):
        return root
    if not os.path.exists(root):
        raise DatasetError(
            f"data.root {root!r} does not exist. Point it at an image folder or tarball."
        )
    if not root.lower().endswith(ARCHIVE_EXTENSIONS):
        raise DatasetError(
            f"data.root {root!r} is a file but not a {'/'.join(ARCHIVE_EXTENSIONS)} archive. "
            "Point it at an image folder or a tarball of one."
        )
    return _unpack_once(root, cache, progress)


def _unpack_once(archive: str, cache: str, progress: bool = False) -> str:
    """Unpack `archive` into the cache unless done before; returns the unpacked folder.

    The entry is keyed by the archive's absolute path, size and mtime, so a changed archive
    is unpacked again. Extraction goes to a temporary folder renamed into place at the end,
    so an interrupted extraction is never mistaken for a finished one.
    """
    archive = os.path.abspath(archive)
    stat = os.stat(archive)
    key = _digest(f"{archive}\n{stat.st_size}\n{stat.st_mtime_ns}")
    stem = os.path.basename(archive)
    for ext in ARCHIVE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    final = os.path.join(cache, f"{stem}-{key}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-unpack-", dir=cache)
    try:
        _extract_archive(archive, staging, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, final)
    return final


def _extract_archive(archive: str, destination: str, progress: bool = False) -> None:
    # Member by member from one sequential read, so the bar can follow the compressed bytes
    # read (a member count would need a first pass over a .tar.gz).
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar, \
                image_progress(f"unpacking {os.path.basename(archive)}",
                               os.fstat(raw.fileno()).st_size, enabled=progress,
                               unit="MB") as advance:
            done = 0
            if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4
                raise DatasetError(
                    f"Cannot unpack {archive!r} safely: this Python's tarfile has no 'data' "
                    "filter (added in 3.10.12 and 3.11.4). Upgrade Python, or unpack the "
                    "archive yourself and point data.root at the folder.")
            for member in tar:
                # The 'data' filter refuses absolute paths, '..', links that leave the
                # tree and device files: an archive cannot write outside its folder.
                tar.extract(member, destination, filter="data")
                advance(raw.tell() - done)
                done = raw.tell()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(
            f"Could not unpack {archive!r}: it is corrupt or not a tar archive ({exc}). "
            "Re-download or re-create it."
        ) from exc


def _publish(staging: str, final: str) -> None:
    """Atomically move a finished cache entry into place; if another process won the race,
    keep theirs."""
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; let others sharing the cache read it
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(final):
            raise


def _visible_entries(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(
            (e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"),
            key=lambda e: e.name,
        )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _unwrap_single_folder(tree: str) -> str:
    # Archives often hold one top-level folder (`tar czf mydata.tar.gz mydata`); descend
    # into it when it is the only entry. (A lone class folder would carry no label
    # information anyway, so reading it as unlabeled loses nothing.)
    entries = _visible_entries(tree)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
        return _unwrap_single_folder(entries[0].path)
    return tree


def _split_dir(tree: str, split: str, root: str) -> tuple[str, list[str]]:
    """The folder holding `split`, and all split folders (to agree on class names)."""
    train_dir = os.path.join(tree, "train")
    if not os.path.isdir(train_dir):
        if split == "test":
            raise DatasetError(
                f"{root!r} has no train/ and test/ folders, so it is all train split and has "
                "no test split. Add train/ and test/ (or val/) folders, or use split=train."
            )
        return tree, [tree]
    test_dir = next(
        (os.path.join(tree, d) for d in ("test", "val") if os.path.isdir(os.path.join(tree, d))),
        None,
    )
    if split == "train":
        return train_dir, [d for d in (train_dir, test_dir) if d]
    if test_dir is None:
        raise DatasetError(
            f"{root!r} has a train/ folder but no test/ or val/ folder for the test split. "
            "Add one, or use split=train."
        )
    return test_dir, [train_dir, test_dir]


def _class_names(split_dir: str, split_dirs: list[str]) -> list[str]:
    """Sorted class folder names over all splits, so a class missing from one split does
    not shift the labels of the others. Empty when `split_dir` has no class folders."""
    if not any(e.is_dir() for e in _visible_entries(split_dir)):
        return []
    names: set[str] = set()
    for folder in split_dirs:
        names.update(e.name for e in _visible_entries(folder) if e.is_dir())
    return sorted(names)


def _files_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        found.extend(
            os.path.join(dirpath, f) for f in filenames if _is_image(f) and not f.startswith(".")
        )
    return sorted(found)


def _round_robin_files(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """All image paths and labels, interleaved over classes: the i-th file of each class
    (class by class), then the (i+1)-th, so every prefix is class-balanced."""
    if not classes:
        files = [e.path for e in _visible_entries(split_dir) if e.is_file() and _is_image(e.name)]
        return files, [0] * len(files)
    per_class = [
        _files_under(os.path.join(split_dir, c))
        if os.path.isdir(os.path.join(split_dir, c))
        else []
        for c in classes
    ]
    return _interleave(per_class)


def _interleave(per_class: list[list[str]]) -> tuple[list[str], list[int]]:
    """Paths and labels of per-class file lists, the i-th file of each class (in class
    order) before the (i+1)-th of any."""
    paths, labels = [], []
    for rank in range(max((len(files) for files in per_class), default=0)):
        for label, files in enumerate(per_class):
            if rank < len(files):
                paths.append(files[rank])
                labels.append(label)
    return paths, labels


# --- Tiny-ImageNet ------------------------------------------------------------------------

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_LAYOUT = (
    "Tiny-ImageNet's official layout (in data.root or data.root/tiny-imagenet-200): "
    "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
)


def _list_tinyimagenet(root: str, split: str, cache: str, progress: bool = False) -> _Listing:
    """Train split: train/<wnid>/images; test split: val/images, labelled by
    val/val_annotations.txt (test/ has no labels and is not read). Classes are the wnids
    of wnids.txt sorted, which is the order torchvision's ImageFolder gives train/'s
    folders, so labels agree with an ImageFolder reading of the same train/ tree."""
    tree = _tinyimagenet_tree(root, cache, progress)
    classes = _read_wnids(os.path.join(tree, "wnids.txt"))
    if split == "train":
        split_dir = os.path.join(tree, "train")
        per_class = _tiny_train_files(split_dir, classes)
    else:
        split_dir = os.path.join(tree, "val")
        per_class = _tiny_val_files(split_dir, classes)
    paths, labels = _interleave(per_class)
    return _Listing(split_dir, paths, labels, classes)


def _tinyimagenet_tree(root: str, cache: str, progress: bool = False) -> str:
    tree = _unwrap_single_folder(_resolve_tree(root, cache, progress))
    for candidate in (tree, os.path.join(tree, _TINY_FOLDER)):
        if os.path.isfile(os.path.join(candidate, "wnids.txt")):
            return candidate
    hint = ""
    if os.path.isdir(os.path.join(tree, "train")):
        hint = (" For a plain class-folder tree (train/<class>/*.jpg) set "
                "data.dataset=imagefolder.")
    raise DatasetError(f"data.dataset=tinyimagenet expects {_TINY_LAYOUT}; {root!r} has no "
                       f"wnids.txt ({_describe_folder(tree)}).{hint}")


def _read_wnids(path: str) -> list[str]:
    with open(path) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not wnids:
        raise DatasetError(f"{path!r} is empty: it should list the class ids (wnids), one a "
                           "line, as Tiny-ImageNet's wnids.txt does.")
    return wnids


def _tiny_train_files(train_dir: str, classes: list[str]) -> list[list[str]]:
    folders = [os.path.join(train_dir, wnid, "images") for wnid in classes]
    missing = [wnid for wnid, folder in zip(classes, folders, strict=True)
               if not os.path.isdir(folder)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise DatasetError(
            f"data.dataset=tinyimagenet expects {_TINY_LAYOUT}; train/<wnid>/images/ is missing "
            f"for {len(missing)} of the {len(classes)} wnids of wnids.txt: {shown} "
            f"({_describe_folder(train_dir)})."
        )
    return [_files_under(folder) for folder in folders]


def _tiny_val_files(val_dir: str, classes: list[str]) -> list[list[str]]:
    images_dir = os.path.join(val_dir, "images")
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isdir(images_dir) or not os.path.isfile(annotations):
        found = _describe_folder(val_dir) if os.path.isdir(val_dir) else "no val/ folder"
        raise DatasetError(
            f"data.dataset=tinyimagenet expects {_TINY_LAYOUT}; the test split is val/, which "
            f"needs both images/ and val_annotations.txt (found: {found})."
        )
    wnid_of = _read_val_annotations(annotations, set(classes))
    files = sorted(e.name for e in _visible_entries(images_dir) if e.is_file()
                   and _is_image(e.name))
    unannotated = [name for name in files if name not in wnid_of]
    if unannotated:
        raise DatasetError(
            f"{len(unannotated)} images of {images_dir!r} have no line in {annotations!r} "
            f"(e.g. {unannotated[0]!r}): each val image needs one (file name, wnid, 4 box "
            "ints, tab-separated). Restore the official val_annotations.txt."
        )
    per_class: list[list[str]] = [[] for _ in classes]
    label_of = {wnid: label for label, wnid in enumerate(classes)}
    for name in files:
        per_class[label_of[wnid_of[name]]].append(os.path.join(images_dir, name))
    return per_class


def _read_val_annotations(path: str, wnids: set[str]) -> dict[str, str]:
    """File name -> wnid, from lines "val_0.JPEG<TAB>n03444034<TAB>0<TAB>32<TAB>44<TAB>62"."""
    wnid_of = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise DatasetError(
                    f"Line {number} of {path!r} is {line.strip()!r}; expected a file name and "
                    "a wnid separated by a tab (then 4 box ints), as Tiny-ImageNet's "
                    "val_annotations.txt."
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in wnids:
                raise DatasetError(f"Line {number} of {path!r} labels {name!r} with {wnid!r}, "
                                   "which wnids.txt does not list.")
            wnid_of[name] = wnid
    return wnid_of


def _describe_folder(folder: str, limit: int = 8) -> str:
    """What a folder holds, for error messages: "it holds a/, b.txt, ... (12 entries)"."""
    if not os.path.isdir(folder):
        return f"{folder!r} does not exist"
    entries = _visible_entries(folder)
    if not entries:
        return f"{folder!r} is empty"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return f"{folder!r} holds {', '.join(names)}{more}"


def _open_rgb(path: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        # OSError covers unidentifiable and truncated files; the others, broken headers.
        raise DatasetError(
            f"Could not read image {path!r} ({exc}). Remove or replace the file."
        ) from exc


def _decode_all(paths: list[str], size: tuple[int, int], progress: bool = False
                ) -> tuple[torch.Tensor, list[int]] | None:
    """Decode the readable images (all of one common `size`) into uint8 [M, 3, H, W], in
    order, and the indices of the unreadable ones, left out; None if sizes differ.

    Serial on purpose: for CIFAR-sized JPEGs the work is Python overhead under the GIL,
    and a thread pool measured slower (10 s against 6.6 s for 50k images on 2 cores).
    """
    width, height = size
    images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    unreadable = []  # every bad file at once, not one per run
    with image_progress(f"decoding {len(paths):,} images", len(paths),
                        enabled=progress) as advance:
        for index, path in enumerate(paths):
            advance(1)  # a few microseconds against a decode's ~130
            try:
                image = _open_rgb(path)
            except DatasetError:
                unreadable.append(index)
                continue
            if image.size != size:
                return None
            images[index - len(unreadable)] = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(images[:len(paths) - len(unreadable)]), unreadable


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _listing_key(split_dir: str, paths: list[str], labels: list[int]) -> str:
    """A key that changes whenever a file of the split is added, removed, reordered,
    relabelled or modified (size or mtime)."""
    hasher = hashlib.sha256(f"{_DECODED_CACHE_VERSION}\n{os.path.abspath(split_dir)}\n".encode())
    for path, label in zip(paths, labels, strict=True):
        stat = os.stat(path)
        rel = os.path.relpath(path, split_dir)
        hasher.update(f"{rel}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]


def _write_decoded_cache(
    entry: str, cache: str, images: torch.Tensor, unreadable: list[int], labels: list[int],
    classes: list[str],
) -> None:
    """images.npy: the readable images; labels.npy: their labels; meta.json: the indices
    of the unreadable files, so a cached set reports them again on every run."""
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-decoded-", dir=cache)
    skipped = set(unreadable)
    readable_labels = [label for i, label in enumerate(labels) if i not in skipped]
    try:
        np.save(os.path.join(staging, "images.npy"), images.numpy())
        np.save(os.path.join(staging, "labels.npy"), np.asarray(readable_labels, dtype=np.int64))
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump({"classes": classes, "count": len(images), "unreadable": unreadable}, f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, entry)


def _read_decoded_cache(entry: str, num_kept: int, paths: list[str], labels: list[int]
                        ) -> tuple[torch.Tensor, list[int]]:
    """What `_decode_all` gives for the first `num_kept` files, from the cache."""
    # allow_pickle=False (numpy's default, said here): the cache holds plain arrays only.
    images = np.load(os.path.join(entry, "images.npy"), mmap_mode="r", allow_pickle=False)
    cached_labels = np.load(os.path.join(entry, "labels.npy"), allow_pickle=False)
    with open(os.path.join(entry, "meta.json")) as f:
        unreadable = json.load(f).get("unreadable", [])
    skipped = set(unreadable)
    readable_labels = [label for i, label in enumerate(labels) if i not in skipped]
    if len(images) != len(readable_labels) or not np.array_equal(cached_labels, readable_labels):
        raise DatasetError(
            f"The decoded-image cache {entry!r} does not match the dataset. Delete that folder."
        )
    bad = [index for index in unreadable if index < num_kept]
    return torch.from_numpy(np.array(images[:num_kept - len(bad)])), bad
