"""Tests for mixmask.ops.optim: LARS steps against hand computations, parameter groups (weight
decay exclusion, lr scales, layer-wise lr decay) and the optimizers built from them."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from host_sync import HostSyncRecorder
from torch import nn

from mixmask.ops.optim import (
    LARS,
    build_optimizer,
    layer_decay_lr_scale,
    no_decay_bias_and_norm,
    no_decay_bias_norm_and_tokens,
    param_groups_for_lars,
    parameter_groups,
    vit_layer_id,
)


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
    sgd = build_optimizer("sgd", parameter_groups(model.named_parameters()), lr=0.1,
                          momentum=0.9, weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    assert len(sgd.param_groups) == 1
    group = sgd.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["foreach"]) == (
        0.1, 0.9, 5e-4, True)

    lars = build_optimizer("lars", param_groups_for_lars(model.named_parameters()), lr=0.2,
                           momentum=0.9, weight_decay=1.5e-6, eta=0.001)
    assert isinstance(lars, LARS)
    weights, excluded = lars.param_groups
    assert len(weights["params"]) == 2 and len(excluded["params"]) == 3
    assert (weights["weight_decay"], weights["eta"], weights["lars_exclude"]) == (
        1.5e-6, 0.001, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)
    assert weights["lr"] == excluded["lr"] == 0.2
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer("adam", parameter_groups(model.named_parameters()), lr=0.1,
                        momentum=0.9, weight_decay=0.0)


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()


def test_lars_state_dict_round_trip():
    model = tiny_model()
    optimizer = build_optimizer("lars", param_groups_for_lars(model.named_parameters()),
                                lr=0.2, momentum=0.9, weight_decay=1e-4)
    train_steps(model, optimizer, steps=2, seed=0)
    restored_model = copy.deepcopy(model)
    restored = build_optimizer("lars", param_groups_for_lars(restored_model.named_parameters()),
                               lr=0.7, momentum=0.5, weight_decay=0.0)
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


# --------------------------------------------------------------------------------------
# Parameter groups and the optimizers built from them


class TokenModel(nn.Module):
    """A ViT-like toy: tokens and a position embedding, then Linear, LayerNorm, BatchNorm1d
    and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
        self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        with torch.no_grad():  # away from their 1 / 0 initial values
            for norm in (self.body[1], self.body[2]):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)


def test_no_decay_groups_by_name():
    model = TokenModel()
    groups = parameter_groups(model.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens)
    assert [group["param_names"] for group in groups] == [
        ["cls_token", "pos_embed", "body.0.bias", "body.1.weight", "body.1.bias",
         "body.2.weight", "body.2.bias", "head.bias"],
        ["body.0.weight", "head.weight"],
    ]
    parameters = dict(model.named_parameters())
    for group in groups:  # the tensors themselves, in the order of their names
        assert all(param is parameters[name]
                   for param, name in zip(group["params"], group["param_names"], strict=True))
    assert groups[0]["weight_decay"] == 0.0 and "lars_exclude" not in groups[0]
    assert "weight_decay" not in groups[1]  # the optimizer's default
    assert [group["lr_scale"] for group in groups] == [1.0, 1.0]

    # Biases and norms only (MAE pretraining, LARS): the tokens are decayed.
    groups = parameter_groups(model.named_parameters(),
                              exclude_from_decay=no_decay_bias_and_norm, lars=True)
    assert [group["param_names"] for group in groups] == [
        ["cls_token", "pos_embed", "body.0.weight", "head.weight"],
        ["body.0.bias", "body.1.weight", "body.1.bias", "body.2.weight", "body.2.bias",
         "head.bias"],
    ]
    assert groups[1]["lars_exclude"] is True and "lars_exclude" not in groups[0]

    # A prefix does not hide a token; frozen parameters are left out; no function: 1 group.
    wrapper = nn.Module()
    wrapper.backbone = model
    model.head.bias.requires_grad_(False)
    groups = parameter_groups(wrapper.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens)
    assert groups[0]["param_names"][:2] == ["backbone.cls_token", "backbone.pos_embed"]
    assert "backbone.head.bias" not in groups[0]["param_names"]
    (single,) = parameter_groups(wrapper.named_parameters())
    assert single["param_names"] == [name for name, param in wrapper.named_parameters()
                                     if param.requires_grad]


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_step_skips_decay_of_excluded_parameters(fused):
    model = TokenModel()
    lr, weight_decay = 0.1, 0.5
    groups = parameter_groups(model.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens)
    optimizer = build_optimizer("adamw", groups, lr=lr, weight_decay=weight_decay,
                                betas=(0.9, 0.95), fused=fused)
    assert type(optimizer) is torch.optim.AdamW
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, weight_decay]
    assert all(group["betas"] == (0.9, 0.95) for group in optimizer.param_groups)
    assert optimizer.param_groups[0]["fused" if fused else "foreach"] is True
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    # Zero gradients: no Adam step (0 / (0 + eps)), only AdamW's decoupled decay
    # p <- p * (1 - lr * wd) = 0.95 p on the decayed group.
    for name, param in model.named_parameters():
        if name in ("body.0.weight", "head.weight"):
            assert torch.equal(param, before[name] * 0.95), name
            assert not torch.equal(param, before[name])
        else:
            assert torch.equal(param, before[name]), name


