"""Linear probe on frozen features.

The MoCo protocol (He et al. 2020, sec. 4.1): frozen backbone with BN in eval mode, a
linear classifier trained with SGD (momentum 0.9, weight decay 0) and step decays x0.1.
We extract centre-crop features once and train the classifier on the cached features
(no per-epoch augmentation): minutes instead of hours, at a small cost in accuracy.
Features are standardised with the training set's mean and std (like MAE's affine-free
BN before the classifier), so one learning rate works for every backbone width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def train_linear_probe(train_features: Tensor, train_labels: Tensor, *, num_classes: int,
                       epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                       milestones: tuple[float, ...] = (0.6, 0.8),
                       seed: int = 0) -> nn.Module:
    """Train a linear classifier (with the standardisation folded in) on cached features."""
    device = train_features.device
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    inputs = (train_features - mean) / std
    classifier = nn.Linear(inputs.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-inputs.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [int(f * epochs * steps_per_epoch) for f in milestones], gamma=0.1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator).to(device)
        for start in range(0, inputs.shape[0], batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(inputs[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():  # fold the standardisation into the classifier
        folded = nn.Linear(inputs.shape[1], num_classes).to(device)
        folded.weight.copy_(classifier.weight / std)
        folded.bias.copy_(classifier.bias - (classifier.weight * (mean / std)).sum(dim=1))
    return folded


@torch.no_grad()
def accuracy(classifier: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (classifier(features).argmax(dim=1) == labels).float().mean().item()


def linear_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                test_labels: Tensor, *, num_classes: int, **probe_options) -> float:
    classifier = train_linear_probe(train_features, train_labels, num_classes=num_classes,
                                    **probe_options)
    return accuracy(classifier, test_features, test_labels)
