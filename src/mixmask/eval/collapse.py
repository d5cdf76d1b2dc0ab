"""Collapse: every image mapped to (nearly) the same point, the commonest way a
self-supervised run fails.

The measure is the one of SimSiam (arXiv 2011.10566, Sec. 4.1 and Fig. 2, "std of the
l2-normalized output"), also logged by lightly and solo-learn: the standard deviation
across the batch of the L2-normalised embeddings, averaged over dimensions. For
embeddings spread over the sphere it is about 1/sqrt(d) (each coordinate of a random
unit vector has variance 1/d); for a collapsed representation it goes to 0. We log it
raw and judge collapse on its ratio to 1/sqrt(d), so one threshold serves every width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Collapsed: the logged std below this share of 1/sqrt(d). Measured on real CIFAR-10
# (benchmarks/collapse_threshold.py, docs/performance.md#collapse-monitor-threshold):
# healthy training batches sit at 0.32-0.48 of 1/sqrt(d) for backbone features and
# 0.11-0.94 for projector outputs (MoCo v2, BYOL, SimSiam, VICReg, random inits); test
# features in eval mode at 0.35-0.44 after training and 0.12-0.16 at the random init,
# while the two-step Barlow Twins run of issue 22 puts every test image on one point (0).
# 0.05 lies a factor of two below the lowest healthy value measured.
COLLAPSE_RATIO = 0.05
# Logged values in a row below the threshold before the run warns.
COLLAPSE_PATIENCE = 3


def embedding_std(embeddings: Tensor) -> Tensor:
    """0-dim tensor on the embeddings' device: the std over the batch of the L2-normalised
    rows of ``embeddings`` [B, d], averaged over the d dimensions (no host read)."""
    normalised = torch.nn.functional.normalize(embeddings.detach().float().flatten(1), dim=1)
    return normalised.std(dim=0, unbiased=False).mean()


def healthy_std(dim: int) -> float:
    """The std of L2-normalised embeddings spread uniformly over the sphere in ``dim``
    dimensions: 1/sqrt(d)."""
    return 1.0 / math.sqrt(dim)


@dataclass
class CollapseWatch:
    """Follows the logged ``feature_std`` / ``embedding_std`` of a run: ``collapsed`` once
    the last COLLAPSE_PATIENCE logged values of one of them (or all of them, in a shorter
    run) lie below COLLAPSE_RATIO / sqrt(d); ``warning`` returns the one warning, once."""

    dims: dict[str, int]  # logged name -> embedding dimension d
    # Logged values in a row below the threshold that count as collapse, by name (default
    # COLLAPSE_PATIENCE; 1 for a measure over the whole test set).
    patience: dict[str, int] = field(default_factory=dict)
    below: dict[str, int] = field(default_factory=dict)  # logged values in a row below
    seen: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    warned: bool = False

    def add(self, step: int, row: dict[str, float]) -> str | None:
        """Take one logged row; returns the warning the first time collapse is seen."""
        for name, dim in self.dims.items():
            if name not in row:
                continue
            value = row[name]
            self.last[name] = value
            self.seen[name] = self.seen.get(name, 0) + 1
            low = not value >= COLLAPSE_RATIO * healthy_std(dim)  # NaN counts as collapsed
            self.below[name] = self.below.get(name, 0) + 1 if low else 0
        if self.warned or not self._collapsed():
            return None
        self.warned = True
        shown = ", ".join(f"{name} {self.last[name]:.2g} (about {healthy_std(dim):.2g} when "
                          f"spread)" for name, dim in self.dims.items() if name in self.last)
        return (f"Warning: the representation looks collapsed at step {step}: {shown}; below "
                f"{COLLAPSE_RATIO:g}/sqrt(d), every image maps to nearly the same point. "
                "Usual causes: too high a learning rate, a missing predictor or "
                "stop-gradient, or too small a batch for the method.")

    @property
    def collapsed(self) -> bool:
        """At the end of a run: the last logs (all of them, if fewer than the patience)."""
        return self._collapsed(short_runs=True)

    def _collapsed(self, short_runs: bool = False) -> bool:
        for name in self.dims:
            patience = self.patience.get(name, COLLAPSE_PATIENCE)
            needed = min(patience, self.seen.get(name, 0)) if short_runs else patience
            if needed and self.below.get(name, 0) >= needed:
                return True
        return False


def spread_problem(features: Tensor, needed_points: int = 5) -> str | None:
    """Why a figure that needs spread (a t-SNE) cannot be drawn from ``features`` [N, d],
    or None: non-finite values, fewer distinct points than ``needed_points``, or (after
    L2 normalisation) a spread below the collapse threshold. Checked before the features
    reach a library that crashes on them (scikit-learn's t-SNE segfaults on identical
    rows)."""
    if features.numel() == 0 or len(features) < needed_points:
        return f"only {len(features)} feature vectors, fewer than the {needed_points} it needs"
    if not bool(torch.isfinite(features).all()):
        return "the features hold NaN or infinity"
    distinct = len(torch.unique(features.float().flatten(1), dim=0))
    if distinct < needed_points:
        return (f"features collapsed: every test image maps to one of {distinct} point"
                f"{'s' if distinct != 1 else ''}")
    if float(embedding_std(features)) < COLLAPSE_RATIO * healthy_std(features.flatten(1).shape[1]):
        return "features collapsed: every test image maps to nearly the same point"
    return None
