"""Class-folder datasets: ImageFolder trees or tarballs (ImageNet and any class-folder tree)
and Tiny-ImageNet's official layout, listed in round-robin class order; small images are
decoded once into memory and kept in a decoded-image cache keyed by the listing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from mixmask.data.files import (
    IMAGE_EXTENSIONS,
    describe_folder,
    files_under,
    is_image,
    publish,
    resolve_tree,
    unwrap_single_folder,
    visible_entries,
)
from mixmask.data.image_set import (
    ImageSet,
    UnreadableImageWarning,
    bad_files_message,
    open_rgb,
    too_many_bad,
)
from mixmask.data.progress import image_progress
from mixmask.errors import DatasetError

# Bump when the layout of the decoded-image cache changes, so old entries are ignored.
# v2: images.npy holds the readable images only; meta.json lists the unreadable ones.
_DECODED_CACHE_VERSION = "v2"


@dataclass
class _Listing:
    """The files of one split of a folder dataset, in round-robin class order."""

    split_dir: str
    paths: list[str]
    labels: list[int]
    classes: list[str]


def list_imagefolder(root: str, split: str, cache: str, progress: bool = False) -> _Listing:
    tree = unwrap_single_folder(resolve_tree(root, cache, progress))
    split_dir, sibling_splits = _split_dir(tree, split, root)
    classes = _class_names(split_dir, sibling_splits)
    paths, labels = _round_robin_files(split_dir, classes)
    return _Listing(split_dir, paths, labels, classes)


def file_image_set(
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
            if too_many_bad(len(bad), num_kept, max_bad_fraction):
                raise DatasetError(bad_files_message(bad_paths, num_kept, max_bad_fraction))
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
            return unreadable, open_rgb(path).size
        except DatasetError:
            unreadable.append(index)
            if too_many_bad(len(unreadable), len(paths), max_bad_fraction):
                bad = [paths[i] for i in unreadable]
                raise DatasetError(bad_files_message(bad, len(paths), max_bad_fraction)
                                   ) from None
    raise DatasetError(bad_files_message(paths, len(paths), max_bad_fraction))


def _warn_skipped(bad_paths: list[str], total: int, split_dir: str) -> None:
    shown = ", ".join(repr(path) for path in bad_paths[:10])
    more = f" and {len(bad_paths) - 10} more" if len(bad_paths) > 10 else ""
    warnings.warn(f"Skipped {len(bad_paths)} unreadable image files of the {total} under "
                  f"{split_dir!r}: {shown}{more}. They are counted in summary.json "
                  "(bad_images).", UnreadableImageWarning, stacklevel=4)  # load_image_set's caller


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
    if not any(e.is_dir() for e in visible_entries(split_dir)):
        return []
    names: set[str] = set()
    for folder in split_dirs:
        names.update(e.name for e in visible_entries(folder) if e.is_dir())
    return sorted(names)


def _round_robin_files(split_dir: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """All image paths and labels, interleaved over classes: the i-th file of each class
    (class by class), then the (i+1)-th, so every prefix is class-balanced."""
    if not classes:
        files = [e.path for e in visible_entries(split_dir) if e.is_file() and is_image(e.name)]
        return files, [0] * len(files)
    per_class = [
        files_under(os.path.join(split_dir, c))
        if os.path.isdir(os.path.join(split_dir, c))
        else []
        for c in classes
    ]
    return interleave_classes(per_class)


def interleave_classes(per_class: list[list[str]]) -> tuple[list[str], list[int]]:
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


def list_tinyimagenet(root: str, split: str, cache: str, progress: bool = False) -> _Listing:
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
    paths, labels = interleave_classes(per_class)
    return _Listing(split_dir, paths, labels, classes)


def _tinyimagenet_tree(root: str, cache: str, progress: bool = False) -> str:
    tree = unwrap_single_folder(resolve_tree(root, cache, progress))
    for candidate in (tree, os.path.join(tree, _TINY_FOLDER)):
        if os.path.isfile(os.path.join(candidate, "wnids.txt")):
            return candidate
    hint = ""
    if os.path.isdir(os.path.join(tree, "train")):
        hint = (" For a plain class-folder tree (train/<class>/*.jpg) set "
                "data.dataset=imagefolder.")
    raise DatasetError(f"data.dataset=tinyimagenet expects {_TINY_LAYOUT}; {root!r} has no "
                       f"wnids.txt ({describe_folder(tree)}).{hint}")


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
            f"({describe_folder(train_dir)})."
        )
    return [files_under(folder) for folder in folders]


def _tiny_val_files(val_dir: str, classes: list[str]) -> list[list[str]]:
    images_dir = os.path.join(val_dir, "images")
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isdir(images_dir) or not os.path.isfile(annotations):
        found = describe_folder(val_dir) if os.path.isdir(val_dir) else "no val/ folder"
        raise DatasetError(
            f"data.dataset=tinyimagenet expects {_TINY_LAYOUT}; the test split is val/, which "
            f"needs both images/ and val_annotations.txt (found: {found})."
        )
    wnid_of = _read_val_annotations(annotations, set(classes))
    files = sorted(e.name for e in visible_entries(images_dir) if e.is_file()
                   and is_image(e.name))
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
                image = open_rgb(path)
            except DatasetError:
                unreadable.append(index)
                continue
            if image.size != size:
                return None
            images[index - len(unreadable)] = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(images[:len(paths) - len(unreadable)]), unreadable


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
    publish(staging, entry)


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
