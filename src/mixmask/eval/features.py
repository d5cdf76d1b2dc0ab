"""Frozen-backbone feature extraction (BN in eval mode)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, *, device: torch.device,
                     batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Features [N, D] (float32, on ``device``) and labels [N] of a labelled dataset."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        features.append(backbone(images).float())
        labels.append(targets.to(device, non_blocking=True))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
