"""Tests for mixmask.optim: LARS steps against hand computations."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from host_sync import HostSyncRecorder
from torch import nn

from mixmask.optim import LARS, build_optimizer, param_groups_for_lars


def one_step(param_values, grad_values, **options) -> list[float]:
    """One optimizer step on a single parameter; returns the new values."""
    param = nn.Parameter(torch.tensor(param_values))
    optimizer = LARS([param], **options)
    param.grad = torch.tensor(grad_values)
    optimizer.step()
    return param.detach().tolist()


def test_lars_step_matches_hand_computation():
    # p = (3, 4), ||p|| = 5; g = (0.3, -0.4), ||g|| = 0.5; trust = 0.02 * 5 / 0.5 = 0.2.
    # First step: buf = 0.2 * g = (0.06, -0.08); p - 0.5 * buf = (2.97, 4.04).
    assert one_step([3.0, 4.0], [0.3, -0.4], lr=0.5) == pytest.approx([2.97, 4.04])
    # With weight decay 0.1: g + 0.1 p = (-0.3 + 0.3, 0.6 + 0.4) = (0, 1), norm 1;
    # trust = 0.02 * 5 / 1 = 0.1; p - 0.5 * 0.1 * (0, 1) = (3, 3.95).
    assert one_step([3.0, 4.0], [-0.3, 0.6], lr=0.5, weight_decay=0.1) == pytest.approx(
        [3.0, 3.95]
    )
    # eta scales the trust ratio: eta 0.04 doubles the step.
    assert one_step([3.0, 4.0], [0.3, -0.4], lr=0.5, eta=0.04) == pytest.approx([2.94, 4.08])


def test_lars_clip_lr():
    # trust 0.2 as above; clipped: min(0.2 / lr, 1).
    # lr 0.5: 0.4, step 0.5 * 0.4 * g = 0.2 * g -> (2.94, 4.08).
    assert one_step([3.0, 4.0], [0.3, -0.4], lr=0.5, clip_lr=True) == pytest.approx([2.94, 4.08])
    # lr 0.1: min(2, 1) = 1, a plain SGD step 0.1 * g -> (2.97, 4.04).
    assert one_step([3.0, 4.0], [0.3, -0.4], lr=0.1, clip_lr=True) == pytest.approx([2.97, 4.04])


def test_lars_momentum_accumulates_over_two_steps():
    lr, momentum, eta = 0.5, 0.9, 0.02
    param = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = LARS([param], lr=lr, momentum=momentum, eta=eta)
    param.grad = torch.tensor([0.3, -0.4])
    optimizer.step()
    param.grad = torch.tensor([0.0, 0.5])
    optimizer.step()
    # By hand: step 1 as in test_lars_step_matches_hand_computation.
    first_update = [0.06, -0.08]
    p1 = [3.0 - lr * first_update[0], 4.0 - lr * first_update[1]]  # (2.97, 4.04)
    trust = eta * math.hypot(*p1) / 0.5
    second_update = [0.0, trust * 0.5]
    buffer = [momentum * u1 + u2 for u1, u2 in zip(first_update, second_update, strict=True)]
    expected = [p - lr * b for p, b in zip(p1, buffer, strict=True)]
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-6)
    assert optimizer.state[param]["momentum_buffer"].tolist() == pytest.approx(buffer, rel=1e-6)


def test_excluded_group_is_sgd_with_momentum_and_no_weight_decay():
    lars_param = nn.Parameter(torch.tensor([1.0, -2.0]))
    sgd_param = nn.Parameter(torch.tensor([1.0, -2.0]))
    # weight_decay set on the group on purpose: the flag excludes decay as well.
    lars = LARS([{"params": [lars_param], "lars_exclude": True, "weight_decay": 0.5}],
                lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([sgd_param], lr=0.1, momentum=0.9)
    for grad in ([0.5, 0.25], [0.25, -1.0]):
        for param, optimizer in ((lars_param, lars), (sgd_param, sgd)):
            param.grad = torch.tensor(grad)
            optimizer.step()
    assert lars_param.detach().tolist() == pytest.approx(sgd_param.detach().tolist())
    # By hand for the first entry: buf 0.5 then 0.9 * 0.5 + 0.25 = 0.7;
    # p = 1 - 0.05 = 0.95, then 0.95 - 0.07 = 0.88.
    assert lars_param[0].item() == pytest.approx(0.88)


def test_exclusion_can_be_switched_off():
    param = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = LARS([{"params": [param], "lars_exclude": True}], lr=0.5,
                     exclude_bias_and_norm=False)
    param.grad = torch.tensor([0.3, -0.4])
    optimizer.step()
    assert param.detach().tolist() == pytest.approx([2.97, 4.04])  # adapted, as above


def test_zero_gradients_and_zero_weights_give_no_nan():
    # Zero weight: trust 1, a plain SGD step.
    assert one_step([0.0, 0.0], [1.0, 2.0], lr=0.1) == pytest.approx([-0.1, -0.2])
    # Zero gradient: nothing moves.
    assert one_step([1.0, 2.0], [0.0, 0.0], lr=0.1, weight_decay=0.0) == [1.0, 2.0]
    # Both zero, with weight decay and clipping.
    assert one_step([0.0], [0.0], lr=0.1, weight_decay=0.1, clip_lr=True) == [0.0]
    # Parameters without a gradient are skipped.
    param = nn.Parameter(torch.ones(2))
    LARS([param], lr=0.1).step()
    assert param.detach().tolist() == [1.0, 1.0]


def test_lars_rejects_bad_hyperparameters():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="learning rate"):
        LARS([param], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([param], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="eta"):
        LARS([param], lr=0.1, eta=0.0)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[3].bias.requires_grad_(False)  # frozen: left out of every optimizer
    return model


def test_param_groups_for_lars_splits_weights_from_biases_and_norms():
    model = tiny_model()
    groups = param_groups_for_lars(model.named_parameters())
    assert len(groups) == 2
    weights, excluded = groups
    assert [p.shape for p in weights["params"]] == [(4, 3), (2, 4)]
    assert "lars_exclude" not in weights
    assert [p is q for p, q in zip(excluded["params"],
                                   [model[0].bias, model[1].weight, model[1].bias],
                                   strict=True)] == [True] * 3
    assert excluded["lars_exclude"] is True
    assert excluded["weight_decay"] == 0.0


def test_build_optimizer_groups():
    model = tiny_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sgd = build_optimizer("sgd", model.named_parameters(), lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    assert len(sgd.param_groups) == 1
    group = sgd.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["foreach"]) == (
        0.1, 0.9, 5e-4, True)

    lars = build_optimizer("lars", model.named_parameters(), lr=0.2, momentum=0.9,
                           weight_decay=1.5e-6, eta=0.001)
    assert isinstance(lars, LARS)
    weights, excluded = lars.param_groups
    assert len(weights["params"]) == 2 and len(excluded["params"]) == 3
    assert (weights["weight_decay"], weights["eta"], weights["lars_exclude"]) == (
        1.5e-6, 0.001, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)
    assert weights["lr"] == excluded["lr"] == 0.2
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer("adam", model.named_parameters(), lr=0.1, momentum=0.9,
                        weight_decay=0.0)


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()


def test_lars_state_dict_round_trip():
    model = tiny_model()
    optimizer = build_optimizer("lars", model.named_parameters(), lr=0.2, momentum=0.9,
                                weight_decay=1e-4)
    train_steps(model, optimizer, steps=2, seed=0)
    restored_model = copy.deepcopy(model)
    restored = build_optimizer("lars", restored_model.named_parameters(), lr=0.7, momentum=0.5,
                               weight_decay=0.0)
    # Through bytes, as a checkpoint does (a live state_dict shares the buffers).
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved))
    assert restored.param_groups[0]["lr"] == 0.2
    assert restored.param_groups[1]["lars_exclude"] is True
    train_steps(model, optimizer, steps=1, seed=1)
    train_steps(restored_model, restored, steps=1, seed=1)
    for param, restored_param in zip(model.parameters(), restored_model.parameters(),
                                     strict=True):
        assert torch.equal(param, restored_param)


def test_lars_step_never_reads_values_back_to_the_host():
    model = tiny_model()
    optimizer = LARS(param_groups_for_lars(model.named_parameters()), lr=0.1,
                     weight_decay=1e-4, clip_lr=True)
    model(torch.randn(8, 3)).square().mean().backward()
    with HostSyncRecorder() as recorder:
        optimizer.step()
    assert recorder.syncing_ops == []


def test_lars_adapts_each_parameter_of_a_group_by_its_own_norms():
    """The multi-tensor step gives every tensor its own trust ratio: compared with a
    per-tensor loop written out here (weight decay, trust, clip, momentum, two steps)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    values[1] = torch.zeros(5)  # ||p|| = 0: trust 1
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(2)]
    lr, momentum, weight_decay, eta = 0.3, 0.9, 0.01, 0.02
    params = [nn.Parameter(value.clone()) for value in values]
    optimizer = LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                     clip_lr=True)
    expected = [value.clone() for value in values]
    buffers = [torch.zeros_like(value) for value in values]
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        for index, grad in enumerate(step_grads):
            decayed = grad + weight_decay * expected[index]
            p_norm, g_norm = expected[index].norm().item(), decayed.norm().item()
            trust = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
            trust = min(trust / lr, 1.0)
            buffers[index] = momentum * buffers[index] + trust * decayed
            expected[index] = expected[index] - lr * buffers[index]
    for param, value in zip(params, expected, strict=True):
        torch.testing.assert_close(param.detach(), value)
