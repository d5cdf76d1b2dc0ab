"""Labelled data for the protocols that train a classifier (linear ``moco``, finetune):
the training augmentation, class-balanced label subsets, SimCLR split files, and
deterministic, resumable epochs.

Every item's random draws are a pure function of (seed, epoch, index)
(:func:`mixmask.data.loaders.item_seed`), and the batch order one of (seed, epoch), so a
run resumed at any step sees the batches the uninterrupted run would have seen, whatever
the number of DataLoader workers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy
import PIL.Image
import torch
import torchvision.transforms as T
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import ignore_stop_signals, item_seed
from mixmask.errors import MixmaskError

LABEL_FRACTIONS = {"1%": 0.01, "10%": 0.10, "100%": 1.0}
"""``mixmask finetune --labels`` values and the share of the train split each keeps."""


class LabelSplitError(MixmaskError):
    """A label subset cannot be drawn or a split file does not match the dataset."""


def classifier_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                               *, randaugment: str = "", random_erasing: float = 0.0
                               ) -> Callable[[PIL.Image.Image], Tensor]:
    """The training augmentation of a classifier on a frozen or finetuned backbone.

    At 32 px (CIFAR) the standard pad-4 random crop and flip (the CIFAR protocol of the
    MoCo / Un-Mix CIFAR scripts and solo-learn's linear eval); larger images take MoCo's
    ``main_lincls.py`` and Barlow Twins' ``evaluate.py`` augmentation: RandomResizedCrop
    (torchvision's default scale (0.08, 1)) and a horizontal flip.

    MAE's finetuning adds (``util/datasets.py: build_transform``, timm's
    ``create_transform``): ``randaugment``, a timm RandAugment policy such as
    ``"rand-m9-mstd0.5-inc1"`` after the flip, with timm's parameters (translation 45% of
    the image, the dataset mean as fill, bicubic), and ``random_erasing``, the probability
    of timm's per-pixel RandomErasing on the normalised tensor. MAE's RandomResizedCrop is
    bicubic; ours stays bilinear (the default of the other protocols) and says so here.
    """
    if image_size <= 32:
        crop = [T.Resize(image_size), T.CenterCrop(image_size),
                T.RandomCrop(image_size, padding=4)]
    else:
        crop = [T.RandomResizedCrop(image_size)]
    steps = [*crop, T.RandomHorizontalFlip()]
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        fill = tuple(min(255, round(255 * value)) for value in mean)
        try:
            # magnitude_max just below 10: at magnitude 10 timm's increasing Posterize keeps
            # 0 bits, which Pillow >= 10 refuses (MAE's old Pillow returned a black image);
            # 9.999 keeps 1 bit there and moves every other op by 0.01% of its range.
            steps.append(rand_augment_transform(randaugment, {
                "translate_const": int(image_size * 0.45), "img_mean": fill,
                "interpolation": PIL.Image.BICUBIC, "magnitude_max": 9.999}))
        except (ValueError, KeyError, AssertionError) as error:
            raise MixmaskError(f"eval.finetune_randaugment={randaugment!r} is not a RandAugment "
                               f"policy timm understands ({error}).") from None
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if random_erasing > 0:
        from timm.data.random_erasing import RandomErasing

        steps.append(RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(steps)


class AugmentedLabelled(Dataset):
    """Items, for keys ``(index, epoch)``, are ``(image, label)`` of ``image_set[indices[
    index]]`` under ``transform``, whose random draws (torch's global CPU generator, which
    torchvision's transforms use, Python's ``random`` and NumPy's, which timm's use) are
    seeded by :func:`item_seed` (seed, epoch, index)."""

    def __init__(self, image_set: ImageSet, indices: Tensor,
                 transform: Callable[[PIL.Image.Image], Tensor], seed: int):
        if image_set.labels is None:
            raise LabelSplitError("training a classifier needs labels; the dataset has none.")
        self.image_set, self.indices = image_set, indices.tolist()
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        # An unreadable file gives the next readable one with its label (ImageSet.load_item).
        image, label = self.image_set.load_item(self.indices[index])
        seed = item_seed(self.seed, epoch, index)
        torch.default_generator.manual_seed(seed)
        # timm's RandAugment draws from Python's `random` and NumPy's global generator (which
        # ops), its RandomErasing from `random`.
        random.seed(seed)
        numpy.random.seed(seed % 2**32)
        return self.transform(image), label


class EpochBatches:
    """Shuffled batches, the same for a given (seed, epoch) on every run; keeps the last
    partial batch (label subsets are small: 1% of CIFAR-10 is 500 images, two batches of
    256) and, under DDP, pads it by wrapping around to the epoch's first images, as
    torch's DistributedSampler does, so every process takes the same number of steps.
    ``start_batch`` skips the batches a resumed run has already trained on."""

    def __init__(self, num_samples: int, global_batch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1):
        if num_samples < 1:
            raise LabelSplitError("the training subset is empty.")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            chosen = order[batch * self.global_batch:(batch + 1) * self.global_batch]
            if self.world_size > 1:
                padded = -(-len(chosen) // self.world_size) * self.world_size
                chosen = chosen + [order[i % len(order)] for i in range(padded - len(chosen))]
                local = padded // self.world_size
                chosen = chosen[self.rank * local:(self.rank + 1) * local]
            yield [(index, self.epoch) for index in chosen]


def train_loader(dataset: AugmentedLabelled, batches: EpochBatches, *, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if num_workers else None)


def balanced_label_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices (sorted) of a class-balanced subset: from each class, round(fraction x its
    count) images (at least one), drawn without replacement by a generator seeded with
    ``seed``, so the subset is a pure function of (labels, fraction, seed)."""
    if not 0.0 < fraction <= 1.0:
        raise LabelSplitError(f"the label fraction must lie in (0, 1], got {fraction}.")
    if fraction == 1.0:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def read_split_file(path: str | Path) -> list[str]:
    """File names, one per line (SimCLR's ``imagenet_subsets/1percent.txt`` and
    ``10percent.txt``: ``n01440764_10026.JPEG``), blank lines ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabelSplitError(f"eval.label_split_file {path} does not exist.")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise LabelSplitError(f"eval.label_split_file {path} lists no file names.")
    return names


def split_file_subset(image_set: ImageSet, names: Sequence[str], source: str) -> Tensor:
    """Indices (sorted) of exactly the files named in a split file, matched by base name;
    every listed name must be in the train split, once."""
    if image_set.paths is None:
        raise LabelSplitError(
            f"eval.label_split_file ({source}) selects image files by name, but this dataset "
            "is held in memory without file names; use it with a file-based dataset "
            "(data.dataset=imagefolder with images larger than 96 px), or drop the file to "
            "draw a balanced subset.")
    position = {}
    for index, path in enumerate(image_set.paths):
        position.setdefault(os.path.basename(path), []).append(index)
    missing = [name for name in names if name not in position]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        raise LabelSplitError(f"{len(missing)} of the {len(names)} files listed in {source} are "
                              f"not in the train split ({shown}); is data.root the dataset the "
                              "split file was written for?")
    duplicated = [name for name in set(names) if len(position[name]) > 1]
    if duplicated or len(set(names)) != len(names):
        raise LabelSplitError(f"{source} names files that are not unique in the train split or "
                              f"in the file (e.g. {(duplicated or names)[0]}).")
    return torch.tensor(sorted(position[name][0] for name in names), dtype=torch.int64)


def label_subset(image_set: ImageSet, labels_option: str, *, seed: int,
                 split_file: str = "") -> tuple[Tensor, str]:
    """The train indices ``mixmask finetune --labels`` trains on, and how they were chosen
    (recorded in the result)."""
    if labels_option not in LABEL_FRACTIONS:
        raise LabelSplitError(f"--labels must be one of {', '.join(LABEL_FRACTIONS)}, got "
                              f"{labels_option!r}.")
    if image_set.labels is None:
        raise LabelSplitError("finetuning needs labels; the train split has none.")
    if split_file and labels_option != "100%":
        return (split_file_subset(image_set, read_split_file(split_file), split_file),
                f"files listed in {split_file}")
    fraction = LABEL_FRACTIONS[labels_option]
    if fraction == 1.0:
        return torch.arange(len(image_set)), "every labelled training image"
    return (balanced_label_subset(image_set.labels, fraction, seed),
            f"class-balanced {labels_option} of the train split, eval.label_seed={seed}")
