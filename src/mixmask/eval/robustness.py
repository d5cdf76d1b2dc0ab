"""``mixmask robustness RUN [--corruptions NAME ...] [--severities 1 2 3 4 5]``: accuracy
under the common corruptions of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019), the
robustness setting of SiameseIM (arXiv 2206.01204, Table 1: ImageNet-A/R/Sketch/C).

A linear probe is trained on clean centre-crop features of the train split (the cached
linear protocol: ``eval.linear_*``), or, with ``scenarios.robustness_classifier=
finetune_10pct`` (any finished ``mixmask finetune`` of the run), the finetuned network
classifies; each corruption of :mod:`mixmask.data.corruptions`
is then applied on the fly to the test split's centre crops (ImageNet-C corrupts 224 px
crops the same way) at each severity, deterministically per (``scenarios.seed``,
corruption, severity, image), and the probe scores the corrupted features. Reported: clean
top-1, top-1 per corruption and severity, its means per corruption, per severity and per
group (noise, blur, weather, digital), the mean over all, and the drop from clean. mCE
(errors relative to AlexNet's) is not reported: it needs AlexNet's errors on the same
data, which do not exist for our datasets.

With ``scenarios.robustness_root`` a published set on disk is scored too
(:mod:`mixmask.data.robustness_sets`): CIFAR-10-C / -100-C (.npy per corruption), an
ImageNet-C tree, or a class-shift set (ImageNet-A / -R / -Sketch) whose class folders map
by name onto the train classes, the probe's scores restricted to the classes present.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mixmask.data.corruptions import CORRUPTION_GROUPS, CORRUPTIONS, corrupt
from mixmask.data.loaders import EvalDataset, item_seed
from mixmask.data.progress import image_progress
from mixmask.data.robustness_sets import (
    cifar_c_corruptions,
    class_shift_set,
    detect_layout,
    imagenet_c_sets,
    read_cifar_c,
    restrict_scores,
)
from mixmask.data.transforms import eval_geometry, eval_transform, to_normalised_tensor
from mixmask.errors import ConfigError
from mixmask.eval.features import extract_features
from mixmask.eval.finetune import Classifier
from mixmask.eval.frozen_run import FrozenRun
from mixmask.eval.linear import train_linear_probe
from mixmask.runs.checkpoint import load_state, read_checkpoint
from mixmask.runs.folder import read_mapping, write_result

DESCRIPTION = ("robustness: {classifier}, trained on clean images; test top-1 under {count} "
               "corruptions of Hendrycks & Dietterich 2019 (mixmask.data.corruptions, "
               "CIFAR-10-C constants) at severities {severities}, on {images} test images")


class CorruptedImages(Dataset):
    """``(image, label)`` of test images ``indices`` of an ImageSet: centre-cropped by
    ``geometry``, corrupted by ``corruption`` at ``severity`` (0: clean) with the seed
    :func:`item_seed` (seed, code, position), then normalised."""

    def __init__(self, image_set, indices: list[int], geometry, normalise, *,
                 corruption: str, severity: int, seed: int):
        self.image_set, self.indices = image_set, indices
        self.geometry, self.normalise = geometry, normalise
        self.corruption, self.severity = corruption, severity
        # One stream per (corruption, severity): a corruption's noise never repeats another's.
        code = (CORRUPTIONS.index(corruption) + 1) * 10 + severity if severity else 0
        self.stream = seed, code  # the first two parts of each image's item_seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        image, label = self.image_set.load_item(self.indices[position])
        image = self.geometry(image.convert("RGB"))
        if self.severity:
            pixels = corrupt(numpy.asarray(image), self.corruption, self.severity,
                             item_seed(*self.stream, position))
            image = PIL.Image.fromarray(pixels)
        return self.normalise(image), label


class ArrayImages(Dataset):
    """``(image, label)`` of uint8 [N, H, W, 3] arrays (CIFAR-10-C's rows), normalised."""

    def __init__(self, pixels: numpy.ndarray, labels: numpy.ndarray, normalise):
        self.pixels, self.labels, self.normalise = pixels, labels, normalise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return (self.normalise(PIL.Image.fromarray(numpy.array(self.pixels[index]))),
                int(self.labels[index]))


def corruption_table(top1: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Means of a {corruption: {severity: top-1}} table: per corruption, per severity, per
    group (noise / blur / weather / digital, among the corruptions present) and over all."""
    by_corruption = {name: sum(row.values()) / len(row) for name, row in top1.items()}
    severities = sorted({severity for row in top1.values() for severity in row})
    by_severity = {str(severity): sum(row[severity] for row in top1.values()) / len(top1)
                   for severity in severities}
    by_group = {}
    for group, names in CORRUPTION_GROUPS.items():
        present = [by_corruption[name] for name in names if name in by_corruption]
        if present:
            by_group[group] = sum(present) / len(present)
    cells = [value for row in top1.values() for value in row.values()]
    return {"corruption_mean": by_corruption, "severity_mean": by_severity,
            "group_mean": by_group, "mean_top1": sum(cells) / len(cells)}


def run_robustness(run: Path, overrides: list[str], **opening: Any
                   ) -> tuple[Path, dict[str, Any]]:
    """``mixmask robustness``; ``opening``: :meth:`FrozenRun.open`'s options (checkpoint,
    protocol_file, console, from_scratch)."""
    frozen = FrozenRun.open(run, overrides, **opening)
    started = time.perf_counter()
    config, scenarios = frozen.config, frozen.config.scenarios
    names = list(scenarios.robustness_corruptions) or list(CORRUPTIONS)
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption {unknown[0]!r}; the corruptions are "
                          f"{', '.join(CORRUPTIONS)}.")
    severities = sorted(set(scenarios.robustness_severities))
    model, encode, probe, classifier_settings = clean_classifier(frozen)
    test_set = frozen.eval_data.test.image_set
    order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(
        scenarios.seed)).tolist()
    indices = sorted(order[:scenarios.robustness_test_images] if scenarios.robustness_test_images
                     else order)
    geometry = eval_geometry(config.data.image_size, config.data.image_size >= 128)
    normalise = to_normalised_tensor(test_set.mean, test_set.std)

    def score(dataset, advance, classes: list[int] | None = None) -> float:
        features, labels = extract_features(model, dataset, device=frozen.device,
                                            num_workers=config.data.num_workers,
                                            encode=encode, progress=advance,
                                            precision=config.train.precision)
        with torch.no_grad():
            scores = probe(features)
        if classes is not None:
            scores = restrict_scores(scores, classes)
        return 100.0 * (scores.argmax(dim=1) == labels).double().mean().item()

    cells = 1 + len(names) * len(severities)
    top1: dict[str, dict[int, float]] = {}
    with image_progress("robustness", cells * len(indices), enabled=config.train.progress_bar,
                        console=frozen.console) as advance:
        clean = score(CorruptedImages(test_set, indices, geometry, normalise,
                                      corruption=names[0], severity=0, seed=scenarios.seed),
                      advance)
        for name in names:
            for severity in severities:
                top1.setdefault(name, {})[severity] = score(CorruptedImages(
                    test_set, indices, geometry, normalise, corruption=name,
                    severity=severity, seed=scenarios.seed), advance)
    table = corruption_table(top1)
    published = (_published_set(frozen, probe, score, severities, normalise)
                 if scenarios.robustness_root else None)
    description = DESCRIPTION.format(
        classifier=classifier_settings.pop("description"), count=len(names),
        severities="/".join(map(str, severities)), images=len(indices))
    result = frozen.header("robustness", description, time.perf_counter() - started)
    summary_rows = [{"protocol": "robustness_clean", "top1": clean},
                    {"protocol": "robustness_corrupted", "top1": table["mean_top1"]}]
    if published is not None:
        summary_rows.append({"protocol": f"robustness_{published['layout']}",
                             "top1": published["top1"]})
    result.update(
        clean_top1=clean, mean_corrupted_top1=table["mean_top1"],
        drop=clean - table["mean_top1"],
        corruptions={name: {str(s): value for s, value in row.items()}
                     for name, row in top1.items()},
        corruption_mean=table["corruption_mean"], severity_mean=table["severity_mean"],
        group_mean=table["group_mean"], published_set=published, summary_rows=summary_rows,
        settings={"corruptions": names, "severities": severities, "seed": scenarios.seed,
                  "implementation": "mixmask.data.corruptions (CIFAR-10-C constants up to "
                                    "64 px; see its docstring for deviations)",
                  "applied_to": "the evaluation centre crop, before normalisation",
                  "root": scenarios.robustness_root, **classifier_settings},
        test_images=len(indices))
    return write_result(run, frozen.result_name("robustness"), result), result


def clean_classifier(frozen: FrozenRun):
    """(the model to run in eval mode, its encoder, the head over the encoder's output,
    settings): a cached linear probe trained here on clean features, or the network of a
    finished finetune (``scenarios.robustness_classifier``)."""
    evaluation, name = frozen.config.eval, frozen.config.scenarios.robustness_classifier
    if name != "linear":
        classifier, settings = finetuned_classifier(frozen, name)
        settings["description"] = f"the network of {name} (mixmask finetune)"
        return classifier.to(frozen.device), classifier.scores, torch.nn.Identity(), settings
    train_features, train_labels = frozen.encode(frozen.eval_data.train, "train")
    probe = train_linear_probe(
        train_features, train_labels, num_classes=frozen.eval_data.num_classes,
        epochs=evaluation.linear_epochs, lr=evaluation.linear_lr,
        batch_size=evaluation.linear_batch_size, milestones=evaluation.linear_milestones,
        seed=frozen.config.train.seed)
    return frozen.method, frozen.method.features, probe, {
        "classifier": "linear_cached", "lr": evaluation.linear_lr,
        "epochs": evaluation.linear_epochs, "train_images": len(train_labels),
        "description": f"linear probe (cached standardised centre-crop features, SGD lr "
                       f"{evaluation.linear_lr}, {evaluation.linear_epochs} epochs)"}


def finetuned_classifier(frozen: FrozenRun, name: str) -> tuple[Classifier, dict[str, Any]]:
    """The network a finished ``mixmask finetune`` of the run left in
    ``RUN/eval/<name>/last.ckpt`` (its result ``RUN/eval/<name>.json`` marks it finished),
    rebuilt over the run's backbone with the pooling it was finetuned with."""
    result_path = frozen.run / "eval" / f"{name}.json"
    checkpoint_path = frozen.run / "eval" / name / "last.ckpt"
    if not result_path.is_file() or not checkpoint_path.is_file():
        labels = name.removeprefix("finetune_").removesuffix("pct")
        raise ConfigError(f"scenarios.robustness_classifier={name} needs a finished `mixmask "
                          f"finetune {frozen.run} --labels {labels}%`: {result_path} or "
                          f"{checkpoint_path} is missing.")
    settings, problem = read_mapping(result_path, json.loads)
    if settings is None or not isinstance(settings.get("settings"), dict):
        raise ConfigError(f"{result_path} is not a finetune result"
                          f"{f' ({problem})' if problem else ''}.")
    finetuned = settings["settings"]
    backbone = frozen.method.backbone
    if finetuned.get("global_pool"):
        backbone.set_global_pool(finetuned["global_pool"])
    classifier = Classifier(backbone, frozen.method.feature_dim, frozen.eval_data.num_classes)
    content = read_checkpoint(checkpoint_path, required=("classifier",))
    load_state(classifier, content["classifier"], checkpoint_path)
    return classifier, {"classifier": name, "checkpoint_of_classifier": str(checkpoint_path),
                        "finetune_settings": finetuned}


def _published_set(frozen: FrozenRun, probe, score, severities: list[int],
                   normalise) -> dict[str, Any]:
    """Top-1 of the probe on the set under ``scenarios.robustness_root``."""
    root = Path(frozen.config.scenarios.robustness_root).expanduser()
    layout = detect_layout(root)
    train_set = frozen.eval_data.train.image_set
    config = frozen.config
    if layout == "class_shift":
        image_set, classes = class_shift_set(root, train_set.classes, train_set.mean,
                                             train_set.std)
        transform = eval_transform(config.data.image_size, train_set.mean, train_set.std,
                                   resize_from_larger=config.data.image_size >= 128)
        with image_progress(f"robustness ({root.name})", len(image_set),
                            enabled=config.train.progress_bar,
                            console=frozen.console) as advance:
            top1 = score(EvalDataset(image_set, transform), advance, classes)
        return {"layout": layout, "root": str(root), "top1": top1, "images": len(image_set),
                "classes": len(classes),
                "scoring": "the probe's scores restricted to the classes present"}
    table: dict[str, dict[int, float]] = {}
    if layout == "cifar_c":
        names = cifar_c_corruptions(root)
        sets = {name: {severity: ArrayImages(*read_cifar_c(root, name, severity), normalise)
                       for severity in severities} for name in names}
    else:
        transform = eval_transform(config.data.image_size, train_set.mean, train_set.std,
                                   resize_from_larger=config.data.image_size >= 128)
        found = imagenet_c_sets(root, train_set.classes, train_set.mean, train_set.std)
        sets = {name: {severity: EvalDataset(levels[severity], transform)
                       for severity in severities if severity in levels}
                for name, levels in found.items()}
    total = sum(len(dataset) for levels in sets.values() for dataset in levels.values())
    with image_progress(f"robustness ({root.name})", total, enabled=config.train.progress_bar,
                        console=frozen.console) as advance:
        for name, levels in sets.items():
            for severity, dataset in levels.items():
                table.setdefault(name, {})[severity] = score(dataset, advance)
    means = corruption_table(table)
    return {"layout": layout, "root": str(root), "top1": means["mean_top1"],
            "corruptions": {name: {str(s): value for s, value in row.items()}
                            for name, row in table.items()},
            "corruption_mean": means["corruption_mean"],
            "severity_mean": means["severity_mean"]}
