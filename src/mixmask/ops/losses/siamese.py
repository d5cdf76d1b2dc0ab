"""The Siamese bases' losses as pure functions of tensors; each returns a per-sample loss
[B] unless stated. MixMask's weighting of them is :func:`mixmask.ops.mixing.weighted_mix_loss`.

Usage (MoCo v2 + MixMask, arXiv 2210.11456; BEiT's block masks are drawn on the
host, so a CUDA step passes a CPU ``host_generator``)::

    mix = sample_mixmask(x1, grid_size=8, generator=generator, host_generator=cpu_generator)
    clean = info_nce(f(x1), key, queue, temperature=0.2)
    mixed_q = f(mix.mixed_images)
    mixed = info_nce(mixed_q, key, queue, 0.2)
    switched = info_nce(mixed_q.flip(0), key, queue, 0.2)
    loss = weighted_mix_loss(clean, mixed, switched, mix.lam)

Batch-level losses (Barlow Twins, VICReg) return a scalar; the same call holds with
those scalars, because ``flip(q_mix, 0)`` is a row permutation of ``q_mix`` and these
losses do not depend on the order of the rows (both inputs permuted alike)::

    switched = barlow_twins_loss(mixed_q.flip(0), target)   # 0-dim
    loss = weighted_mix_loss(clean, mixed, switched, mix.lam.mean())

Under torch.distributed, the batch-level losses reduce their statistics with the
autograd-aware collectives of ``torch.distributed.nn.functional``: every process returns
the loss of the global batch, and the gradient each process receives is ``world_size``
times its share, which DistributedDataParallel's gradient averaging cancels. The result:
DDP gradients equal the single-process gradients of the loss on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.ops.distributed import (
    all_gather_cat,
    all_reduce_sum,
    gather_all,
    world_size,
)
from mixmask.ops.tensors import autocast_off

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "info_nce",
    "moco_v3_loss",
    "nt_xent",
    "simsiam_loss",
    "vicreg_loss",
]

# BatchNorm1d's default epsilon: Barlow Twins normalises with BatchNorm1d(affine=False).
_BATCH_NORM_EPS = 1e-5


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
    _check_temperature(temperature, "0.2 in MoCo v2")
    with autocast_off(query.device):
        query = F.normalize(query.float(), dim=1)
        positive_key = F.normalize(positive_key.float(), dim=1)
        negative_keys = F.normalize(negative_keys.float(), dim=1)
        positive_logits = (query * positive_key).sum(dim=1, keepdim=True)
        negative_logits = query @ negative_keys.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        # Cross-entropy with target 0, written out: no label tensor to build.
        return torch.logsumexp(logits, dim=1) - logits[:, 0]


def nt_xent(online: Tensor, target: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709, eq. 1), per anchor of one
    direction: with z = ``online``, t = ``target`` (the other view of the same images), both
    L2-normalised, and the batch's 2N embeddings as candidates::

        L_i = -log( exp(z_i . t_i / T) / D_i ),
        D_i = sum_k exp(z_i . t_k / T) + sum_{k != i} exp(z_i . z_k / T)

    the reference's ``add_contrastive_loss`` (google-research/simclr, objective.py): the
    cross-entropy of ``[z t^T, z z^T - inf * I] / T`` with target i. Its loss is the sum of
    the two directions' means (z <-> t); a symmetric caller averages or sums them
    (solo-learn averages). Under torch.distributed the candidates are the global batch,
    gathered with the autograd-aware all_gather (as the reference's TPU cross-replica
    concatenation), each process's anchors at its rank's rows; local batches must be equal.
    Gradients reach both inputs (one network embeds both views). Float32, autocast off.

    Returns the per-sample loss [B] (float32).
    """
    _check_temperature(temperature, "0.5 in SimCLR's CIFAR setting")
    _check_pair(online, target)
    with autocast_off(online.device):
        online = F.normalize(online.float(), dim=1)
        target = F.normalize(target.float(), dim=1)
        all_online, all_target = all_gather_cat(online), all_gather_cat(target)
        rows, own = _own_rows(online.shape[0], all_online.shape[0], online.device)
        to_target = online @ all_target.T / temperature
        to_online = online @ all_online.T / temperature
        to_online[rows, own] = float("-inf")  # an anchor is not its own negative
        logits = torch.cat([to_target, to_online], dim=1)
        return torch.logsumexp(logits, dim=1) - to_target[rows, own]


