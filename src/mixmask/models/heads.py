"""Projection and prediction heads (MLPs), sized by each paper's defaults in its config."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers with [BN] + ReLU between them, optionally a BN on the
    output: without affine parameters, or (``output_scale``) with a learnt scale only.

    - MoCo v2 projector (arXiv 2003.04297, sec. 3): 2 layers, no BN (2048-2048-128 on R-50).
    - BYOL projector and predictor (arXiv 2006.07733, sec. 3.3): 2 layers with BN, 4096-256.
    - SimSiam CIFAR projector (arXiv 2011.10566, app. D): 2 layers with BN and an output BN;
      predictor: 2 layers, BN on the hidden layer only (bottleneck 512).
    - Barlow Twins / VICReg projectors (arXiv 2103.03230, 2105.04906): 3 layers with BN.
    - SimCLR's projector (arXiv 2002.05709; the reference's ``projection_head``): BN on
      every layer, the output's with a scale and no shift (``linear_layer(...,
      use_bn=True)``, ``center=False`` where there is no bias).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, batch_norm: bool = False,
                 num_layers: int = 2, output_batch_norm: bool = False,
                 output_scale: bool = False):
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
            output_norm = nn.BatchNorm1d(out_dim, affine=output_scale)
            if output_scale:  # a learnt scale and no shift: SimCLR's BN with center=False
                output_norm.bias.requires_grad_(False)
            layers.append(output_norm)
        super().__init__(*layers)


class NormalizedLinear(nn.Module):
    """A bias-free Linear whose weight is weight-normalised per output unit (Salimans &
    Kingma 2016): ``W[k] = g[k] v[k] / ||v[k]||``, as ``nn.utils.weight_norm(nn.Linear(...))``
    in DINO's head. ``gain`` (g) starts at 1; frozen there it makes every prototype a unit
    vector (DINO's ``norm_last_layer=True``). Written out rather than through torch's
    weight-norm parametrisation so the EMA teacher, checkpoints and ``torch.compile`` see
    two plain parameters."""

    def __init__(self, in_dim: int, out_dim: int, *, train_gain: bool = False):
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init, which DINO's weight_norm wrapper starts from.
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_gain)

    def forward(self, inputs: Tensor) -> Tensor:
        weight = self.gain * self.direction / self.direction.norm(dim=1, keepdim=True)
        return F.linear(inputs, weight)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, arXiv 2104.14294, app. "Projection head";
    ``vision_transformer.py: DINOHead``): an MLP of ``num_layers`` Linear layers (GELU
    between, BN if ``batch_norm``) to a ``bottleneck_dim`` embedding, L2-normalised, then a
    weight-normalised Linear to ``num_prototypes`` logits (``last_layer``). Linear weights
    ~ trunc_normal(std 0.02), biases 0, as the reference initialises them. Defaults: the
    paper's (2048 hidden, 256 bottleneck, 65,536 prototypes). iBOT's head is the same
    (its patch tokens may have their own last layer)."""

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_prototypes: int = 65536, num_layers: int = 3, batch_norm: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, num_prototypes,
                                           train_gain=not norm_last_layer)

    def bottleneck(self, features: Tensor) -> Tensor:
        """The L2-normalised bottleneck embedding [..., bottleneck_dim] of features
        [..., in_dim] (tokens [B, N, D] are flattened, so BN sees every token)."""
        flat = self.mlp(features.reshape(-1, features.shape[-1]))
        return F.normalize(flat, dim=-1).reshape(*features.shape[:-1], -1)

    def forward(self, features: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(features))
