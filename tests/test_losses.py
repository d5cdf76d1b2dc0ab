"""Tests for mixmask.ops.losses.siamese against hand-computed values."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import free_port
from host_sync import HostSyncRecorder
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixmask.ops.losses.siamese import (
    barlow_twins_loss,
    byol_loss,
    info_nce,
    simsiam_loss,
    vicreg_loss,
)
from mixmask.ops.mixing import weighted_mix_loss


def nce_by_hand(positive: float, negatives: list[float], temperature: float) -> float:
    """-log(exp(pos / T) / (exp(pos / T) + sum_j exp(neg_j / T))) on plain floats."""
    numerator = math.exp(positive / temperature)
    denominator = numerator + sum(math.exp(n / temperature) for n in negatives)
    return -math.log(numerator / denominator)


def tiny_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Unnormalised on purpose: after L2 normalisation
    # q0 = (0.6, 0.8), k0 = (1, 0); q1 = (0, -1), k1 = (0, -1);
    # negatives n0 = (0, 1), n1 = (-1, 0).
    query = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    positive_key = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    negative_keys = torch.tensor([[0.0, 2.0], [-0.5, 0.0]])
    return query, positive_key, negative_keys


def test_info_nce_matches_hand_computation():
    query, positive_key, negative_keys = tiny_example()
    loss = info_nce(query, positive_key, negative_keys, temperature=0.5)
    # Sample 0: q0.k0 = 0.6, q0.n0 = 0.8, q0.n1 = -0.6.
    # Sample 1: q1.k1 = 1.0, q1.n0 = -1.0, q1.n1 = 0.0.
    expected = [nce_by_hand(0.6, [0.8, -0.6], 0.5), nce_by_hand(1.0, [-1.0, 0.0], 0.5)]
    assert loss.shape == (2,)
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_info_nce_temperature_scaling():
    query, positive_key, negative_keys = tiny_example()
    for temperature in (0.07, 0.2, 1.0, 3.0):
        loss = info_nce(query, positive_key, negative_keys, temperature)
        expected = [
            nce_by_hand(0.6, [0.8, -0.6], temperature),
            nce_by_hand(1.0, [-1.0, 0.0], temperature),
        ]
        # abs: a loss near 1e-7 is below float32 resolution of the log-sum-exp.
        assert loss.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # A very high temperature flattens the logits: the loss tends to log(K + 1).
    flat = info_nce(query, positive_key, negative_keys, temperature=1e6)
    assert flat.tolist() == pytest.approx([math.log(3)] * 2, rel=1e-5)
    # Sample 1's positive is its best match: a low temperature drives its loss to 0.
    sharp = info_nce(query, positive_key, negative_keys, temperature=0.01)
    assert sharp[1].item() < 1e-6


def test_info_nce_gradient_reaches_the_query():
    query, positive_key, negative_keys = tiny_example()
    query.requires_grad_(True)
    info_nce(query, positive_key, negative_keys, 0.2).sum().backward()
    assert query.grad is not None
    assert torch.isfinite(query.grad).all()
    assert query.grad.abs().sum() > 0
    # Normalisation inside: the gradient is orthogonal to each query vector.
    radial = (query.grad * query.detach()).sum(dim=1)
    assert torch.allclose(radial, torch.zeros(2), atol=1e-6)


def test_info_nce_is_float32_under_low_precision_inputs_and_autocast():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(8, 16, generator=generator)
    positive_key = torch.randn(8, 16, generator=generator)
    negative_keys = torch.randn(32, 16, generator=generator)
    reference = info_nce(query, positive_key, negative_keys, 0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = info_nce(query, positive_key, negative_keys, 0.1)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, reference, atol=1e-5)
    low = info_nce(query.bfloat16(), positive_key.bfloat16(), negative_keys.bfloat16(), 0.1)
    assert low.dtype == torch.float32


def test_info_nce_rejects_nonpositive_temperature():
    query, positive_key, negative_keys = tiny_example()
    with pytest.raises(ValueError, match="temperature"):
        info_nce(query, positive_key, negative_keys, 0.0)


def test_losses_never_read_values_back_to_the_host():
    query, positive_key, negative_keys = tiny_example()
    query.requires_grad_(True)
    with HostSyncRecorder() as recorder:
        per_sample = info_nce(query, positive_key, negative_keys, 0.2)
        weighted_mix_loss(per_sample, per_sample, per_sample, torch.tensor([0.3, 0.6])).backward()
    assert recorder.syncing_ops == []
    with HostSyncRecorder() as recorder:
        per_sample.sum().item()
    assert recorder.syncing_ops == ["aten::_local_scalar_dense"]


def test_weighted_mix_loss_per_batch_lambda():
    clean = torch.tensor([1.0, 2.0])
    mixed = torch.tensor([3.0, 4.0])
    switched = torch.tensor([5.0, 6.0])
    lam = torch.tensor([0.4, 0.4])
    # Sample 0: 1 + 0.4 * 3 + 0.6 * 5 = 5.2; sample 1: 2 + 0.4 * 4 + 0.6 * 6 = 7.2.
    loss = weighted_mix_loss(clean, mixed, switched, lam)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((5.2 + 7.2) / 2)
    # The same value from a 0-dim lambda.
    assert weighted_mix_loss(clean, mixed, switched, torch.tensor(0.4)).item() == pytest.approx(6.2)


def test_weighted_mix_loss_per_sample_lambda():
    clean = torch.tensor([1.0, 2.0, 3.0])
    mixed = torch.tensor([4.0, 5.0, 6.0])
    switched = torch.tensor([7.0, 8.0, 9.0])
    lam = torch.tensor([0.25, 0.5, 0.875])
    # Switched weights 1 - lam[B-1-i] = (1 - 0.875, 1 - 0.5, 1 - 0.25) = (0.125, 0.5, 0.75).
    # Sample 0: 1 + 0.25 * 4 + 0.125 * 7 = 2.875
    # Sample 1: 2 + 0.5 * 5 + 0.5 * 8 = 8.5
    # Sample 2: 3 + 0.875 * 6 + 0.75 * 9 = 15.0
    loss = weighted_mix_loss(clean, mixed, switched, lam)
    assert loss.item() == pytest.approx((2.875 + 8.5 + 15.0) / 3)


def test_weighted_mix_loss_gradients_follow_the_weights():
    clean = torch.zeros(3, requires_grad=True)
    mixed = torch.zeros(3, requires_grad=True)
    switched = torch.zeros(3, requires_grad=True)
    lam = torch.tensor([0.25, 0.5, 0.875])
    weighted_mix_loss(clean, mixed, switched, lam).backward()
    assert clean.grad.tolist() == pytest.approx([1 / 3] * 3)
    assert mixed.grad.tolist() == pytest.approx([0.25 / 3, 0.5 / 3, 0.875 / 3])
    assert switched.grad.tolist() == pytest.approx([0.125 / 3, 0.5 / 3, 0.75 / 3])


def test_weighted_mix_loss_explicit_switched_weight():
    # A random partner: mix j = M_j x_j + (1 - M_j) x_partner[j], partner = (1, 2, 0), so
    # inverse_partner = (2, 0, 1) and the switched weights are 1 - lam[inverse_partner].
    clean = torch.tensor([1.0, 2.0, 3.0])
    mixed = torch.tensor([4.0, 5.0, 6.0])
    switched = torch.tensor([7.0, 8.0, 9.0])
    lam = torch.tensor([0.25, 0.5, 0.875])
    switched_weight = torch.tensor([0.125, 0.75, 0.5])
    # Sample 0: 1 + 0.25 * 4 + 0.125 * 7 = 2.875
    # Sample 1: 2 + 0.5 * 5 + 0.75 * 8 = 10.5
    # Sample 2: 3 + 0.875 * 6 + 0.5 * 9 = 12.75
    loss = weighted_mix_loss(clean, mixed, switched, lam, switched_weight=switched_weight)
    assert loss.item() == pytest.approx((2.875 + 10.5 + 12.75) / 3)


def test_weighted_mix_loss_batch_level_losses():
    clean, mixed, switched = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    # 0-dim lambda: 1 + 0.25 * 2 + 0.75 * 4 = 4.5.
    loss = weighted_mix_loss(clean, mixed, switched, torch.tensor(0.25))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(4.5)
    # Per-sample lambdas: the batch means, 1 + 0.5 * 2 + 0.5 * 4 = 4.
    per_sample = weighted_mix_loss(clean, mixed, switched, torch.tensor([0.25, 0.5, 0.75]))
    assert per_sample.shape == ()
    assert per_sample.item() == pytest.approx(4.0)
    # An explicit switched weight: 1 + 0.25 * 2 + 0.5 * 4 = 3.5.
    explicit = weighted_mix_loss(clean, mixed, switched, torch.tensor(0.25), torch.tensor(0.5))
    assert explicit.item() == pytest.approx(3.5)


# ---- BYOL and SimSiam ------------------------------------------------------------------

def cosine_by_hand(first: list[float], second: list[float]) -> float:
    dot = sum(a * b for a, b in zip(first, second, strict=True))
    return dot / math.sqrt(sum(a * a for a in first)) / math.sqrt(sum(b * b for b in second))


PREDICTIONS = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]
TARGETS = [[4.0, 3.0], [-1.0, 0.0], [0.0, 5.0]]


def test_byol_loss_matches_hand_computation():
    loss = byol_loss(torch.tensor(PREDICTIONS), torch.tensor(TARGETS))
    # cos = 24 / 25 = 0.96, -1, 1: 2 - 2 cos = 0.08, 4, 0.
    expected = [2 - 2 * cosine_by_hand(p, z) for p, z in zip(PREDICTIONS, TARGETS, strict=True)]
    assert expected == pytest.approx([0.08, 4.0, 0.0])
    assert loss.shape == (3,)
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    # It is the squared distance of the normalised vectors (BYOL eq. 2).
    for p, z, value in zip(PREDICTIONS, TARGETS, loss.tolist(), strict=True):
        p_norm, z_norm = math.hypot(*p), math.hypot(*z)
        distance = sum((a / p_norm - b / z_norm) ** 2 for a, b in zip(p, z, strict=True))
        assert value == pytest.approx(distance, abs=1e-6)


def test_byol_loss_lies_in_zero_to_four():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(64, 8, generator=generator) * 10
    target = torch.randn(64, 8, generator=generator) * 0.1
    loss = byol_loss(prediction, target)
    assert (loss >= 0).all() and (loss <= 4).all()
    assert byol_loss(prediction, 3 * prediction).abs().max() < 1e-5
    assert byol_loss(prediction, -prediction).tolist() == pytest.approx([4.0] * 64)


def test_simsiam_loss_matches_hand_computation():
    loss = simsiam_loss(torch.tensor(PREDICTIONS), torch.tensor(TARGETS))
    expected = [-cosine_by_hand(p, z) for p, z in zip(PREDICTIONS, TARGETS, strict=True)]
    assert expected == pytest.approx([-0.96, 1.0, -1.0])
    assert loss.shape == (3,)
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_simsiam_gradient_reaches_only_the_prediction_when_the_target_is_detached():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, generator=generator, requires_grad=True)
    inputs = torch.randn(5, 4, generator=generator)
    projection = inputs @ weight  # z: shares weights with the prediction's branch
    prediction = torch.randn(5, 4, generator=generator, requires_grad=True)
    simsiam_loss(prediction, projection.detach()).mean().backward()
    assert weight.grad is None  # stop-gradient: nothing through the target branch
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    # Nothing is detached inside: an undetached target does receive a gradient.
    simsiam_loss(prediction, projection).mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---- Barlow Twins ----------------------------------------------------------------------

def barlow_twins_by_hand(online, target, lambda_offdiag, eps=1e-5):
    """Eq. 1 with explicit loops: batch-normalise each column (biased variance, BatchNorm1d's
    eps), C_ij = sum_b a_bi b_bj / N, on-diagonal (1 - C_ii)^2 plus weighted C_ij^2."""
    count, dim = len(online), len(online[0])

    def normalise(rows):
        columns = []
        for k in range(dim):
            column = [row[k] for row in rows]
            mean = sum(column) / count
            variance = sum((v - mean) ** 2 for v in column) / count
            columns.append([(v - mean) / math.sqrt(variance + eps) for v in column])
        return columns  # columns[k][b]

    a, b = normalise(online), normalise(target)
    loss = 0.0
    for i in range(dim):
        for j in range(dim):
            c_ij = sum(a[i][n] * b[j][n] for n in range(count)) / count
            loss += (1 - c_ij) ** 2 if i == j else lambda_offdiag * c_ij**2
    return loss


# Columns with mean 0, biased variance 1 and no correlation: after normalisation C = I.
DECORRELATED = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]


def test_barlow_twins_identical_decorrelated_inputs_give_zero():
    embedding = torch.tensor(DECORRELATED)
    loss = barlow_twins_loss(embedding, embedding)
    assert loss.shape == ()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    # Shifting and scaling a column changes nothing (normalised along the batch).
    affine = embedding * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -2.0])
    assert barlow_twins_loss(affine, embedding).item() == pytest.approx(0.0, abs=1e-8)


def test_barlow_twins_known_cross_correlation():
    embedding = torch.tensor(DECORRELATED)
    # Columns swapped: C = [[0, 1], [1, 0]]: on-diagonal 2 * 1, off-diagonal 2 * 1.
    swapped = embedding.flip(1)
    assert barlow_twins_loss(embedding, swapped, lambda_offdiag=0.5).item() == pytest.approx(
        2 + 0.5 * 2, rel=1e-4
    )
    # Negated: C = -I, on-diagonal 2 * (1 - (-1))^2 = 8, times scale.
    assert barlow_twins_loss(embedding, -embedding, scale=0.25).item() == pytest.approx(
        0.25 * 8, rel=1e-4
    )


def test_barlow_twins_matches_hand_computation():
    online = [[0.5, -1.0, 2.0], [1.5, 0.0, -1.0], [-0.5, 2.0, 0.5]]
    target = [[1.0, 0.5, 0.0], [0.0, -1.5, 1.0], [2.0, 1.0, -0.5]]
    for lambda_offdiag in (0.0051, 1.0):
        expected = barlow_twins_by_hand(online, target, lambda_offdiag)
        loss = barlow_twins_loss(torch.tensor(online), torch.tensor(target), lambda_offdiag)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    scaled = barlow_twins_loss(torch.tensor(online), torch.tensor(target), 1.0, scale=0.1)
    assert scaled.item() == pytest.approx(0.1 * barlow_twins_by_hand(online, target, 1.0),
                                          rel=1e-5)


# ---- VICReg ----------------------------------------------------------------------------

def vicreg_terms_by_hand(online, target, eps=1e-4):
    """Eqs. 1-5 with explicit loops: invariance MSE, variance hinge on the unbiased std
    averaged over the two branches, squared off-diagonal covariances / D summed."""
    count, dim = len(online), len(online[0])
    invariance = sum(
        (online[n][k] - target[n][k]) ** 2 for n in range(count) for k in range(dim)
    ) / (count * dim)

    def variance_and_covariance(rows):
        means = [sum(row[k] for row in rows) / count for k in range(dim)]
        covariance = [
            [
                sum((row[i] - means[i]) * (row[j] - means[j]) for row in rows) / (count - 1)
                for j in range(dim)
            ]
            for i in range(dim)
        ]
        hinge = sum(max(0.0, 1 - math.sqrt(covariance[k][k] + eps)) for k in range(dim)) / dim
        off_diagonal = sum(
            covariance[i][j] ** 2 for i in range(dim) for j in range(dim) if i != j
        ) / dim
        return hinge, off_diagonal

    online_hinge, online_cov = variance_and_covariance(online)
    target_hinge, target_cov = variance_and_covariance(target)
    return invariance, (online_hinge + target_hinge) / 2, online_cov + target_cov


VICREG_ONLINE = [[0.1, 0.5], [0.3, -0.2], [0.2, 0.4]]  # small spread: the hinge is active
VICREG_TARGET = [[2.0, 0.0], [0.0, 1.0], [-1.0, 3.0]]  # one column with std > 1


def test_vicreg_terms_match_hand_computation():
    invariance, variance, covariance = vicreg_terms_by_hand(VICREG_ONLINE, VICREG_TARGET)
    # Invariance by hand: differences (-1.9, 0.5), (0.3, -1.2), (1.2, -2.6);
    # squares 3.61 + 0.25 + 0.09 + 1.44 + 1.44 + 6.76 = 13.59, over 6 values.
    assert invariance == pytest.approx(13.59 / 6)
    total, terms = vicreg_loss(torch.tensor(VICREG_ONLINE), torch.tensor(VICREG_TARGET))
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert terms["invariance"].item() == pytest.approx(invariance, rel=1e-6)
    assert terms["variance"].item() == pytest.approx(variance, rel=1e-5)
    assert terms["covariance"].item() == pytest.approx(covariance, rel=1e-5)
    assert total.shape == ()
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(25 * invariance + 25 * variance + covariance, rel=1e-5)
    weighted, _ = vicreg_loss(torch.tensor(VICREG_ONLINE), torch.tensor(VICREG_TARGET),
                              sim_weight=1.0, var_weight=2.0, cov_weight=3.0)
    assert weighted.item() == pytest.approx(invariance + 2 * variance + 3 * covariance,
                                            rel=1e-5)


def test_vicreg_each_term_in_isolation():
    # Identical, spread out, decorrelated inputs: every term is (about) zero.
    spread = torch.tensor(DECORRELATED) * 2.0  # unbiased std 2 * sqrt(4 / 3) > 1
    total, terms = vicreg_loss(spread, spread)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    # Only the invariance: a constant shift keeps variances and covariances.
    _, terms = vicreg_loss(spread, spread + 1.0)
    assert terms["invariance"].item() == pytest.approx(1.0)
    assert terms["variance"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["covariance"].item() == pytest.approx(0.0, abs=1e-6)
    # Collapsed embeddings: std = sqrt(eps) in every dimension, hinge 1 - 0.01 per branch.
    collapsed = torch.ones(4, 3)
    _, terms = vicreg_loss(collapsed, collapsed)
    assert terms["variance"].item() == pytest.approx(0.99, rel=1e-6)
    assert terms["covariance"].item() == pytest.approx(0.0, abs=1e-8)
    # Perfectly correlated columns (second = first): Cov = [[v, v], [v, v]] with v = 4 / 3,
    # off-diagonal 2 * v^2 / D = v^2 per branch, both branches.
    correlated = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    _, terms = vicreg_loss(correlated, correlated)
    assert terms["covariance"].item() == pytest.approx(2 * (4 / 3) ** 2, rel=1e-6)


# ---- properties shared by the batch-level losses -----------------------------------------

def random_pair(rows=6, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)


def test_batch_level_losses_ignore_the_order_of_the_rows():
    # What makes MixMask's switched term valid for them: flip(q_mix) is a row permutation.
    online, target = random_pair()
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    for reorder in (lambda x: x.flip(0), lambda x: x[permutation]):
        assert torch.allclose(barlow_twins_loss(reorder(online), reorder(target)),
                              barlow_twins_loss(online, target), rtol=1e-5)
        total, terms = vicreg_loss(reorder(online), reorder(target))
        expected_total, expected_terms = vicreg_loss(online, target)
        assert torch.allclose(total, expected_total, rtol=1e-5)
        for name in terms:
            assert torch.allclose(terms[name], expected_terms[name], rtol=1e-5, atol=1e-7)


def test_losses_have_finite_gradients_even_on_degenerate_inputs():
    online, target = random_pair()
    online[:, 0] = 1.0  # a collapsed dimension: zero variance
    target[0] = 0.0  # a zero vector: the cosine's normalisation must stay finite
    for loss_fn in (
        lambda a, b: byol_loss(a, b).mean(),
        lambda a, b: simsiam_loss(a, b).mean(),
        barlow_twins_loss,
        lambda a, b: vicreg_loss(a, b)[0],
    ):
        first = online.clone().requires_grad_(True)
        second = target.clone().requires_grad_(True)
        loss = loss_fn(first, second)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(first.grad).all() and torch.isfinite(second.grad).all()
        assert first.grad.abs().sum() > 0


def test_barlow_twins_and_vicreg_accept_a_detached_target():
    online, target = random_pair()
    online.requires_grad_(True)
    barlow_twins_loss(online, target.detach()).backward()
    assert online.grad.abs().sum() > 0
    online.grad = None
    vicreg_loss(online, target.detach())[0].backward()
    assert online.grad.abs().sum() > 0


def test_new_losses_are_float32_under_bf16_autocast_and_inputs():
    online, target = random_pair(rows=16, dim=8)
    losses = {
        "byol": lambda a, b: byol_loss(a, b),
        "simsiam": lambda a, b: simsiam_loss(a, b),
        "barlow_twins": barlow_twins_loss,
        "vicreg": lambda a, b: vicreg_loss(a, b)[0],
    }
    for name, loss_fn in losses.items():
        reference = loss_fn(online, target)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            under_autocast = loss_fn(online, target)
        assert under_autocast.dtype == torch.float32, name
        assert torch.allclose(under_autocast, reference, rtol=1e-5, atol=1e-5), name
        assert loss_fn(online.bfloat16(), target.bfloat16()).dtype == torch.float32, name


def test_new_losses_never_read_values_back_to_the_host():
    online, target = random_pair()
    online.requires_grad_(True)
    with HostSyncRecorder() as recorder:
        total = byol_loss(online, target).mean() + simsiam_loss(online, target).mean()
        clean = barlow_twins_loss(online, target)
        switched = barlow_twins_loss(online.flip(0), target)
        total = total + weighted_mix_loss(clean, clean, switched, torch.tensor(0.4))
        total = total + vicreg_loss(online, target)[0]
        total.backward()
    assert recorder.syncing_ops == []


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        byol_loss(torch.zeros(4, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))


# ---- DDP: gradients through the autograd-aware collectives -------------------------------

DDP_WORLD_SIZE = 2
# Barlow Twins supports unequal local batches (sums of statistics); VICReg's all_gather
# needs equal ones.
DDP_SPLITS = {"barlow_twins": (3, 5), "barlow_twins_detached": (3, 5), "vicreg": (4, 4)}


def ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)


def ddp_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(3, 4)


def ddp_loss(case: str, model: nn.Module, view1: torch.Tensor, view2: torch.Tensor):
    # One forward for both views (shared weights), as Barlow Twins / VICReg run it.
    online, target = model(torch.cat([view1, view2])).split([len(view1), len(view2)])
    if case == "barlow_twins":
        return barlow_twins_loss(online, target, lambda_offdiag=0.1)
    if case == "barlow_twins_detached":
        return barlow_twins_loss(online, target.detach(), lambda_offdiag=0.1)
    return vicreg_loss(online, target)[0]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=DDP_WORLD_SIZE)
    try:
        view1, view2 = ddp_batch()
        results = {}
        model = DistributedDataParallel(ddp_model())  # the first one costs seconds of imports
        for case, sizes in DDP_SPLITS.items():
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            model.zero_grad(set_to_none=True)
            loss = ddp_loss(case, model, view1[local], view2[local])
            loss.backward()  # DDP averages the parameter gradients over the processes
            results[case] = {"loss": loss.detach(),
                             "grads": [p.grad.clone() for p in model.parameters()]}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_ddp_gradients_equal_single_process_gradients_on_the_whole_batch(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(), str(tmp_path)),
                                nprocs=DDP_WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(DDP_WORLD_SIZE)]
    view1, view2 = ddp_batch()
    for case in DDP_SPLITS:
        model = ddp_model()
        loss = ddp_loss(case, model, view1, view2)
        loss.backward()
        for rank_results in ranks:
            # Every process computes the loss of the global batch ...
            assert rank_results[case]["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
            # ... and the averaged gradient is the full-batch one (an in-place all_reduce
            # would give 1 / world_size of it).
            ddp_grads = rank_results[case]["grads"]
            for ddp_grad, param in zip(ddp_grads, model.parameters(), strict=True):
                assert torch.allclose(ddp_grad, param.grad, rtol=1e-4, atol=1e-6), case