def test_group_lr_is_lr_times_lr_scale():
    model = TokenModel()
    # A2MIM-style: the token at 0.1x the lr.
    groups = parameter_groups(model.named_parameters(),
                              lr_scale=lambda name, param: 0.1 if name == "cls_token" else 1.0)
    assert [group["param_names"][0] for group in groups] == ["cls_token", "pos_embed"]
    for name in ("sgd", "lars", "adamw"):
        optimizer = build_optimizer(name, groups, lr=0.4)
        assert [(group["lr_scale"], group["lr"]) for group in optimizer.param_groups] == [
            (0.1, 0.4 * 0.1), (1.0, 0.4)]
    assert all("lr" not in group for group in groups)  # the caller's groups are copied
    # A group without lr_scale gets 1.0.
    optimizer = build_optimizer("sgd", [{"params": [model.cls_token]}], lr=0.3)
    assert (optimizer.param_groups[0]["lr_scale"], optimizer.param_groups[0]["lr"]) == (1.0, 0.3)
    with pytest.raises(ValueError, match="lr_scale"):
        build_optimizer("sgd", [{"params": [model.cls_token], "lr": 0.1}], lr=0.3)
    with pytest.raises(TypeError, match="parameter_groups"):
        build_optimizer("sgd", model.named_parameters(), lr=0.3)
    with pytest.raises(ValueError, match="'sgd', 'lars', 'adamw'"):
        build_optimizer("adam", groups, lr=0.1)


VIT_NAMES = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "blocks.0.attn.qkv.weight", "blocks.0.norm1.bias", "blocks.1.mlp.fc1.weight",
             "norm.weight", "head.weight", "head.bias"]


