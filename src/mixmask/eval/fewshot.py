"""``mixmask fewshot RUN --shots 1 5 10 [--episodes N]``: few-shot classification on frozen
features, the setting where SiameseIM (arXiv 2206.01204, Table 1: ImageNet 1%) reports
its largest gain over MAE.

For each shot count k and each of N episodes, k training images per class are drawn
(episode e with seed ``scenarios.seed + e``), MSN's logistic regression
(:mod:`mixmask.eval.logistic`) is fitted on their frozen features and scored on the whole
test split; the result is the mean over episodes with a 95% interval,
``1.96 x sample std / sqrt(N)`` (the normal interval of the few-shot literature, e.g.
Chen et al. 2019, "A Closer Look at Few-shot Classification"). The class-balanced label
fractions (``scenarios.fewshot_fractions``: SimCLR's 1% / 10%) run with the same solver and
episodes. Features are extracted once (centre crops, no augmentation), so an episode costs
one solve.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixmask.data.progress import image_progress
from mixmask.eval.data import LabelSplitError, balanced_label_subset
from mixmask.eval.frozen_run import FrozenRun
from mixmask.eval.logistic import fit_logistic, logistic_top1
from mixmask.runs.folder import write_result

DESCRIPTION = ("few-shot: {shots} images per class ({fractions}), {episodes} episodes each; "
               "multinomial logistic regression (MSN's logistic_eval.py objective, L2 "
               "lambda {lambd}/n, no intercept) on centred, L2-normalised frozen centre-crop "
               "features; mean test top-1 +- 1.96 x std / sqrt(episodes)")


def k_shot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Indices (sorted) of ``shots`` images of every class, drawn without replacement by a
    generator seeded with ``seed``: a pure function of (labels, shots, seed)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        if len(members) < shots:
            raise LabelSplitError(f"class {label} has {len(members)} training images, fewer "
                                  f"than the {shots} shots asked for.")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def interval95(values: list[float]) -> float:
    """Half-width of the normal 95% interval of the mean: 1.96 x sample std (n - 1) /
    sqrt(n); 0 for a single value (no spread can be estimated: said in the result)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return 1.96 * math.sqrt(variance) / math.sqrt(len(values))


def episode_summary(top1s: list[float], seeds: list[int], train_images: int
                    ) -> dict[str, Any]:
    return {"mean_top1": sum(top1s) / len(top1s), "ci95": interval95(top1s),
            "episode_top1": top1s, "episode_seeds": seeds, "train_images": train_images}


def run_fewshot(run: Path, overrides: list[str], **opening: Any
                ) -> tuple[Path, dict[str, Any]]:
    """``mixmask fewshot``; ``opening``: :meth:`FrozenRun.open`'s options (checkpoint,
    protocol_file, console, from_scratch)."""
    frozen = FrozenRun.open(run, overrides, **opening)
    started = time.perf_counter()
    scenarios = frozen.config.scenarios
    train_features, train_labels, test_features, test_labels = frozen.split_features()
    num_classes = frozen.eval_data.num_classes
    seeds = [scenarios.seed + episode for episode in range(scenarios.fewshot_episodes)]
    budgets = ([("shots", shots) for shots in scenarios.fewshot_shots]
               + [("fraction", fraction) for fraction in scenarios.fewshot_fractions])
    by_shots: dict[str, Any] = {}
    by_fraction: dict[str, Any] = {}
    with image_progress("few-shot episodes", len(budgets) * len(seeds),
                        enabled=frozen.config.train.progress_bar, console=frozen.console,
                        unit="episodes") as advance:
        for kind, budget in budgets:
            top1s, size = [], 0
            for seed in seeds:
                chosen = (k_shot_indices(train_labels.cpu(), budget, seed) if kind == "shots"
                          else balanced_label_subset(train_labels.cpu(), budget, seed))
                weight = fit_logistic(train_features[chosen], train_labels[chosen],
                                      num_classes, lambd=scenarios.logistic_lambda,
                                      max_iterations=scenarios.logistic_max_iterations)
                top1s.append(logistic_top1(weight, test_features, test_labels))
                size = len(chosen)
                advance(1)
            summary = episode_summary(top1s, seeds, size)
            if kind == "shots":
                by_shots[str(budget)] = summary
            else:
                by_fraction[f"{100 * budget:g}%"] = summary
    description = DESCRIPTION.format(
        shots="/".join(map(str, scenarios.fewshot_shots)),
        fractions=", ".join(by_fraction) + " of the labels" if by_fraction else "no fractions",
        episodes=len(seeds), lambd=scenarios.logistic_lambda)
    result = frozen.header("fewshot", description, time.perf_counter() - started)
    result.update(
        shots=by_shots, label_fractions=by_fraction,
        settings={"solver": "L-BFGS (strong Wolfe), float64, full batch",
                  "objective": "mean cross-entropy + lambda/n / 2 ||W||^2, no intercept",
                  "lambda": scenarios.logistic_lambda,
                  "max_iterations": scenarios.logistic_max_iterations,
                  "features": "each row centred and L2-normalised (cyanure preprocess)",
                  "episodes": len(seeds), "seeds": seeds,
                  "interval": "1.96 x sample std / sqrt(episodes); 0 for one episode"},
        summary_rows=[{"protocol": f"fewshot_{shots}shot", "top1": row["mean_top1"],
                       "ci95": row["ci95"]} for shots, row in by_shots.items()]
        + [{"protocol": f"fewshot_{name.rstrip('%')}pct", "top1": row["mean_top1"],
            "ci95": row["ci95"]} for name, row in by_fraction.items()],
        train_images=len(train_labels), test_images=len(test_labels))
    return write_result(run, frozen.result_name("fewshot"), result), result
