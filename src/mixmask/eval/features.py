"""Frozen-model feature extraction (BN in eval mode)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mixmask.ops.tensors import mixed_precision


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, device: torch.device,
                     batch_size: int = 256, num_workers: int = 0,
                     encode: Callable[[Tensor], Tensor] | None = None,
                     progress: Callable[[int], None] | None = None,
                     precision: str = "32") -> tuple[Tensor, Tensor]:
    """Features [N, D] (float32, on ``device``) and labels [N] of a labelled dataset.

    ``model`` is put in eval mode for the extraction (and back after); ``encode`` maps a
    batch of images to pooled features (default: ``model`` itself; for a method, its
    ``features``); ``progress(images)`` is called after each batch. ``precision`` (the
    resolved ``train.precision``) autocasts the forward only: the features come back in
    float32, and whatever reads them (kNN, probes, statistics) runs outside autocast."""
    encode = model if encode is None else encode
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            # clone(): .float() of float32 features is the same tensor, and a network
            # compiled with mode=reduce-overhead (CUDA graphs) overwrites its outputs on
            # the next call, before torch.cat below reads them.
            with mixed_precision(device, precision):
                encoded = encode(images)
            features.append(encoded.float().clone())
            labels.append(targets.to(device, non_blocking=True))
            if progress is not None:
                progress(len(targets))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)
