"""Robustness test sets on disk, for evaluating a classifier trained on the run's clean
train split: corrupted copies of the test set, and test sets whose classes are a subset of
the train split's (class shift).

Layouts (each the official one):

- ``cifar_c``: CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019, zenodo):
  ``labels.npy`` (int, [N]) and one ``<corruption>.npy`` per corruption, uint8
  [N, 32, 32, 3], whose rows ``(s-1)*N/5 : s*N/5`` are severity ``s`` = 1..5 of the test
  images in order (N = 50,000: 10,000 per severity). Any ``.npy`` beside ``labels.npy`` is a
  corruption (the 15 standard ones and the 4 extra ones).
- ``imagenet_c``: ImageNet-C / Tiny-ImageNet-C: ``<corruption>/<severity 1..5>/<class>/<image>``,
  each severity folder an ImageFolder.
- ``class_shift``: ImageNet-A, ImageNet-R, ImageNet-Sketch (``sketch/<class>/...``),
  ImageNet-V2: ``<class>/<image>``.

Class folders are matched **by name** to the train split's classes (for ImageNet: the
wnids, sorted, as the train ImageFolder orders them), so labels are indices into the train
split's classes. ImageNet-V2's folders are numbered ``0..999`` instead: when no folder name
is a train class and every one is a number below the class count, the number is the index.
A class-shift set covers only some classes (200 for A and R); :func:`restrict_scores` keeps
the classifier's choice among them, as Hendrycks et al.'s evaluation of A and R does
(``logits[:, indices_in_1k]``), while labels stay in the train split's index space.

ROOT may be the set's folder or a folder holding only it (``imagenet-sketch/sketch``,
an unpacked ``CIFAR-10-C/``). Archives are not unpacked: point at the unpacked folder.
As the train readers do (:func:`mixmask.data.files.files_under`), symbolic links inside
ROOT are followed, so a tree assembled from links reads the same as a copied one. The
``.npy`` files are read with ``allow_pickle=False``: a file holding pickled objects is
refused, never executed.

    >>> detect_layout("data/CIFAR-10-C")
    'cifar_c'
    >>> images, labels = read_cifar_c("data/CIFAR-10-C", "fog", severity=3)
    >>> test, present = class_shift_set("data/imagenet-r", train.classes, train.mean, train.std)
    >>> predictions = restrict_scores(logits, present).argmax(dim=1)
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mixmask.data.files import (
    IMAGE_EXTENSIONS,
    describe_folder,
    files_under,
    is_image,
    visible_entries,
)
from mixmask.data.image_folders import interleave_classes
from mixmask.data.image_set import ImageSet
from mixmask.errors import DatasetError, did_you_mean

LAYOUTS = ("cifar_c", "imagenet_c", "class_shift")
SEVERITIES = (1, 2, 3, 4, 5)
_SEVERITY_NAMES = {str(severity) for severity in SEVERITIES}

_LABELS_FILE = "labels.npy"
_EXPECTED = {
    "cifar_c": "CIFAR-10-C / CIFAR-100-C: labels.npy and one <corruption>.npy per corruption",
    "imagenet_c": "ImageNet-C / Tiny-ImageNet-C: <corruption>/<severity 1..5>/<class>/<image>",
    "class_shift": ("ImageNet-A / -R / -Sketch / -V2: <class>/<image>, the class folders "
                    "named as the train split's classes"),
}


class RobustnessDataError(DatasetError):
    """A robustness test set that is missing or laid out in a way we cannot read."""


def detect_layout(root: str) -> str:
    """Which layout ``root`` holds: "cifar_c", "imagenet_c" or "class_shift".

    Only the top of the tree is looked at; the readers check the rest."""
    return _locate(root)[1]


# --- CIFAR-10-C / CIFAR-100-C -----------------------------------------------------------


def cifar_c_corruptions(root: str) -> list[str]:
    """The corruption names (file stems) of a CIFAR-C folder, sorted. Every file's shape,
    dtype and row count is checked here (headers only), so a bad file stops the command
    before the first evaluation rather than after the tenth."""
    folder = _folder_of(root, "cifar_c")
    num_rows = len(_cifar_labels(folder))
    names = _cifar_names(folder)
    for name in names:
        _cifar_images(folder, name, num_rows)
    return names


def read_cifar_c(root: str, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N/5, H, W, 3] (CIFAR: [10000, 32, 32, 3]) and labels int64 [N/5] of one
    corruption at one severity (1..5): rows ``(severity-1)*N/5 : severity*N/5`` of
    ``<corruption>.npy`` and ``labels.npy``."""
    _check_severity(severity)
    folder = _folder_of(root, "cifar_c")
    labels = _cifar_labels(folder)
    names = _cifar_names(folder)
    if corruption not in names:
        raise RobustnessDataError(
            f"{folder!r} has no {corruption}.npy: its corruptions are {', '.join(names)}."
            f"{did_you_mean(corruption, names)}")
    images = _cifar_images(folder, corruption, len(labels))
    per_severity = len(labels) // len(SEVERITIES)
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    return np.array(images[rows]), labels[rows].astype(np.int64)


