"""Tests for mixmask.losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixmask.losses import info_nce, weighted_mix_loss


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


class HostReadRecorder(TorchDispatchMode):
    """Records .item()/bool() reads (aten::_local_scalar_dense) and nonzero, which would
    stall a CUDA step. (tests/test_masking.py has a fuller recorder for indexing.)"""

    def __init__(self):
        super().__init__()
        self.syncing_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in {"aten::_local_scalar_dense", "aten::nonzero"}:
            self.syncing_ops.append(func.name())
        return func(*args, **(kwargs or {}))


def test_losses_never_read_values_back_to_the_host():
    query, positive_key, negative_keys = tiny_example()
    query.requires_grad_(True)
    with HostReadRecorder() as recorder:
        per_sample = info_nce(query, positive_key, negative_keys, 0.2)
        weighted_mix_loss(per_sample, per_sample, per_sample, torch.tensor([0.3, 0.6])).backward()
    assert recorder.syncing_ops == []
    with HostReadRecorder() as recorder:
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
