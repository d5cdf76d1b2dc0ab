"""Evaluation of a representation: feature extraction, weighted kNN, linear probe.

:func:`evaluate` is what the engine (per-epoch monitors, end of pretraining) and the
``mixmask knn|linear`` commands call.
"""

from __future__ import annotations

import torch
from torch import nn

from mixmask.data.progress import image_progress
from mixmask.eval.collapse import embedding_std
from mixmask.eval.features import extract_features
from mixmask.eval.knn import knn_top1
from mixmask.eval.linear import linear_top1


@torch.no_grad()
def _probe_top1(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probe(features).argmax(dim=1) == labels).float().mean().item()


def evaluate(method: nn.Module, eval_data, config, device: torch.device, *, knn: bool,
             linear: bool, probe: nn.Module | None = None,
             num_workers: int = 0, show_progress: bool = False,
             progress=None) -> dict[str, float]:
    """Top-1 (percent, on ``eval_data.test``) of a frozen method's ``features``: weighted
    kNN (``monitor.knn_k``, ``monitor.knn_temperature``), a linear probe on cached,
    standardised features (``eval.linear_*``) and/or a trained online ``probe``.

    ``show_progress`` draws a bar per feature extraction, inside ``progress`` (a rich
    live display already on screen, e.g. pretraining's) when given."""
    results: dict[str, float] = {}
    if not (knn or linear or probe is not None):
        return results
    encode = getattr(method, "features", method)
    train_features = train_labels = None

    def features(name: str, dataset):
        with image_progress(f"features ({name})", len(dataset), enabled=show_progress,
                            progress=progress) as advance:
            return extract_features(method, dataset, device=device, num_workers=num_workers,
                                    encode=encode, progress=advance,
                                    precision=config.train.precision)

    if knn or linear:
        train_features, train_labels = features("train", eval_data.train)
    test_features, test_labels = features("test", eval_data.test)
    # The spread of the test features as evaluation sees them (eval-mode BN): what the
    # collapse monitor checks beside the training batches' (mixmask.eval.collapse).
    results["test_feature_std"] = float(embedding_std(test_features))
    if knn:
        results["knn_top1"] = knn_top1(
            train_features, train_labels, test_features, test_labels,
            num_classes=eval_data.num_classes, k=config.monitor.knn_k,
            temperature=config.monitor.knn_temperature)
    if probe is not None:
        results["probe_top1"] = _probe_top1(probe, test_features, test_labels)
    if linear:
        results["linear_top1"] = linear_top1(
            train_features, train_labels, test_features, test_labels,
            num_classes=eval_data.num_classes, epochs=config.eval.linear_epochs,
            lr=config.eval.linear_lr, batch_size=config.eval.linear_batch_size,
            milestones=config.eval.linear_milestones, seed=config.train.seed)
    return results


__all__ = ["evaluate", "extract_features", "knn_top1", "linear_top1"]
