"""Image datasets as plain containers: CIFAR through torchvision, ImageFolder trees or
tarballs, and a synthetic set for smoke tests.

`load_image_set` returns an `ImageSet`: small images (CIFAR-sized) live in memory as one
uint8 tensor, large ones stay on disk as a list of paths. Augmentation is not done here;
see `mixmask.data.transforms` and `mixmask.data.loaders`.

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
import zlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from mixmask.errors import DatasetError

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "synthetic")
SPLITS = ("train", "test")
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
}

# Bump when the layout of the decoded-image cache changes, so old entries are ignored.
_DECODED_CACHE_VERSION = "v1"


@dataclass
class ImageSet:
    """Images of one split, either decoded in memory or as files on disk.

    Exactly one of `images` (uint8 [N, 3, H, W]) and `paths` is set. `labels` is int64
    [N], or None for an unlabeled dataset (then `classes` is empty).
    """

    images: torch.Tensor | None
    paths: list[str] | None
    labels: torch.Tensor | None
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageSet needs exactly one of images and paths.")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError("ImageSet.images must be a uint8 tensor [N, 3, H, W].")
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError("ImageSet.labels must have one entry per image.")

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_pil(self, index: int) -> PIL.Image.Image:
        """The `index`-th image as an RGB PIL image."""
        if self.images is not None:
            return PIL.Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return _open_rgb(self.paths[index])


def load_image_set(
    name: str,
    root: str,
    split: str,
    *,
    download: bool = False,
    subset: int = 0,
    in_memory_max_side: int = 96,
    cache_dir: str | None = None,
) -> ImageSet:
    """Load one split of a dataset.

    name: "cifar10" | "cifar100" (torchvision copies under `root`), "imagefolder" (a
      folder tree or a .tar/.tar.gz/.tgz of one) or "synthetic" (smoke tests; `root`
      is ignored).
    split: "train" | "test".
    subset: keep only the first `subset` images (0 = all; more than there are = all).
      ImageFolder images are ordered round-robin over classes (the first image of each
      class in class order, then the second of each, ...; files sorted within a class),
      so the first N images are class-balanced.
    in_memory_max_side: ImageFolder images are decoded into one in-memory uint8 tensor
      when the first image's longer side is at most this (and all images share its
      size); otherwise they stay on disk as paths.
    cache_dir: where archives are unpacked and decoded tensors are cached; defaults to
      $MIXMASK_CACHE, else ~/.cache/mixmask.

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
    mean, std = DATASET_STATS[name]
    if name in ("cifar10", "cifar100"):
        images, labels, classes = _load_cifar(name, root, split, download)
        if subset:
            images, labels = images[:subset], labels[:subset]
        return ImageSet(images, None, labels, classes, mean, std)
    if name == "synthetic":
        images, labels, classes = _synthetic(split, subset)
        return ImageSet(images, None, labels, classes, mean, std)
    return _load_imagefolder(root, split, subset, in_memory_max_side, cache_dir, mean, std)


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


def _load_imagefolder(
    root: str,
    split: str,
    subset: int,
    in_memory_max_side: int,
    cache_dir: str | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> ImageSet:
    cache = _cache_root(cache_dir)
    tree = _unwrap_single_folder(_resolve_tree(root, cache))
    split_dir, sibling_splits = _split_dir(tree, split, root)
    classes = _class_names(split_dir, sibling_splits)
    paths, labels = _round_robin_files(split_dir, classes)
    if not paths:
        raise DatasetError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir!r}. Check data.root."
        )
    num_kept = min(subset, len(paths)) if subset else len(paths)
    label_tensor = torch.as_tensor(labels[:num_kept], dtype=torch.int64) if classes else None

    def on_disk() -> ImageSet:
        return ImageSet(None, paths[:num_kept], label_tensor, classes, mean, std)

    first_size = _open_rgb(paths[0]).size
    if max(first_size) > in_memory_max_side:
        return on_disk()

    cache_entry = os.path.join(cache, f"decoded-{_listing_key(split_dir, paths, labels)}")
    if os.path.isdir(cache_entry):
        images = _read_decoded_cache(cache_entry, num_kept, labels)
        return ImageSet(images, None, label_tensor, classes, mean, std)

    images = _decode_all(paths[:num_kept], first_size)
    if images is None:  # images of different sizes: cannot stack them
        return on_disk()
    if num_kept == len(paths):
        _write_decoded_cache(cache_entry, cache, images, labels, classes)
    return ImageSet(images, None, label_tensor, classes, mean, std)


def _cache_root(cache_dir: str | None) -> str:
    path = cache_dir or os.environ.get("MIXMASK_CACHE") or os.path.join("~", ".cache", "mixmask")
    return os.path.abspath(os.path.expanduser(path))


def _resolve_tree(root: str, cache: str) -> str:
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
    return _unpack_once(root, cache)


def _unpack_once(archive: str, cache: str) -> str:
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
        _extract_archive(archive, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, final)
    return final


def _extract_archive(archive: str, destination: str) -> None:
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                # Refuses absolute paths, links out of the tree and device files.
                tar.extractall(destination, filter="data")
            else:  # Python < 3.10.12 / 3.11.4
                tar.extractall(destination)
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
    paths, labels = [], []
    for rank in range(max(len(files) for files in per_class)):
        for label, files in enumerate(per_class):
            if rank < len(files):
                paths.append(files[rank])
                labels.append(label)
    return paths, labels


def _open_rgb(path: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"Could not read image {path!r} ({exc}). Remove or replace the file."
        ) from exc


def _decode_all(paths: list[str], size: tuple[int, int]) -> torch.Tensor | None:
    """Decode images of one common `size` into uint8 [N, 3, H, W]; None if sizes differ.

    Serial on purpose: for CIFAR-sized JPEGs the work is Python overhead under the GIL,
    and a thread pool measured slower (10 s against 6.6 s for 50k images on 2 cores).
    """
    width, height = size
    images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    unreadable = []  # every bad file in one message, not one per run
    for index, path in enumerate(paths):
        try:
            image = _open_rgb(path)
        except DatasetError:
            unreadable.append(path)
            continue
        if image.size != size:
            return None
        images[index] = np.asarray(image).transpose(2, 0, 1)
    if unreadable:
        shown = ", ".join(repr(path) for path in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise DatasetError(f"{len(unreadable)} images could not be read: {shown}{more}. "
                           "Remove or replace them.")
    return torch.from_numpy(images)


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
    entry: str, cache: str, images: torch.Tensor, labels: list[int], classes: list[str]
) -> None:
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-decoded-", dir=cache)
    try:
        np.save(os.path.join(staging, "images.npy"), images.numpy())
        np.save(os.path.join(staging, "labels.npy"), np.asarray(labels, dtype=np.int64))
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump({"classes": classes, "count": len(images)}, f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, entry)


def _read_decoded_cache(entry: str, num_kept: int, labels: list[int]) -> torch.Tensor:
    images = np.load(os.path.join(entry, "images.npy"), mmap_mode="r")
    cached_labels = np.load(os.path.join(entry, "labels.npy"))
    if len(images) != len(labels) or not np.array_equal(cached_labels, labels):
        raise DatasetError(
            f"The decoded-image cache {entry!r} does not match the dataset. Delete that folder."
        )
    return torch.from_numpy(np.array(images[:num_kept]))
