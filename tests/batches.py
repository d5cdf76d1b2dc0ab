"""Batches for tests that call a method's training_step directly."""

from __future__ import annotations

import torch

from mixmask.data.batch import UNLABELED, Batch


def views_batch(*views: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """A Batch of the given views: whole-image boxes, no flips."""
    size, height, width = views[0].shape[0], views[0].shape[-2], views[0].shape[-1]
    box = torch.tensor([0, 0, height, width]).expand(size, 4)
    flip = torch.zeros(size, dtype=torch.bool)
    if labels is None:
        labels = torch.full((size,), UNLABELED)
    return Batch(list(views), labels, [box] * len(views), [flip] * len(views))
