"""STL-10 (torchvision's binary files): pretraining reads the 100k unlabelled images and the
5k labelled training images, interleaved so that any prefix holds both in proportion."""

from __future__ import annotations

import os

import numpy as np
import torch

from mixmask.data.batch import UNLABELED
from mixmask.data.files import describe_folder
from mixmask.errors import DatasetError

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


def load_stl10(
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
            f"({describe_folder(folder if os.path.isdir(folder) else root)}). Set "
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
