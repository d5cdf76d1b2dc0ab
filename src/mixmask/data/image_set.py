"""An image set in memory or on disk (:class:`ImageSet`), and how it treats files that
cannot be read: dropped when decoded into memory, replaced by the next readable file when
read from disk, each named in a warning, and more than ``max_bad_fraction`` of a split
unreadable is a :class:`~mixmask.errors.DatasetError`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import PIL.Image
import torch

from mixmask.data.batch import UNLABELED
from mixmask.errors import DatasetError


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
        return open_rgb(self.paths[index])

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
                return open_rgb(self.paths[candidate]), self.label(candidate)
            except DatasetError as error:
                self._record_failure(candidate, error)
        raise DatasetError(f"None of the {len(self)} image files of the split can be read "
                           f"(e.g. {self.paths[0]!r}). Check data.root.")

    def _record_failure(self, index: int, error: DatasetError) -> None:
        self.read_failures[index] = 1
        failed = self.skipped_files()
        total = len(self) + len(self.bad_files)
        if too_many_bad(len(failed), total, self.max_bad_fraction):
            message = bad_files_message(failed, total, self.max_bad_fraction)
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


def too_many_bad(num_bad: int, total: int, max_fraction: float) -> bool:
    return num_bad > max_fraction * total


def bad_files_message(bad: list[str], total: int, max_fraction: float) -> str:
    """'N images could not be read (...): first ten paths and M more. What to do.'"""
    shown = ", ".join(repr(path) for path in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{len(bad)} images could not be read ({len(bad)} of {total} files of the split, "
            f"more than data.max_bad_fraction={max_fraction} allows): {shown}{more}. Remove "
            "or replace them, or raise data.max_bad_fraction to skip them.")


def open_rgb(path: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        # OSError covers unidentifiable and truncated files; the others, broken headers.
        raise DatasetError(
            f"Could not read image {path!r} ({exc}). Remove or replace the file."
        ) from exc