def cifar_c_set(root: str, corruption: str, severity: int, train_classes: list[str],
                mean: tuple[float, float, float], std: tuple[float, float, float]) -> ImageSet:
    """:func:`read_cifar_c` as an in-memory ImageSet (uint8 [N, 3, H, W]) over the train
    split's classes, normalised with the train split's ``mean`` and ``std``."""
    images, labels = read_cifar_c(root, corruption, severity)
    _check_train_classes(train_classes)
    if len(labels) and labels.max() >= len(train_classes):
        raise RobustnessDataError(
            f"labels.npy of {os.fspath(root)!r} holds label {labels.max()}, but the run's "
            f"train split has {len(train_classes)} classes: use the C set of the dataset the "
            "run trained on (CIFAR-10-C for CIFAR-10, CIFAR-100-C for CIFAR-100).")
    return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), None,
                    torch.from_numpy(labels), list(train_classes), mean, std)


def _cifar_names(folder: str) -> list[str]:
    names = sorted(e.name[:-len(".npy")] for e in visible_entries(folder)
                   if e.is_file() and e.name.endswith(".npy") and e.name != _LABELS_FILE)
    if not names:
        raise RobustnessDataError(
            f"{folder!r} has no <corruption>.npy files ({describe_folder(folder)}); expected "
            f"{_EXPECTED['cifar_c']}.")
    return names


