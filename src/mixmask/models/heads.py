"""Projection heads."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear -> [BN] -> ReLU -> Linear. MoCo v2's projector (arXiv 2003.04297, sec. 3) is
    the BN-free two-layer MLP 2048-2048-128 on a ResNet-50."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)
