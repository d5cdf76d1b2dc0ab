"""Multinomial logistic regression on frozen features: the few-shot solver.

SiameseIM's few-shot numbers (ImageNet 1%) follow MSN's ``logistic_eval.py`` (Assran et
al. 2022, arXiv 2204.07141, sec. 5): every feature row centred (its own mean over the
dimensions subtracted) and scaled to unit L2 norm (cyanure's ``preprocess(centering=True,
normalize=True, columns=False)``, applied to train and test rows alike), then cyanure's
``MultiClassifier(loss='multiclass-logistic', penalty='l2', fit_intercept=False)`` with
``lambd = 0.00025 / n``: it minimises

    (1/n) sum_i CE(W x_i, y_i) + (lambd / 2) ||W||^2.

cyanure is a compiled extra without wheels for every platform, so we minimise the same
strictly convex objective with full-batch L-BFGS (strong Wolfe line search) in float64:
the minimiser is unique, so any exact solver gives the same classifier; ours stops when
the gradient's largest entry falls below ``tolerance`` or after ``max_iterations``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def centre_and_normalise_rows(features: Tensor) -> Tensor:
    """Each row minus its own mean, then scaled to unit L2 norm (float64)."""
    rows = features.double()
    rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def logistic_objective(weight: Tensor, rows: Tensor, labels: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy of ``rows @ weight.T`` plus ``l2 / 2 * ||weight||^2``."""
    return F.cross_entropy(rows @ weight.T, labels) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, *,
                 lambd: float = 0.00025, max_iterations: int = 300,
                 tolerance: float = 1e-6) -> Tensor:
    """The weight [C, D] (float64, no intercept) of MSN's logistic regression on
    ``features`` [N, D] (raw: they are centred and normalised here), penalty ``lambd / N``.
    Deterministic: no random draw anywhere."""
    rows = centre_and_normalise_rows(features).cpu()
    targets = labels.cpu().long()
    l2 = lambd / len(rows)
    weight = torch.zeros(num_classes, rows.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iterations,
                                  tolerance_grad=tolerance, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = logistic_objective(weight, rows, targets, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach()


@torch.no_grad()
def logistic_top1(weight: Tensor, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent of the classifier ``weight`` on raw ``features``."""
    scores = centre_and_normalise_rows(features).cpu() @ weight.T
    return 100.0 * (scores.argmax(dim=1) == labels.cpu()).double().mean().item()
