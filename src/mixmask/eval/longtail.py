"""``mixmask longtail RUN [--imbalance 100]``: a linear probe trained on a long-tailed
subset of the train split, scored on the balanced test split (SiameseIM, arXiv
2206.01204, claims its largest gains in long-tail settings, sec. 5).

The subset is the CIFAR-LT construction of Cao et al. 2019 (LDAM-DRW, arXiv 1906.07413,
``get_img_num_per_cls``): class i of C keeps ``int(n_max x (1 / imbalance)^(i / (C - 1)))``
training images, so the largest over the smallest class is the imbalance ratio (CIFAR-10
at 100: 5000, 2997, ..., 50). n_max is the smallest class of the train split (5000 for
CIFAR), so every class can supply its count; which images are kept is drawn per class
with ``scenarios.seed`` (Cao et al. shuffle with a fixed seed too).

Classes are then grouped by their long-tailed training count as in Liu et al. 2019 (OLTR,
arXiv 1904.05160): many-shot above ``scenarios.longtail_many`` (100), few-shot below
``scenarios.longtail_few`` (20), medium-shot between; a group with no class reports null
(CIFAR-10 at imbalance 100 has no few-shot class: its smallest keeps 50).

The probe is the cached linear protocol (``mixmask linear --protocol cached``: standardised
centre-crop features, SGD, ``eval.linear_*``), so its balanced-data score is the reference
this protocol's drop is read against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixmask.eval.accuracy import EpochRecord
from mixmask.eval.data import LabelSplitError
from mixmask.eval.frozen_run import FrozenRun
from mixmask.eval.linear import train_linear_probe
from mixmask.runs.folder import write_result

DESCRIPTION = ("long-tail: linear probe (cached standardised centre-crop features, SGD lr "
               "{lr}, {epochs} epochs) on the CIFAR-LT subset of Cao et al. 2019 (imbalance "
               "{imbalance:g}, {images} images), balanced test split; many-shot > {many}, "
               "few-shot < {few} training images (OLTR)")


def longtail_counts(num_classes: int, largest: int, imbalance: float) -> list[int]:
    """Training images kept per class: ``int(largest x imbalance^(-i / (C - 1)))``."""
    if num_classes == 1:
        return [largest]
    return [int(largest * (1.0 / imbalance) ** (index / (num_classes - 1)))
            for index in range(num_classes)]


def longtail_indices(labels: Tensor, imbalance: float, seed: int) -> tuple[Tensor, list[int]]:
    """Indices (sorted) of the long-tailed subset of a labelled split and the per-class
    counts, class index order (class 0 keeps the most); a pure function of its inputs."""
    classes = int(labels.max().item()) + 1
    present = torch.bincount(labels, minlength=classes)
    if int(present.min()) == 0:
        raise LabelSplitError(f"class {int(torch.argmin(present))} has no training image; a "
                              "long-tailed subset needs every class.")
    counts = longtail_counts(classes, int(present.min()), imbalance)
    if min(counts) < 1:
        raise LabelSplitError(f"an imbalance of {imbalance:g} leaves no image of the smallest "
                              f"class ({int(present.min())} images per class at most).")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, count in enumerate(counts):
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values, counts


def shot_groups(counts: list[int], many: int, few: int) -> dict[str, list[int]]:
    """The classes of each OLTR group: many (count > many), few (count < few), medium."""
    return {"many": [c for c, n in enumerate(counts) if n > many],
            "medium": [c for c, n in enumerate(counts) if few <= n <= many],
            "few": [c for c, n in enumerate(counts) if n < few]}


def group_top1(predictions: Tensor, labels: Tensor, classes: list[int]) -> float | None:
    """Top-1 (percent) over the test images whose label is in ``classes``; None if empty."""
    members = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))
    if not classes or not bool(members.any()):
        return None
    return 100.0 * (predictions[members] == labels[members]).double().mean().item()


def run_longtail(run: Path, overrides: list[str], **opening: Any
                 ) -> tuple[Path, dict[str, Any]]:
    """``mixmask longtail``; ``opening``: :meth:`FrozenRun.open`'s options (checkpoint,
    protocol_file, console, from_scratch)."""
    frozen = FrozenRun.open(run, overrides, **opening)
    started = time.perf_counter()
    scenarios, evaluation = frozen.config.scenarios, frozen.config.eval
    train_features, train_labels, test_features, test_labels = frozen.split_features()
    chosen, counts = longtail_indices(train_labels.cpu(), scenarios.longtail_imbalance,
                                      scenarios.seed)
    chosen = chosen.to(train_features.device)
    record = EpochRecord()
    classifier = train_linear_probe(
        train_features[chosen], train_labels[chosen], num_classes=frozen.eval_data.num_classes,
        epochs=evaluation.linear_epochs, lr=evaluation.linear_lr,
        batch_size=evaluation.linear_batch_size, milestones=evaluation.linear_milestones,
        seed=frozen.config.train.seed, test_features=test_features, test_labels=test_labels,
        record=record)
    with torch.no_grad():
        predictions = classifier(test_features).argmax(dim=1)
    groups = shot_groups(counts, scenarios.longtail_many, scenarios.longtail_few)
    top1 = group_top1(predictions, test_labels, list(range(len(counts))))
    description = DESCRIPTION.format(
        lr=evaluation.linear_lr, epochs=evaluation.linear_epochs,
        imbalance=scenarios.longtail_imbalance, images=len(chosen),
        many=scenarios.longtail_many, few=scenarios.longtail_few)
    result = frozen.header("longtail", description, time.perf_counter() - started)
    per_class = [group_top1(predictions, test_labels, [c]) for c in range(len(counts))]
    result.update(
        top1=top1, many_top1=group_top1(predictions, test_labels, groups["many"]),
        medium_top1=group_top1(predictions, test_labels, groups["medium"]),
        few_top1=group_top1(predictions, test_labels, groups["few"]),
        class_counts=counts, class_top1=per_class, groups=groups,
        history=record.history,
        settings={"imbalance": scenarios.longtail_imbalance, "seed": scenarios.seed,
                  "construction": "Cao et al. 2019 (LDAM-DRW) CIFAR-LT: int(n_max x "
                                  "imbalance^(-i/(C-1))), n_max = the smallest class",
                  "many_above": scenarios.longtail_many, "few_below": scenarios.longtail_few,
                  "probe": "linear_cached", "lr": evaluation.linear_lr,
                  "epochs": evaluation.linear_epochs,
                  "batch_size": evaluation.linear_batch_size,
                  "milestones": list(evaluation.linear_milestones),
                  "reported": "the last epoch's classifier (no selection on the test split)"},
        train_images=len(chosen), test_images=len(test_labels))
    return write_result(run, frozen.result_name("longtail"), result), result