def moco_v3_loss(query: Tensor, key: Tensor, temperature: float) -> Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, arXiv 2104.02057, sec. 3 / Alg. 1),
    per sample: the keys of the (global) batch are the candidates, no queue::

        L_i = 2T * ( logsumexp_j (q_i . k_j / T) - q_i . k_i / T )

    as the reference's ``contrastive_loss`` (facebookresearch/moco-v3, moco/builder.py):
    cross-entropy of ``q k^T / T`` with target i, times ``2 * T`` (the reference's scaling,
    which keeps the gradient's size across temperatures). Both inputs L2-normalised here;
    under torch.distributed the keys are gathered from every process without gradient
    (they come from the momentum encoder), each process's queries at its rank's rows. Float32,
    autocast off.

    Returns the per-sample loss [B] (float32).
    """
    _check_temperature(temperature, "1.0 for MoCo v3's ResNet-50")
    _check_pair(query, key)
    with autocast_off(query.device):
        query = F.normalize(query.float(), dim=1)
        keys = gather_all(F.normalize(key.float(), dim=1))
        rows, own = _own_rows(query.shape[0], keys.shape[0], query.device)
        logits = query @ keys.T / temperature
        return 2 * temperature * (torch.logsumexp(logits, dim=1) - logits[rows, own])


def _check_temperature(temperature: float, example: str) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive ({example}), got {temperature}.")


def _own_rows(local: int, gathered: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(0..local-1, each local row's index among the rows gathered from every process):
    process r's rows follow those of processes 0..r-1, so all must hold the same count."""
    if gathered != local * world_size():
        raise ValueError("a loss over the global batch needs the same batch size on every "
                         "process.")
    rows = torch.arange(local, device=device)
    rank = torch.distributed.get_rank() if world_size() > 1 else 0
    return rows, rows + rank * local


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's regression loss (Grill et al. 2020, arXiv 2006.07733, eq. 2), per sample::

        L_i = || p_i / ||p_i|| - z'_i / ||z'_i|| ||^2 = 2 - 2 * cos(p_i, z'_i)

    ``prediction`` is the online predictor's output p, ``target`` the target projection z'
    (EMA encoder), both [B, D] and L2-normalised here, in float32 with autocast off. Values
    lie in [0, 4]. Pass the target detached; BYOL symmetrises by swapping the views::

        loss = (byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())).mean()

    Returns the per-sample loss [B] (float32).
    """
    return 2.0 - 2.0 * _cosine_similarity(prediction, target)


def simsiam_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """SimSiam's negative cosine similarity (Chen & He 2020, arXiv 2011.10566, eq. 1)::

        D(p_i, z_i) = - p_i / ||p_i|| . z_i / ||z_i||

    per sample, in [-1, 1]. The stop-gradient of eq. 3 is the caller's: this function
    does not detach, so pass ``target`` detached (``z.detach()``) as the paper does::

        loss = 0.5 * (simsiam_loss(p1, z2.detach()) + simsiam_loss(p2, z1.detach())).mean()

    Inputs [B, D] are L2-normalised here, in float32 with autocast off.
    Returns the per-sample loss [B] (float32).
    """
    return -_cosine_similarity(prediction, target)


def barlow_twins_loss(
    online: Tensor, target: Tensor, lambda_offdiag: float = 0.0051, scale: float = 1.0
) -> Tensor:
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, arXiv 2103.03230, eq. 1)::

        C_ij = sum_b zn_bi * zn'_bj / N
        L = scale * ( sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2 )

    where ``zn`` is ``online`` [N, D] normalised per dimension over the batch,
    ``(z - mean) / sqrt(var + 1e-5)`` with the biased variance, as the reference's
    ``BatchNorm1d(affine=False)`` does, and likewise ``zn'`` for ``target``. ``N`` is the
    global batch: under torch.distributed the means, variances and the cross-correlation
    are summed over all processes with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` (an in-place all_reduce, as some
    libraries use, leaves gradients 1/world_size too small); on one process no collective
    runs. Local batch sizes may differ between processes. ``target`` may be detached or
    not; the paper passes both views with gradient (shared weights). Computed in float32
    with autocast off. Usage::

        loss = barlow_twins_loss(projector(f(x1)), projector(f(x2)))

    The loss does not depend on the order of the rows (both inputs permuted alike), which
    is what lets MixMask's switched term use it. Returns a scalar (float32).
    """
    _check_pair(online, target)
    with autocast_off(online.device):
        online, target = online.float(), target.float()
        local_count, dim = online.shape
        # Two collectives: [sums, count], then [cross products, squared deviations].
        sums = all_reduce_sum(
            torch.cat([online.sum(0), target.sum(0), online.new_full((1,), local_count)])
        )
        count = sums[2 * dim]
        online_centred = online - sums[:dim] / count
        target_centred = target - sums[dim:2 * dim] / count
        reduced = all_reduce_sum(
            torch.cat([
                (online_centred.T @ target_centred).flatten(),
                online_centred.square().sum(0),
                target_centred.square().sum(0),
            ])
        )
        cross = reduced[:dim * dim].view(dim, dim)
        online_std = torch.sqrt(reduced[dim * dim:dim * dim + dim] / count + _BATCH_NORM_EPS)
        target_std = torch.sqrt(reduced[dim * dim + dim:] / count + _BATCH_NORM_EPS)
        # C_ij = sum_b (z_bi - m_i)(z'_bj - m'_j) / (N s_i s'_j): normalising after the sum.
        correlation = cross / (count * torch.outer(online_std, target_std))
        on_diagonal = (1.0 - torch.diagonal(correlation)).square().sum()
        off_diagonal = _off_diagonal(correlation).square().sum()
        return scale * (on_diagonal + lambda_offdiag * off_diagonal)


def vicreg_loss(
    online: Tensor,
    target: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg (Bardes et al. 2021, arXiv 2105.04906, eqs. 1-6) on embeddings [N, D]::

        invariance = mean_{b,k} (z_bk - z'_bk)^2                              (eq. 5)
        variance   = ( v(z) + v(z') ) / 2,  v(z) = mean_k max(0, 1 - sqrt(Var(z_.k) + eps))
        covariance = c(z) + c(z'),          c(z) = sum_{i != j} Cov(z)_ij^2 / D   (eq. 4)
        loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance

    with the unbiased variance and covariance over the batch, gamma = 1 (eq. 1). As in
    the reference code, the variance term averages the two branches (the paper's eq. 6
    sums them) and the covariance term sums them; the weights 25 / 25 / 1 are the paper's.

    Under torch.distributed all three terms are computed on the global batch, gathered
    with the autograd-aware ``torch.distributed.nn.functional.all_gather`` (the reference
    gathers for variance and covariance; the invariance term's gradient is the same
    either way, and gathering it too makes every process return the same loss). Local
    batch sizes must then be equal. ``target`` may be detached or not (the paper passes
    both with gradient). Computed in float32 with autocast off. Usage::

        loss, terms = vicreg_loss(projector(f(x1)), projector(f(x2)))

    Returns the weighted total (scalar) and the unweighted terms
    ``{"invariance", "variance", "covariance"}`` (scalars, float32).
    """
    _check_pair(online, target)
    if online.shape[0] * world_size() < 2:
        raise ValueError("vicreg_loss needs at least 2 samples in the (global) batch to "
                         "estimate variances; use a larger batch.")
    with autocast_off(online.device):
        online = all_gather_cat(online.float())
        target = all_gather_cat(target.float())
        invariance = F.mse_loss(online, target)
        variance = 0.5 * (_variance_hinge(online, eps) + _variance_hinge(target, eps))
        covariance = _covariance_penalty(online) + _covariance_penalty(target)
        total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
        return total, {"invariance": invariance, "variance": variance, "covariance": covariance}


def _cosine_similarity(first: Tensor, second: Tensor) -> Tensor:
    """Row-wise cosine similarity [B] of two [B, D] tensors, in float32."""
    _check_pair(first, second)
    with autocast_off(first.device):
        first = F.normalize(first.float(), dim=1)
        second = F.normalize(second.float(), dim=1)
        return (first * second).sum(dim=1)


def _check_pair(first: Tensor, second: Tensor) -> None:
    if first.dim() != 2 or first.shape != second.shape:
        raise ValueError(
            "Expected two embeddings of the same shape [batch, dim], got "
            f"{tuple(first.shape)} and {tuple(second.shape)}."
        )


def _off_diagonal(square: Tensor) -> Tensor:
    """The n * (n - 1) off-diagonal entries of an [n, n] matrix, flattened (the Barlow
    Twins reference's trick: drop the last entry, then every row of n + 1 starts with a
    diagonal entry)."""
    n = square.shape[0]
    return square.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _variance_hinge(embedding: Tensor, eps: float) -> Tensor:
    """VICReg's v(Z) (eq. 1) with gamma = 1: mean_k max(0, 1 - sqrt(Var(z_.k) + eps))."""
    std = torch.sqrt(embedding.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def _covariance_penalty(embedding: Tensor) -> Tensor:
    """VICReg's c(Z) (eqs. 3-4): squared off-diagonal covariances summed, divided by D."""
    count, dim = embedding.shape
    centred = embedding - embedding.mean(dim=0)
    covariance = centred.T @ centred / (count - 1)
    return _off_diagonal(covariance).square().sum() / dim


