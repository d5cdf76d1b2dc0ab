"""SiameseIM's dense loss: the UniGrad objective (Tao et al., "Exploring the Equivalence of
Siamese Self-Supervised Learning via A Unified Gradient Framework", arXiv 2112.05141, as used
by SiameseIM, arXiv 2206.01204; reference ``fundamentalvision/Siamese-Image-Modeling``,
``models_sim.py: SiameseIMViT.compute_unigrad_loss``).

    >>> loss = unigrad_loss(prediction, target)                       # [B, T, D] each
    >>> loss = unigrad_loss(prediction, target, all_reduce=mean_over_ranks)   # under DDP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["unigrad_loss"]


def unigrad_loss(
    prediction: Tensor,
    target: Tensor,
    *,
    negative_weight: float = 0.02,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The UniGrad loss of predictions against targets, a float32 scalar::

        t_n <- LayerNorm(t_n)                     (no affine, eps 1e-5; no gradient)
        P    = mean_n ||p_n - t_n||^2             (alignment)
        C    = (1 / N) sum_n t_n t_n^T            (target correlation, D x D; no gradient)
        Q    = mean_n p_n^T C p_n                 (decorrelation against the targets)
        loss = (P + negative_weight * Q) / D

    Its gradient in ``p_n`` is proportional to ``(p_n - t_n) + negative_weight * C p_n``:
    UniGrad's "positive" pull towards the target plus a push away from the directions the
    targets crowd into, which stands in for negatives (arXiv 2112.05141). SiameseIM
    uses it with ``negative_weight = 0.02`` (its ``--neg_weight``) and without a normalisation
    of the prediction (its ``student_norm`` is the identity as ``online_ln=False``).

    The target normalisation is the reference's ``teacher_norm``, ``LayerNorm(D,
    elementwise_affine=False)`` with ``nn.LayerNorm``'s default ``eps = 1e-5``. Everything
    runs in float32 with autocast off, as the reference calls it under
    ``autocast(enabled=False)`` on ``.float()`` inputs: ``C`` and the squared norms lose too
    much in half precision.

    prediction, target: ``[N, D]`` or ``[B, T, D]`` (all leading axes are tokens, N = B T).
    all_reduce: under data parallelism, a function returning the mean of its tensor over all
    processes; it is called once, on ``C``, so that ``C`` is the global batch's correlation
    (the reference sums with ``dist.all_reduce`` and divides by the world size). ``None``
    (default): a single process, no reduction (the reference would call ``all_reduce``
    unconditionally, which fails without a process group).
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}."
        )
    if prediction.dim() < 2:
        raise ValueError(
            f"prediction must have shape [N, D] or [B, T, D], got {tuple(prediction.shape)}."
        )
    channels = prediction.shape[-1]
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        tokens_prediction = prediction.float().reshape(-1, channels)
        with torch.no_grad():
            tokens_target = F.layer_norm(target.float().reshape(-1, channels), (channels,))
            correlation = tokens_target.T @ tokens_target / tokens_target.shape[0]
            if all_reduce is not None:
                correlation = all_reduce(correlation)
        alignment = (tokens_prediction - tokens_target).square().sum(dim=1).mean()
        # p^T C p per token without the reference's N x N product (its diagonal).
        decorrelation = ((tokens_prediction @ correlation) * tokens_prediction).sum(dim=1).mean()
        return (alignment + negative_weight * decorrelation) / channels