def vit_named_parameters(prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    shapes = {"cls_token": (1, 1, 4), "pos_embed": (1, 5, 4), "patch_embed.proj.weight": (4, 3),
              "blocks.0.attn.qkv.weight": (12, 4), "blocks.1.mlp.fc1.weight": (8, 4),
              "head.weight": (2, 4)}
    return [(prefix + name, nn.Parameter(torch.ones(shapes.get(name, (4,)))))
            for name in VIT_NAMES]


@pytest.mark.parametrize("prefix", ["", "backbone.", "module.encoder."])
def test_layer_wise_lr_decay(prefix):
    named = vit_named_parameters(prefix)
    assert [vit_layer_id(name, 2) for name, _ in named] == [0, 0, 0, 0, 1, 1, 2, 3, 3, 3]
    scale = layer_decay_lr_scale(2, 0.5)
    # By hand: 0.5 ** (2 + 1 - layer).
    assert [scale(name, param) for name, param in named] == [
        0.125, 0.125, 0.125, 0.125, 0.25, 0.25, 0.5, 1.0, 1.0, 1.0]
    groups = parameter_groups(named, exclude_from_decay=no_decay_bias_norm_and_tokens,
                              lr_scale=scale)
    expected = [  # (names without the prefix, lr_scale, excluded), in order of first name
        (["cls_token", "pos_embed", "patch_embed.proj.bias"], 0.125, True),
        (["patch_embed.proj.weight"], 0.125, False),
        (["blocks.0.attn.qkv.weight"], 0.25, False),
        (["blocks.0.norm1.bias"], 0.25, True),
        (["blocks.1.mlp.fc1.weight"], 0.5, False),
        (["norm.weight", "head.bias"], 1.0, True),
        (["head.weight"], 1.0, False),
    ]
    assert [([name.removeprefix(prefix) for name in group["param_names"]], group["lr_scale"],
             "weight_decay" in group) for group in groups] == expected
    optimizer = build_optimizer("adamw", groups, lr=1e-3, weight_decay=0.05)
    assert [group["lr"] for group in optimizer.param_groups] == [
        1e-3 * scale for _, scale, _ in expected]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [
        0.0 if excluded else 0.05 for _, _, excluded in expected]


def test_vit_layer_id_edge_cases():
    assert vit_layer_id("mask_token", 12) == vit_layer_id("reg_token", 12) == 0
    assert vit_layer_id("backbone.register_tokens", 12) == 0
    assert vit_layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert vit_layer_id("fc_norm.weight", 12) == vit_layer_id("decoder_blocks.0.x", 12) == 13
    assert vit_layer_id("layers.3.weight", 12, blocks="layers") == 4
    with pytest.raises(ValueError, match="block 2"):
        vit_layer_id("blocks.2.weight", 2)
    with pytest.raises(ValueError, match="decay"):
        layer_decay_lr_scale(12, 0.0)
    # MAE finetunes ViT-B with 0.75: the embeddings at 0.75 ** 13 of the lr.
    assert layer_decay_lr_scale(12, 0.75)("cls_token", torch.ones(1)) == 0.75 ** 13


def old_param_groups_for_lars(named_parameters) -> list[dict]:
    """param_groups_for_lars as it was before parameter groups (kept here as reference)."""
    weights, excluded = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (excluded if param.ndim <= 1 else weights).append(param)
    groups = []
    if weights:
        groups.append({"params": weights})
    if excluded:
        groups.append({"params": excluded, "lars_exclude": True, "weight_decay": 0.0})
    return groups


def train_with_schedule(model, optimizer, lrs, seed):
    """Steps as the engine takes them: every group's lr = base_lr * lr_scale, then a step."""
    generator = torch.Generator().manual_seed(seed)
    for base_lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * group.get("lr_scale", 1.0)
        inputs = torch.randn(8, 3, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()


def assert_same_training(model, optimizer, reference_model, reference):
    lrs = [0.05, 0.2, 0.1, 0.02]
    train_with_schedule(model, optimizer, lrs, seed=3)
    train_with_schedule(reference_model, reference, lrs, seed=3)
    for param, reference_param in zip(model.parameters(), reference_model.parameters(),
                                      strict=True):
        assert torch.equal(param, reference_param)
        if param.requires_grad:
            assert torch.equal(optimizer.state[param]["momentum_buffer"],
                               reference.state[reference_param]["momentum_buffer"])
    assert not torch.equal(next(model.parameters()), next(tiny_model().parameters()))


@pytest.mark.parametrize("fused", [False, True])
def test_sgd_over_one_group_is_bit_identical_to_torch_sgd(fused):
    model, reference_model = tiny_model(), tiny_model()
    implementation = {"fused": True} if fused else {"foreach": True}
    reference = torch.optim.SGD([p for p in reference_model.parameters() if p.requires_grad],
                                lr=0.1, momentum=0.9, weight_decay=5e-4, **implementation)
    optimizer = build_optimizer("sgd", parameter_groups(model.named_parameters()), lr=0.1,
                                momentum=0.9, weight_decay=5e-4, fused=fused)
    assert len(optimizer.param_groups) == 1
    assert_same_training(model, optimizer, reference_model, reference)


@pytest.mark.parametrize("clip_lr", [False, True])
def test_lars_over_its_groups_is_bit_identical_to_the_old_grouping(clip_lr):
    options = dict(lr=0.2, momentum=0.9, weight_decay=1e-2, eta=0.02, clip_lr=clip_lr)
    for make_groups in (
        param_groups_for_lars,
        lambda named: parameter_groups(named, exclude_from_decay=no_decay_bias_and_norm,
                                       lars=True),
    ):
        model, reference_model = tiny_model(), tiny_model()
        reference = LARS(old_param_groups_for_lars(reference_model.named_parameters()),
                         **options)
        optimizer = build_optimizer("lars", make_groups(model.named_parameters()), **options)
        assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == [
            [id(p) for p in group["params"]]
            for group in old_param_groups_for_lars(model.named_parameters())]
        assert_same_training(model, optimizer, reference_model, reference)


def test_param_groups_for_lars_keeps_weights_first():
    """Even when the first parameter is a bias-like one (a learnt temperature, say), the
    weights' group comes first, as before: the same groups, in the same order."""
    model = nn.Module()
    model.temperature = nn.Parameter(torch.ones(()))
    model.net = tiny_model()
    groups = param_groups_for_lars(model.named_parameters())
    old = old_param_groups_for_lars(model.named_parameters())
    assert [[id(p) for p in group["params"]] for group in groups] == [
        [id(p) for p in group["params"]] for group in old]
    assert groups[1]["param_names"][0] == "temperature"


def test_param_names_follow_torch_conventions():
    model = tiny_model()
    # torch's own handling of named parameters stores the same key, with the same names.
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    torch_sgd = torch.optim.SGD([(name, param) for name, param in model.named_parameters()
                                 if param.requires_grad], lr=0.1)
    ours = build_optimizer("sgd", parameter_groups(model.named_parameters()), lr=0.1)
    assert torch_sgd.param_groups[0]["param_names"] == names
    assert ours.param_groups[0]["param_names"] == names
    assert ours.state_dict()["param_groups"][0]["param_names"] == names
    with pytest.raises(ValueError, match="param_names"):
        build_optimizer("sgd", [{"params": [model[0].weight], "param_names": []}], lr=0.1)


def test_grouped_optimizer_state_dict_round_trip():
    named = vit_named_parameters("backbone.")
    groups = parameter_groups(named, exclude_from_decay=no_decay_bias_norm_and_tokens,
                              lr_scale=layer_decay_lr_scale(2, 0.5))
    optimizer = build_optimizer("adamw", groups, lr=1e-2, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)

    def step(named, optimizer):
        for _, param in named:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()

    for _ in range(2):
        step(named, optimizer)
    restored_named = [(name, nn.Parameter(param.detach().clone())) for name, param in named]
    restored_groups = parameter_groups(restored_named,
                                       exclude_from_decay=no_decay_bias_norm_and_tokens,
                                       lr_scale=layer_decay_lr_scale(2, 0.5))
    restored = build_optimizer("adamw", restored_groups, lr=0.7, weight_decay=0.0)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved))
    for group, restored_group in zip(optimizer.param_groups, restored.param_groups,
                                     strict=True):
        for key in ("param_names", "lr_scale", "lr", "weight_decay"):
            assert restored_group[key] == group[key]
    generator_state = generator.get_state()
    step(named, optimizer)
    generator.set_state(generator_state)
    step(restored_named, restored)
    for (_, param), (_, restored_param) in zip(named, restored_named, strict=True):
        assert torch.equal(param, restored_param)

    # A checkpoint saved before groups carried lr_scale (or names) keeps those built now.
    old = optimizer.state_dict()
    old["param_groups"] = [{key: value for key, value in group.items()
                            if key not in ("lr_scale", "param_names")}
                           for group in old["param_groups"]]
    fresh = build_optimizer("adamw", restored_groups, lr=0.7)
    fresh.load_state_dict(old)
    assert [group["lr_scale"] for group in fresh.param_groups] == [
        group["lr_scale"] for group in restored_groups]
    assert [group["param_names"] for group in fresh.param_groups] == [
        group["param_names"] for group in restored_groups]
