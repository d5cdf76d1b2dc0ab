"""DINO (arXiv 2104.14294, issue 28): its centred, sharpened cross-entropy, the centre's EMA
and the teacher-temperature warm-up against hand computations; multi-crop (the local
crops never reach the teacher, every (teacher global, student other view) pair counted
once); the prototypes frozen in the first epoch; the weight-decay schedule; the step under
every masking value and `mixmask pretrain` of its recipes on real CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, parameters_without_gradient, pretrain_recipe_briefly, real_view_pairs

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.errors import ConfigError
from mixmask.methods import build_method
from mixmask.ops.losses.distillation import (
    distillation_cross_entropy,
    teacher_probabilities,
    teacher_temperature,
    updated_center,
)
from mixmask.ops.optim import build_optimizer, pretraining_groups
from mixmask.train.loop import pretrain
from mixmask.train.schedule import weight_decay
from mixmask.train.step import set_weight_decay, training_step

MASKINGS = ("none", "erase", "mixmask", "unmix", "both")
TINY = ["method.dino.proj_hidden_dim=64", "method.dino.bottleneck_dim=16",
        "method.dino.num_prototypes=32"]

# --------------------------------------------------------------------------- the loss


def test_the_cross_entropy_is_the_hand_computed_value():
    """K = 2. Teacher t = (1, 0), centre (0.5, 0.5), tau_t 0.5: (t - c) / tau = (1, -1),
    P_t = (e, e^-1) / (e + e^-1). Student s = (0, 1), tau_s 1: log P_s = (-log(1 + e),
    1 - log(1 + e)). H = -sum P_t log P_s = log(1 + e) - P_t[1]."""
    probabilities = teacher_probabilities(torch.tensor([[1.0, 0.0]]),
                                          torch.tensor([[0.5, 0.5]]), 0.5)
    teacher_second = math.exp(-1) / (math.e + math.exp(-1))
    torch.testing.assert_close(probabilities,
                               torch.tensor([[1 - teacher_second, teacher_second]]))
    found = distillation_cross_entropy(torch.tensor([[0.0, 1.0]]), probabilities, 1.0)
    torch.testing.assert_close(found, torch.tensor([math.log(1 + math.e) - teacher_second]))


def test_sharpening_and_centring_move_the_teacher_as_the_paper_says():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # A lower temperature sharpens: the top prototype's probability rises.
    assert teacher_probabilities(logits, torch.zeros(1, 3), 0.04)[0, 0] > \
        teacher_probabilities(logits, torch.zeros(1, 3), 0.5)[0, 0]
    # Centring on the output itself gives the uniform distribution.
    torch.testing.assert_close(teacher_probabilities(logits, logits, 0.04),
                               torch.full((1, 3), 1 / 3))
    # No gradient reaches the teacher.
    teacher = logits.clone().requires_grad_(True)
    assert not teacher_probabilities(teacher, torch.zeros(1, 3), 0.1).requires_grad


def test_the_centre_is_an_ema_of_the_teacher_batch_mean():
    """c = 0.9 (1, 2) + 0.1 mean((3, 4), (5, 6)) = (1.3, 2.3)."""
    center = updated_center(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]]),
                            0.9)
    torch.testing.assert_close(center, torch.tensor([[1.3, 2.3]]))


def test_the_teacher_temperature_warms_up_linearly_per_epoch_then_stays():
    """np.linspace(0.04, 0.07, 30) for epochs 0-29, then 0.07 (DINOLoss)."""
    def at(epoch: int) -> float:
        return teacher_temperature(epoch, start=0.04, end=0.07, warmup_epochs=30)

    assert at(0) == pytest.approx(0.04)
    assert at(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert at(29) == pytest.approx(0.07)
    assert at(30) == at(299) == 0.07
    assert teacher_temperature(0, start=0.04, end=0.07, warmup_epochs=0) == 0.07


# --------------------------------------------------------------------------- multi-crop


def _vit_dino(local_crops: int = 2):
    """A tiny ViT DINO (no BatchNorm anywhere, so grouping views into batches changes
    nothing and a hand-written loop over views can be compared exactly)."""
    config = load_config(None, [
        "method.name=dino", "model.backbone=vit_tiny", "model.patch_size=8",
        "train.batch_size=4", *TINY, f"method.dino.local_crops={local_crops}",
        "method.dino.local_crop_size=16", "train.epochs=10"])
    torch.manual_seed(0)
    method = build_method(config)
    with torch.no_grad():  # a centre away from 0 and an EMA teacher away from the student
        method.center.normal_()
        for parameter in method.target_backbone.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return method


def _views(local_crops: int):
    generator = torch.Generator().manual_seed(3)
    globals_ = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    locals_ = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(local_crops)]
    return [*globals_, *locals_]


def test_every_teacher_student_pair_counts_once_and_locals_never_reach_the_teacher():
    method = _vit_dino(local_crops=2)
    views = _views(2)
    seen_by_teacher = []
    method.target_backbone.register_forward_pre_hook(
        lambda module, inputs: seen_by_teacher.append(tuple(inputs[0].shape)))
    progress = 0.35  # epoch 3 of 10: tau_t = 0.04 + 0.03 * 3 / 49
    output = method.training_step(Batch.from_views(*views), torch.Generator().manual_seed(0),
                                  progress)
    # The teacher ran once, on the two global views together, never at the local size.
    assert seen_by_teacher == [(8, 3, 32, 32)]

    # Algorithm 1 by hand: teacher global q against student view v != q, 2 x 3 pairs.
    tau_t, tau_s = 0.04 + 0.03 * 3 / 49, 0.1
    with torch.no_grad():
        teacher = [method.target_projector(method.target_backbone(view)) for view in views[:2]]
    student = [method.projector(method.backbone(view)) for view in views]
    total, pairs = 0.0, 0
    for q in range(2):
        probabilities = F.softmax((teacher[q] - method.center) / tau_t, dim=-1)
        for v in range(len(views)):
            if v == q:
                continue
            total = total - (probabilities * F.log_softmax(student[v] / tau_s, dim=-1)
                             ).sum(dim=-1).mean()
            pairs += 1
    assert pairs == 6
    torch.testing.assert_close(output.loss, total / pairs, rtol=1e-5, atol=1e-6)


def test_without_local_crops_the_loss_is_the_two_global_directions():
    method = _vit_dino(local_crops=0)
    views = _views(0)
    output = method.training_step(Batch.from_views(*views), torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = [method.target_projector(method.target_backbone(view)) for view in views]
    student = [method.projector(method.backbone(view)) for view in views]
    directions = [-(F.softmax((teacher[1 - v] - method.center) / 0.04, dim=-1)
                    * F.log_softmax(student[v] / 0.1, dim=-1)).sum(-1).mean() for v in (0, 1)]
    torch.testing.assert_close(output.loss, (directions[0] + directions[1]) / 2)


def test_the_teacher_has_no_stochastic_depth():
    """main_dino.py builds the student with drop_path_rate and the teacher without."""
    config = load_config(ROOT / "configs" / "cifar10" / "dino_vit_tiny.yaml", TINY)
    method = build_method(config)
    rates = [[block.drop_path2.drop_prob if hasattr(block.drop_path2, "drop_prob") else 0.0
              for block in network.blocks]
             for network in (method.backbone, method.target_backbone)]
    assert rates[0][-1] == pytest.approx(0.1) and rates[1] == [0.0] * len(rates[1])


def test_the_views_are_two_globals_then_the_local_crops():
    method = _vit_dino(local_crops=3)
    views = method.view_configs()
    assert [view.image_size for view in views] == [32, 32, 16, 16, 16]
    assert views[0].scale == (0.4, 1.0) and views[2].scale == (0.05, 0.4)
    assert all(view.solarize_p == 0.0 for view in views[2:])


# --------------------------------------------------------------------------- the step


def test_the_prototypes_are_frozen_in_the_first_epoch_only():
    method = _vit_dino(local_crops=0)
    optimizer = build_optimizer("adamw", pretraining_groups("adamw", list(
        method.named_parameters())), lr=1e-3, weight_decay=0.04)
    views = Batch.from_views(*_views(0))
    last_layer = method.projector.last_layer.direction
    before = last_layer.detach().clone()
    # Epoch 0 of 10: the last layer's gradient is dropped (no update, no weight decay).
    training_step(method, optimizer, views, torch.Generator().manual_seed(0), 0.05)
    torch.testing.assert_close(last_layer, before, rtol=0, atol=0)
    first_block = next(method.backbone.blocks.parameters())
    moved = first_block.detach().clone()
    # Epoch 1: it learns.
    training_step(method, optimizer, views, torch.Generator().manual_seed(0), 0.15)
    assert not torch.equal(last_layer, before)
    assert not torch.equal(first_block, moved)


def test_after_a_step_the_centre_and_the_teacher_move():
    method = _vit_dino(local_crops=0)
    center = method.center.clone()
    output = method.training_step(Batch.from_views(*_views(0)),
                                  torch.Generator().manual_seed(0), 0.5)
    method.after_optimizer_step(output, 0.5)
    expected = 0.9 * center + 0.1 * torch.cat(output.targets).mean(dim=0)
    torch.testing.assert_close(method.center, expected)


@pytest.mark.parametrize("masking", MASKINGS)
def test_every_trainable_parameter_gets_a_gradient_on_real_views(masking, cifar10_tarball):
    config = load_config(None, ["method.name=dino", f"method.masking={masking}",
                                "model.width=0.125", "train.batch_size=16", *TINY])
    torch.manual_seed(0)
    method = build_method(config)
    output = method.training_step(Batch.from_views(*real_view_pairs(cifar10_tarball, "byol_cifar")),
                                  torch.Generator().manual_seed(0), 0.3)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert parameters_without_gradient(method) == []
    # The teacher learns by EMA only; norm_last_layer keeps the weight-norm gain at 1.
    assert not any(p.requires_grad for p in method.target_backbone.parameters())
    assert not method.projector.last_layer.gain.requires_grad


def test_the_weight_decay_follows_dinos_cosine_on_decayed_groups_only():
    config = load_config(None, ["train.weight_decay=0.04", "train.weight_decay_end=0.4",
                                "train.epochs=2"])
    assert weight_decay(config, 0, 10) == pytest.approx(0.04)
    assert weight_decay(config, 10, 10) == pytest.approx(0.22)  # half-way: the mean
    assert weight_decay(config, 20, 10) == pytest.approx(0.4)
    assert weight_decay(load_config(None, []), 7, 10) == 5e-4  # -1: constant
    decayed, plain = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [decayed], "weight_decay": 0.04},
                                   {"params": [plain], "weight_decay": 0.0}])
    set_weight_decay(optimizer, 0.3)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.3, 0.0]
    with pytest.raises(ConfigError, match="weight_decay_end"):
        load_config(None, ["train.weight_decay_end=-0.5"])


@pytest.mark.parametrize("overrides", [
    ["method.dino.student_temperature=0"], ["method.dino.center_momentum=1.5"],
    ["method.dino.local_crop_scale=[0.5,0.1]"], ["data.num_views=4"],
    ["model.backbone=vit_tiny", "model.patch_size=4", "method.dino.local_crops=2",
     "method.dino.local_crop_size=10"]])
def test_bad_settings_are_one_sentence(overrides):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method.name=dino", *overrides])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, model", [
    ("dino", ["model.width=0.125"]),
    ("ibot", ["model.backbone=vit_tiny", "model.patch_size=8"])])
def test_sgd_trains_across_the_end_of_the_frozen_epoch(name, model, tmp_path):
    """The prototypes' first gradient arrives in epoch 1, after every other parameter has a
    momentum buffer: torch's fused SGD refuses that mix (a TypeError at the first step of
    epoch 1), so the engine runs the SGD of DINO and iBOT unfused."""
    heads = [item.replace("method.dino.", f"method.{name}.") for item in TINY]
    config = load_config(None, [
        f"method.name={name}", *heads, "data.dataset=synthetic", "data.subset=32", *model,
        "train.batch_size=16", "train.epochs=2", "train.optimizer=sgd",
        "train.fused_optimizer=true", "monitor.knn=false", "monitor.online_probe=false",
        "eval.knn=false", "eval.linear=false", "train.progress_bar=false",
        f"out_dir={tmp_path / 'run'}"])
    assert pretrain(config)["steps"] == 4


@pytest.mark.parametrize("recipe", ["dino_r18", "dino_vit_tiny"])
def test_the_recipes_pretrain_on_real_cifar(recipe, tmp_path, cifar10_tarball):
    """`mixmask pretrain` of each CIFAR-10 recipe, 3 steps of 16 real images (the ViT with
    its 6 local 16 px crops, the weight-decay schedule and gradient clipping)."""
    small = ["model.width=0.125"] if "r18" in recipe else []
    summary = pretrain_recipe_briefly(recipe, cifar10_tarball, tmp_path / "run", *small, *TINY)
    assert summary["steps"] == 3 and summary["method"] == "dino"
    assert 0 <= summary["knn_top1"] <= 100
