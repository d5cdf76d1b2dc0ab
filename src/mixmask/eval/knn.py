"""Weighted kNN classifier on frozen features (Wu et al. 2018, InstDisc, sec. 3.4).

Each of the k nearest training features (cosine similarity s) votes for its class with
weight exp(s / t); the class with the largest summed vote wins. k=200, t=0.1 as in the
MoCo CIFAR monitor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.1,
                chunk_size: int = 1024) -> Tensor:
    """Predicted class [N_test] for each test feature."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        similarity, neighbour = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[neighbour], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
             test_labels: Tensor, *, num_classes: int, k: int = 200,
             temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent."""
    predicted = knn_predict(train_features, train_labels, test_features,
                            num_classes=num_classes, k=k, temperature=temperature)
    return 100.0 * (predicted == test_labels).float().mean().item()
