"""Weighted kNN classifier on frozen features (Wu et al. 2018, InstDisc, sec. 3.4).

Each of the k nearest training features (cosine similarity s) votes for its class with
weight exp(s / t); classes are ranked by their summed vote (top-1: the largest; top-5: the
five largest). k=200, t=0.1 as in the MoCo CIFAR monitor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.eval.accuracy import topk_accuracy


@torch.no_grad()
def knn_votes(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
              num_classes: int, k: int = 200, temperature: float = 0.1,
              chunk_size: int = 1024) -> Tensor:
    """Summed votes [N_test, num_classes], computed on the features' device in chunks of
    test queries (one matrix product per chunk, no per-sample loop)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    votes = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        similarity, neighbour = (queries @ bank.T).topk(k, dim=1)
        chunk = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        chunk.scatter_add_(1, train_labels[neighbour], (similarity / temperature).exp())
        votes.append(chunk)
    return torch.cat(votes)


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.1) -> Tensor:
    """Predicted class [N_test] for each test feature."""
    return knn_votes(train_features, train_labels, test_features, num_classes=num_classes,
                     k=k, temperature=temperature).argmax(dim=1)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict[int, float]:
    """Top-1 and top-5 accuracy in percent, ``{1: ..., 5: ...}``."""
    votes = knn_votes(train_features, train_labels, test_features, num_classes=num_classes,
                      k=k, temperature=temperature)
    return topk_accuracy(votes, test_labels, (1, 5))


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
             test_labels: Tensor, *, num_classes: int, k: int = 200,
             temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent."""
    return knn_accuracy(train_features, train_labels, test_features, test_labels,
                        num_classes=num_classes, k=k, temperature=temperature)[1]
