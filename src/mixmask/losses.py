"""Losses as pure functions of tensors; each returns a per-sample loss [B] unless stated.

Usage (MoCo v2 + MixMask, design.md sec. 2)::

    mix = sample_mixmask(x1, grid_size=8, generator=generator)
    clean = info_nce(f(x1), key, queue, temperature=0.2)
    mixed_q = f(mix.mixed_images)
    mixed = info_nce(mixed_q, key, queue, 0.2)
    switched = info_nce(mixed_q.flip(0), key, queue, 0.2)
    loss = weighted_mix_loss(clean, mixed, switched, mix.lam)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.masking import switched_lambda

__all__ = ["info_nce", "weighted_mix_loss"]


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: under AMP a matmul would run in half precision even on
    float32 inputs, and logits divided by a small temperature need float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def info_nce(
    query: Tensor, positive_key: Tensor, negative_keys: Tensor, temperature: float
) -> Tensor:
    """MoCo's InfoNCE (He et al. 2019, arXiv 1911.05722, eq. 1), per sample::

        L_i = -log( exp(q_i . k_i / T) / (exp(q_i . k_i / T) + sum_j exp(q_i . n_j / T)) )

    i.e. cross-entropy with target 0 over the logits ``[q_i . k_i, q_i . n_1..n_K] / T``.
    ``query`` and ``positive_key`` are [B, D], ``negative_keys`` [K, D] (MoCo's queue);
    all are L2-normalised here and the logits computed in float32 with autocast off.
    Gradients reach every input that has them; pass keys and queue detached, as MoCo does.

    Returns the per-sample loss [B] (float32).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (0.2 in MoCo v2), got {temperature}.")
    with _full_precision(query.device):
        query = F.normalize(query.float(), dim=1)
        positive_key = F.normalize(positive_key.float(), dim=1)
        negative_keys = F.normalize(negative_keys.float(), dim=1)
        positive_logits = (query * positive_key).sum(dim=1, keepdim=True)
        negative_logits = query @ negative_keys.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        # Cross-entropy with target 0, written out: no label tensor to build.
        return torch.logsumexp(logits, dim=1) - logits[:, 0]


def weighted_mix_loss(
    clean_loss: Tensor, mixed_loss: Tensor, switched_loss: Tensor, lam: Tensor
) -> Tensor:
    """MixMask's loss (arXiv 2210.11456; design.md sec. 2, step 6), averaged over the batch::

        mean_i [ L(q_i, k_i) + lam_i * L(q_mix_i, k_i) + (1 - lam_{B-1-i}) * L(q_sw_i, k_i) ]

    with ``q_sw = flip(q_mix, 0)``: each mixed view is credited to image i in proportion
    to the pixels image i holds in it (:func:`mixmask.masking.switched_lambda`). For one
    mask per batch, ``1 - lam_{B-1-i} = 1 - lam``, the reference's formula.

    All inputs are per-sample [B]; ``lam`` is [B] (or a 0-dim per-batch value).
    Returns a scalar.
    """
    switched_weight = 1.0 - lam if lam.dim() == 0 else switched_lambda(lam)
    total = clean_loss + lam * mixed_loss + switched_weight * switched_loss
    return total.mean()