def _cifar_labels(folder: str) -> np.ndarray:
    path = os.path.join(folder, _LABELS_FILE)
    if not os.path.isfile(path):
        raise RobustnessDataError(
            f"{folder!r} has no labels.npy ({describe_folder(folder)}); expected "
            f"{_EXPECTED['cifar_c']}. Restore labels.npy from the CIFAR-C download.")
    labels = _load_npy(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise RobustnessDataError(
            f"{path!r} is {labels.dtype} {list(labels.shape)}; expected one integer label per "
            "row of the corruption files (CIFAR-C: 50000 labels).")
    if len(labels) == 0 or len(labels) % len(SEVERITIES):
        raise RobustnessDataError(
            f"{path!r} has {len(labels)} labels; expected a positive multiple of 5, the same "
            "test images at each of the 5 severities (CIFAR-C: 50000).")
    labels = np.array(labels)  # 50,000 small ints: read once, not through the map
    if labels.min() < 0:
        raise RobustnessDataError(f"{path!r} holds the negative label {labels.min()}; class "
                                  "labels run from 0.")
    return labels


def _cifar_images(folder: str, corruption: str, num_rows: int) -> np.ndarray:
    path = os.path.join(folder, f"{corruption}.npy")
    images = _load_npy(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise RobustnessDataError(
            f"{path!r} is {images.dtype} {list(images.shape)}; expected uint8 "
            "[rows, height, width, 3] (CIFAR-C: [50000, 32, 32, 3]).")
    if len(images) != num_rows:
        raise RobustnessDataError(
            f"{path!r} has {len(images)} rows but labels.npy has {num_rows} labels; each "
            "corruption file holds one image per label. Re-download the file.")
    return images


def _load_npy(path: str) -> np.ndarray:
    """The array of a .npy file, memory-mapped; never unpickles (a pickle in a data file
    could run any code)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RobustnessDataError(
            f"{path!r} is not a plain numpy array file ({str(exc).rstrip('.')}). CIFAR-C "
            "files are arrays written by numpy.save; files holding pickled Python objects are "
            "refused, never loaded. Re-download it.") from None
    if not isinstance(array, np.ndarray):  # a .npz archive under a .npy name
        array.close()
        raise RobustnessDataError(f"{path!r} is a .npz archive, not a .npy array file. "
                                  "Re-download it.")
    return array


def _check_severity(severity: int) -> None:
    if severity not in SEVERITIES:
        raise RobustnessDataError(f"Severity {severity!r} is not one of 1..5, the severities "
                                  "of CIFAR-C and ImageNet-C.")


# --- ImageNet-C / Tiny-ImageNet-C -------------------------------------------------------


def imagenet_c_corruptions(root: str) -> list[str]:
    """The corruption folder names of an ImageNet-C tree, sorted; every one must hold the
    severity folders 1..5."""
    folder = _folder_of(root, "imagenet_c")
    names = [e.name for e in visible_entries(folder) if e.is_dir()]
    for name in names:
        for severity in SEVERITIES:
            _severity_folder(folder, name, severity)
    return names


def imagenet_c_set(root: str, corruption: str, severity: int, train_classes: list[str],
                   mean: tuple[float, float, float], std: tuple[float, float, float],
                   max_bad_fraction: float = 0.01) -> ImageSet:
    """One corruption at one severity as an ImageSet of paths, labels indexing
    ``train_classes``, normalised with the train split's ``mean`` and ``std``. Lists one
    folder only: for the full ImageNet-C (95 folders, 3.75 M files) prefer this, one set at
    a time, over holding every path at once (:func:`imagenet_c_sets`)."""
    _check_severity(severity)
    folder = _folder_of(root, "imagenet_c")
    if not os.path.isdir(os.path.join(folder, corruption)):
        names = [e.name for e in visible_entries(folder) if e.is_dir()]
        raise RobustnessDataError(
            f"{folder!r} has no corruption folder {corruption!r}: its corruptions are "
            f"{', '.join(names)}.{did_you_mean(corruption, names)}")
    severity_folder = _severity_folder(folder, corruption, severity)
    return _image_folder_set(severity_folder, train_classes, mean, std, max_bad_fraction)[0]


def imagenet_c_sets(root: str, train_classes: list[str], mean: tuple[float, float, float],
                    std: tuple[float, float, float], max_bad_fraction: float = 0.01
                    ) -> dict[str, dict[int, ImageSet]]:
    """Every corruption and severity of an ImageNet-C tree: corruption -> severity (1..5)
    -> ImageSet (see :func:`imagenet_c_set`). The whole tree is checked before any set is
    returned."""
    return {corruption: {severity: imagenet_c_set(root, corruption, severity, train_classes,
                                                  mean, std, max_bad_fraction)
                         for severity in SEVERITIES}
            for corruption in imagenet_c_corruptions(root)}


def _severity_folder(folder: str, corruption: str, severity: int) -> str:
    path = os.path.join(folder, corruption, str(severity))
    if not os.path.isdir(path):
        raise RobustnessDataError(
            f"{os.path.join(folder, corruption)!r} has no severity folder {severity} "
            f"({describe_folder(os.path.join(folder, corruption))}); expected "
            f"{_EXPECTED['imagenet_c']}, every corruption with the severities 1..5.")
    return path


# --- class shift: ImageNet-A / -R / -Sketch / -V2 ---------------------------------------


def class_shift_set(root: str, train_classes: list[str], mean: tuple[float, float, float],
                    std: tuple[float, float, float], max_bad_fraction: float = 0.01
                    ) -> tuple[ImageSet, list[int]]:
    """A class-shift test set as an ImageSet of paths (labels index ``train_classes``,
    normalised with the train split's ``mean`` and ``std``) and the sorted indices of the
    train classes it holds, for :func:`restrict_scores`."""
    folder = _folder_of(root, "class_shift")
    return _image_folder_set(folder, train_classes, mean, std, max_bad_fraction)


def restrict_scores(scores: torch.Tensor, class_indices: list[int]) -> torch.Tensor:
    """``scores`` [N, C] with every class not in ``class_indices`` set to -inf, so that
    argmax and top-k choose among those classes only. Labels keep the full 0..C-1 indices;
    this equals Hendrycks et al.'s ``logits[:, indices_in_1k]`` evaluation of ImageNet-A/R
    with the argmax mapped back to the full index.

        >>> restrict_scores(torch.tensor([[5.0, 1.0, 2.0]]), [1, 2]).argmax(dim=1)
        tensor([2])
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {list(scores.shape)}.")
    if not class_indices:
        raise ValueError("class_indices is empty: no class would remain.")
    keep = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    index = torch.as_tensor(class_indices, dtype=torch.int64, device=scores.device)
    if index.min() < 0 or index.max() >= scores.shape[1]:
        raise ValueError(f"class_indices must lie in 0..{scores.shape[1] - 1}; got "
                         f"{int(index.min())}..{int(index.max())}.")
    keep[index] = True
    return scores.masked_fill(~keep, float("-inf"))


def _image_folder_set(folder: str, train_classes: list[str], mean: tuple[float, float, float],
                      std: tuple[float, float, float], max_bad_fraction: float
                      ) -> tuple[ImageSet, list[int]]:
    """An ImageFolder (``<class>/<image>``) as an ImageSet over ``train_classes``, listed
    in round-robin class order as the train readers list theirs (every prefix balanced),
    and the sorted train-class indices present."""
    _check_train_classes(train_classes)
    class_folders = [e for e in visible_entries(folder) if e.is_dir()]
    if not class_folders:
        raise RobustnessDataError(
            f"{folder!r} has no class folders ({describe_folder(folder)}); expected "
            "<class>/<image>, one folder per class named as the train split's classes.")
    indices = _train_indices(folder, [e.name for e in class_folders], train_classes)
    per_class = [files_under(e.path) for e in class_folders]
    empty = [e.name for e, files in zip(class_folders, per_class, strict=True) if not files]
    if empty:
        raise RobustnessDataError(
            f"{len(empty)} class folders of {folder!r} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {_first_five(empty)}. Restore their images or "
            "remove the folders.")
    paths, local_labels = interleave_classes(per_class)
    labels = torch.as_tensor([indices[label] for label in local_labels], dtype=torch.int64)
    image_set = ImageSet(None, paths, labels, list(train_classes), mean, std,
                         max_bad_fraction=max_bad_fraction)
    return image_set, sorted(indices)


def _train_indices(folder: str, names: list[str], train_classes: list[str]) -> list[int]:
    """The train-class index of each class folder name."""
    index_of = {name: index for index, name in enumerate(train_classes)}
    unknown = [name for name in names if name not in index_of]
    if not unknown:
        return [index_of[name] for name in names]
    # ImageNet-V2 numbers its folders 0..999, the index of the wnid in sorted order (the
    # train ImageFolder's order); taken as indices only when no folder is named as a class.
    if len(unknown) == len(names) and all(_is_index(name, len(train_classes)) for name in names):
        return [int(name) for name in names]
    raise RobustnessDataError(
        f"{len(unknown)} of the {len(names)} class folders of {folder!r} are not classes of "
        f"the run's train split: {_first_five(unknown)}. Class folders are matched by name "
        f"to the train split's {len(train_classes)} classes ({_first_five(train_classes)}): "
        "use a set of the dataset the run trained on (ImageNet wnids for an ImageNet run).")


def _is_index(name: str, num_classes: int) -> bool:
    return name.isdigit() and str(int(name)) == name and int(name) < num_classes


def _check_train_classes(train_classes: list[str]) -> None:
    if not train_classes:
        raise RobustnessDataError(
            "The run's train split has no classes (it is unlabeled), so no classifier can be "
            "evaluated on a robustness set: train on a labelled split.")


def _first_five(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


# --- finding the layout -----------------------------------------------------------------


def _folder_of(root: str, layout: str) -> str:
    """The folder of ``root`` holding a set of ``layout``; RobustnessDataError if it holds
    another layout."""
    folder, found = _locate(root)
    if found != layout:
        raise RobustnessDataError(
            f"{os.fspath(root)!r} is laid out as {found} ({_EXPECTED[found]}), not as "
            f"{layout}: expected {_EXPECTED[layout]}.")
    return folder


def _locate(root: str) -> tuple[str, str]:
    """The folder holding the set (``root``, or the folder it alone holds) and its layout."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise RobustnessDataError(f"{root!r} does not exist. Point it at the robustness "
                                  "set's folder.")
    if not os.path.isdir(root):
        raise RobustnessDataError(f"{root!r} is a file, not a folder. Unpack it and point at "
                                  "the unpacked folder.")
    folder, seen = root, set()
    while os.path.realpath(folder) not in seen:
        seen.add(os.path.realpath(folder))
        layout = _layout_of(folder)
        if layout is not None:
            return folder, layout
        lone = _lone_subfolder(folder)
        if lone is None:
            break
        folder = lone
    expected = "; ".join(f"({name}) {text}" for name, text in _EXPECTED.items())
    raise RobustnessDataError(
        f"{root!r} is not a robustness set we can read ({describe_folder(folder)}); expected "
        f"one of: {expected}.")


def _layout_of(folder: str) -> str | None:
    entries = visible_entries(folder)
    if any(e.is_file() and e.name.endswith(".npy") for e in entries):
        return "cifar_c"
    subfolders = [e for e in entries if e.is_dir()]
    if not subfolders:
        return None
    if any(_is_corruption_folder(e.path) for e in subfolders):
        return "imagenet_c"
    if _lone_subfolder(folder) is not None:
        return None  # a wrapper such as imagenet-sketch/ around sketch/: look inside
    return "class_shift"


def _is_corruption_folder(folder: str) -> bool:
    """Holds a severity folder (1..5) of class folders. (ImageNet-V2's folders are named
    0..999 too, but hold images.)"""
    for entry in visible_entries(folder):
        if entry.is_dir() and entry.name in _SEVERITY_NAMES:
            if any(child.is_dir() for child in visible_entries(entry.path)):
                return True
    return False


def _lone_subfolder(folder: str) -> str | None:
    """The only entry of ``folder`` when it is a folder holding no images itself (a wrapper
    folder, not a lone class folder)."""
    entries = visible_entries(folder)
    if len(entries) != 1 or not entries[0].is_dir():
        return None
    if any(e.is_file() and is_image(e.name) for e in visible_entries(entries[0].path)):
        return None
    return entries[0].path
