"""Projection and prediction heads (MLPs), sized by each paper's defaults in its config."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers with [BN] + ReLU between them, optionally a BN without
    affine parameters on the output.

    - MoCo v2 projector (arXiv 2003.04297, sec. 3): 2 layers, no BN (2048-2048-128 on R-50).
    - BYOL projector and predictor (arXiv 2006.07733, sec. 3.3): 2 layers with BN, 4096-256.
    - SimSiam CIFAR projector (arXiv 2011.10566, app. D): 2 layers with BN and an output BN;
      predictor: 2 layers, BN on the hidden layer only (bottleneck 512).
    - Barlow Twins / VICReg projectors (arXiv 2103.03230, 2105.04906): 3 layers with BN.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, batch_norm: bool = False,
                 num_layers: int = 2, output_batch_norm: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            # No bias before BN: BN's shift makes it redundant.
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=not output_batch_norm))
        if output_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
