"""iBOT (arXiv 2111.07832): its masked patch term against a hand computation; the mask
token in place of the masked patch embeddings, the teacher unmasked; the mask ratios drawn
from the host generator (statistics, resume); every (teacher, student) pair counted once
against a loop over views for each head sharing; gradients on real CIFAR-10 views; DDP;
`mixmask pretrain` of the CIFAR-10 recipe; one-sentence errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import free_port, parameters_without_gradient, pretrain_recipe_briefly, real_view_pairs
from torch.nn.parallel import DistributedDataParallel

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.errors import ConfigError
from mixmask.methods import build_method
from mixmask.ops.losses.distillation import (
    distillation_cross_entropy,
    masked_token_mean,
    teacher_probabilities,
)

TINY = ["method.ibot.proj_hidden_dim=64", "method.ibot.bottleneck_dim=16",
        "method.ibot.num_prototypes=32"]

# --------------------------------------------------------------------------- the patch term


def test_the_patch_term_counts_the_masked_tokens_only():
    """One image, two tokens, K = 2, only token 0 masked. Teacher token 0: (1, 0) - centre
    (0.5, 0.5), tau_t 0.5 -> (1, -1), P_t = (e, 1/e) / (e + 1/e). Student token 0: (0, 1),
    tau_s 1 -> log P_s = (-log(1 + e), 1 - log(1 + e)); H = log(1 + e) - P_t[1]. Token 1
    (unmasked) has a large loss that must not count; a second image has no masked token."""
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 9.0]], [[1.0, 0.0], [0.0, 1.0]]])
    student = torch.tensor([[[0.0, 1.0], [9.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]],
                           requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    probabilities = teacher_probabilities(teacher, torch.tensor([[0.5, 0.5]]), 0.5)
    per_image = masked_token_mean(distillation_cross_entropy(student, probabilities, 1.0), mask)
    teacher_second = math.exp(-1) / (math.e + math.exp(-1))
    torch.testing.assert_close(per_image, torch.tensor([math.log(1 + math.e) - teacher_second,
                                                        0.0]))
    per_image.mean().backward()  # the unmasked tokens get no gradient
    assert student.grad[0, 1].abs().sum() == 0 and student.grad[1].abs().sum() == 0
    assert student.grad[0, 0].abs().sum() > 0


def test_the_masked_mean_divides_by_the_masked_count():
    """(1 + 3) / 2 = 2; 8 / 1; no masked token: 0 (the reference's clamp(min=1))."""
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masked_token_mean(losses, mask), torch.tensor([2.0, 8.0, 0.0]))


# --------------------------------------------------------------------------- a tiny ViT


def _ibot(*overrides: str, seed: int = 0):
    """A tiny iBOT: ViT-Tiny with 8 px patches at 32 px (a 4 x 4 grid), 16 px local crops
    (2 x 2), no BatchNorm anywhere, so a loop over single views gives the same numbers."""
    config = load_config(None, [
        "method.name=ibot", "model.backbone=vit_tiny", "model.patch_size=8",
        "train.batch_size=4", "train.epochs=10", *TINY, "method.ibot.local_crop_size=16",
        *overrides])
    torch.manual_seed(seed)
    return build_method(config)


def _views(local_crops: int, size: int = 4):
    generator = torch.Generator().manual_seed(3)
    return [*(torch.randn(size, 3, 32, 32, generator=generator) for _ in range(2)),
            *(torch.randn(size, 3, 16, 16, generator=generator) for _ in range(local_crops))]


def _recording_masks(method) -> list[torch.Tensor]:
    drawn, original = [], method.sample_masks
    method.sample_masks = lambda *args: drawn.append(original(*args)) or drawn[-1]
    return drawn


def test_the_mask_token_replaces_exactly_the_masked_patch_embeddings():
    method = _ibot("method.ibot.mask_ratios=[0.5]", "method.ibot.mask_ratio_vars=[0.0]",
                   "model.drop_path_rate=0.1")
    with torch.no_grad():
        method.mask_token.normal_()
    views = _views(0)
    drawn = _recording_masks(method)
    entering = {"student": [], "teacher": []}
    for name, backbone in (("student", method.backbone), ("teacher", method.target_backbone)):
        backbone.blocks.register_forward_pre_hook(
            lambda module, inputs, name=name: entering[name].append(inputs[0].detach()))
    method.training_step(Batch.from_views(*views), torch.Generator().manual_seed(0), 0.0)
    (mask,), (student,), (teacher,) = drawn, entering["student"], entering["teacher"]
    assert mask.shape == (8, 16) and mask.any() and (mask.sum(dim=1) <= 8).all()
    images = torch.cat(views)
    with torch.no_grad():
        patches = method.backbone.patch_embed(images)
        expected = torch.where(mask[..., None], method.mask_token.reshape(1, 1, -1), patches)
        expected = method.backbone.prepend_cls(expected + method.backbone.pos_embed[:, 1:])
        # The teacher sees every patch of both global views: no token anywhere.
        clean = method.target_backbone.prepend_cls(method.target_backbone.embed_patches(images))
    torch.testing.assert_close(student, expected, rtol=0, atol=0)
    torch.testing.assert_close(teacher, clean, rtol=0, atol=0)
    # A masked position holds the token and its position only, whatever the image.
    position = method.backbone.pos_embed[0, 1:]
    first = mask[0].nonzero()[0, 0]
    torch.testing.assert_close(student[0, 1 + first], method.mask_token[0, 0] + position[first])
    # The teacher has no drop-path (the reference builds it without); the student has.
    assert type(method.backbone.blocks[-1].drop_path1).__name__ == "DropPath"
    assert isinstance(method.target_backbone.blocks[-1].drop_path1, torch.nn.Identity)


# --------------------------------------------------------------------------- the masks


def test_the_mask_ratios_follow_the_configured_lists():
    """The README's [0, 0.3] +- [0, 0.2]: half the ratios exactly 0, the others uniform on
    [0.1, 0.5]; the masks then cover floor(ratio x N) patches at most (8 x 8 grid)."""
    method = _ibot("model.patch_size=4")
    host = torch.Generator().manual_seed(0)
    ratios = method.draw_mask_ratios(20000, host)
    drawn = ratios[ratios > 0]
    assert abs((ratios == 0).float().mean().item() - 0.5) < 0.02
    assert 0.1 <= drawn.min() and drawn.max() <= 0.5
    quartiles = torch.quantile(drawn, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(quartiles, torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64),
                               rtol=0, atol=0.01)

    counts = method.sample_masks(4000, torch.Generator().manual_seed(1),
                                 torch.device("cpu")).sum(dim=1)
    assert abs((counts == 0).float().mean().item() - 0.5) < 0.04
    assert counts.max() <= 32  # floor(0.5 x 64)
    masked = counts[counts > 0].float() / 64
    # E[floor(64 r)] / 64 for r ~ U[0.1, 0.5] is 0.292; BEiT's loop sometimes stops short.
    assert 0.26 < masked.mean() < 0.30

    fixed = _ibot("model.patch_size=4", "method.ibot.mask_ratios=[0.4]",
                  "method.ibot.mask_ratio_vars=[0.0]")
    counts = fixed.sample_masks(500, torch.Generator().manual_seed(2),
                                torch.device("cpu")).sum(dim=1)
    assert counts.max() == 25 and (counts == 25).float().mean() > 0.9  # floor(0.4 x 64)


def test_the_masks_come_from_the_host_generator_and_resume_exactly():
    first = _ibot()
    step = torch.Generator().manual_seed(5)
    first.sample_masks(8, step, torch.device("cpu"))
    state = first.state_dict()
    torch.manual_seed(123)  # the global RNG plays no part
    expected = first.sample_masks(8, step, torch.device("cpu"))
    resumed = _ibot(seed=1)
    resumed.load_state_dict(state)
    # A resumed run's step generator has another seed: the restored stream decides.
    found = resumed.sample_masks(8, torch.Generator().manual_seed(99), torch.device("cpu"))
    assert torch.equal(found, expected) and expected.any()
    again = first.sample_masks(8, step, torch.device("cpu"))
    assert not torch.equal(again, expected)  # the stream moves on


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("shared_head, shared_head_teacher", [
    (False, True), (True, True), (False, False)])
def test_every_pair_counts_once_and_the_locals_never_reach_the_teacher(shared_head,
                                                                       shared_head_teacher):
    method = _ibot("method.ibot.local_crops=2", "method.ibot.teacher_temperature=0.07",
                   "method.ibot.teacher_patch_temperature=0.06",
                   "method.ibot.warmup_teacher_temperature_epochs=5",
                   "method.ibot.cls_loss_weight=0.7", "method.ibot.patch_loss_weight=1.3",
                   f"method.ibot.shared_head={str(shared_head).lower()}",
                   f"method.ibot.shared_head_teacher={str(shared_head_teacher).lower()}")
    with torch.no_grad():  # centres away from 0, a teacher away from the student
        method.center.normal_()
        method.patch_center.normal_()
        method.mask_token.normal_()
        for parameter in method.target_backbone.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    views = _views(2)
    drawn = _recording_masks(method)
    seen_by_teacher = []
    method.target_backbone.patch_embed.proj.register_forward_pre_hook(
        lambda module, inputs: seen_by_teacher.append(tuple(inputs[0].shape)))
    output = method.training_step(Batch.from_views(*views), torch.Generator().manual_seed(0),
                                  0.35)  # epoch 3 of 10
    assert seen_by_teacher == [(8, 3, 32, 32)]  # both globals at once, never a local crop
    masks = drawn[0].reshape(2, 4, -1)
    assert masks.any() and not masks.all()

    # iBOTLoss by hand: epoch 3 of a 5-epoch warm-up from 0.04.
    tau_cls, tau_patch, tau_s = 0.04 + 0.03 * 3 / 4, 0.04 + 0.02 * 3 / 4, 0.1
    student_patch_layer = (method.projector.last_layer if shared_head
                           else method.patch_prototypes)
    teacher_patch_layer = (method.target_projector.last_layer if shared_head_teacher
                           else method.target_patch_prototypes)
    with torch.no_grad():
        teacher = [method.target_projector.bottleneck(method.target_backbone.forward_tokens(v))
                   for v in views[:2]]
    student = [method.projector.bottleneck(method.backbone.forward_with_mask_token(
        view, masks[index], method.mask_token, replace=True)) for index, view in
        enumerate(views[:2])]
    student_cls = [method.projector.last_layer(tokens[:, 0]) for tokens in student] + [
        method.projector(method.backbone.forward_tokens(view)[:, 0]) for view in views[2:]]
    cls_total, cls_pairs, patch_total, patch_pairs = 0.0, 0, 0.0, 0
    for q in range(2):
        cls_target = F.softmax((method.target_projector.last_layer(teacher[q][:, 0])
                                - method.center) / tau_cls, dim=-1)
        patch_target = F.softmax((teacher_patch_layer(teacher[q][:, 1:])
                                  - method.patch_center) / tau_patch, dim=-1)
        for v in range(len(views)):
            if v == q:
                token_losses = -(patch_target * F.log_softmax(
                    student_patch_layer(student[v][:, 1:]) / tau_s, dim=-1)).sum(dim=-1)
                per_image = [sum(token_losses[b, i] for i in range(16) if masks[v, b, i])
                             / max(int(masks[v, b].sum()), 1) for b in range(4)]
                patch_total = patch_total + sum(per_image) / 4
                patch_pairs += 1
            else:
                cls_total = cls_total - (cls_target * F.log_softmax(
                    student_cls[v] / tau_s, dim=-1)).sum(dim=-1).mean()
                cls_pairs += 1
    assert (cls_pairs, patch_pairs) == (6, 2)
    expected = 0.7 * cls_total / cls_pairs + 1.3 * patch_total / patch_pairs
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.logs["loss_patch"], (1.3 * patch_total / 2).detach(),
                               rtol=1e-5, atol=1e-6)


def test_after_a_step_the_centres_follow_the_teacher_and_the_last_layers_freeze_in_epoch_1():
    method = _ibot()
    center, patch_center = method.center.clone(), method.patch_center.clone()
    output = method.training_step(Batch.from_views(*_views(0)),
                                  torch.Generator().manual_seed(0), 0.05)
    teacher_cls, patch_means = output.targets
    with torch.no_grad():  # iBOTLoss.update_center: the patch logits' mean per image first
        tokens = method.target_backbone.forward_tokens(torch.cat(_views(0)))
        patches = method.target_projector.last_layer(
            method.target_projector.bottleneck(tokens)[:, 1:])
    torch.testing.assert_close(patch_means, patches.mean(dim=1))
    output.loss.backward()
    method.before_optimizer_step(0.05)  # epoch 0 of 10: both last layers dropped
    assert method.projector.last_layer.direction.grad is None
    assert method.patch_prototypes.direction.grad is None
    assert method.backbone.cls_token.grad is not None and method.mask_token.grad is not None
    method.after_optimizer_step(output, 0.05)
    torch.testing.assert_close(method.center, 0.9 * center + 0.1 * teacher_cls.mean(dim=0))
    torch.testing.assert_close(method.patch_center,
                               0.9 * patch_center + 0.1 * patches.mean(dim=(0, 1)))


# --------------------------------------------------------------------------- real images


@pytest.mark.parametrize("shared_head", [False, True])
def test_every_trainable_parameter_gets_a_gradient_on_real_views(shared_head, cifar10_tarball):
    config = load_config(None, [
        "method.name=ibot", "model.backbone=vit_tiny", "model.patch_size=4",
        "train.batch_size=16", *TINY, "method.ibot.local_crops=2",
        "method.ibot.local_crop_size=16", f"method.ibot.shared_head={str(shared_head).lower()}",
        "method.ibot.mask_ratios=[0.3]", "method.ibot.mask_ratio_vars=[0.1]"])
    torch.manual_seed(0)
    method = build_method(config)
    first, second = real_view_pairs(cifar10_tarball, "byol_cifar")
    locals_ = [F.interpolate(view, size=16, mode="bilinear", antialias=True)
               for view in (first, second)]
    output = method.training_step(Batch.from_views(first, second, *locals_),
                                  torch.Generator().manual_seed(0), 0.3)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert parameters_without_gradient(method) == []
    assert (method.patch_prototypes is None) == shared_head
    # The teacher learns by EMA only.
    assert not any(parameter.requires_grad for name, parameter in method.named_parameters()
                   if name.startswith("target_"))


def test_the_recipe_pretrains_on_real_cifar(tmp_path, cifar10_tarball):
    """`mixmask pretrain` of cifar10/ibot_vit_tiny, 3 steps of 16 real images (2 global
    views with block masks, 6 local 16 px crops, the weight-decay schedule, clipping)."""
    summary = pretrain_recipe_briefly("ibot_vit_tiny", cifar10_tarball, tmp_path / "run", *TINY)
    assert summary["steps"] == 3 and summary["method"] == "ibot"
    assert 0 <= summary["knn_top1"] <= 100


@pytest.mark.parametrize("overrides", [
    ["model.backbone=resnet18"],
    ["model.global_pool=avg"],
    ["method.ibot.mask_ratios=[0.3]", "method.ibot.mask_ratio_vars=[0.4]"],
    ["method.ibot.mask_ratios=[0.6]", "method.ibot.mask_ratio_vars=[0.4]"],
    ["method.ibot.mask_ratios=[0.0,0.3]", "method.ibot.mask_ratio_vars=[0.0]"],
    ["method.ibot.mask_ratios=[]", "method.ibot.mask_ratio_vars=[]"],
    ["method.ibot.shared_head=true", "method.ibot.shared_head_teacher=false"],
    ["method.ibot.num_patch_prototypes=16"],
    ["method.ibot.teacher_patch_temperature=0"]])
def test_bad_settings_are_one_sentence(overrides):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method.name=ibot", "model.backbone=vit_tiny", *overrides])
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- DDP

WORLD_SIZE = 2
DDP_OVERRIDES = ["data.image_size=16", "model.patch_size=4", "method.ibot.local_crops=2",
                 "method.ibot.local_crop_size=8"]


def _ddp_inputs():
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(2)]
    views += [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(2)]
    # Fixed masks, one per (global view, image), rows in the method's order (view-major).
    masks = torch.rand(2, 8, 16, generator=generator) < 0.3
    masks[0, 1] = False  # an image without a masked patch
    return views, masks


def _ddp_method(masks: torch.Tensor):
    method = _ibot(*DDP_OVERRIDES)
    with torch.no_grad():
        method.center.normal_()
        method.patch_center.normal_()
    method.sample_masks = lambda count, generator, device: masks.reshape(count, -1)
    return method


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        views, masks = _ddp_inputs()
        local = slice(4 * rank, 4 * rank + 4)
        method = _ddp_method(masks[:, local])
        model = DistributedDataParallel(method)  # held: its reducer averages in backward
        output = model(Batch.from_views(*(view[local] for view in views)), torch.Generator(),
                       0.5)
        output.loss.backward()
        method.after_optimizer_step(output, 0.5)  # the centres' mean over the processes
        torch.save({"grads": {key: param.grad for key, param in method.named_parameters()
                              if param.grad is not None},
                    "centres": (method.center, method.patch_center)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_and_centres_equal_the_whole_batch(tmp_path):
    """Two gloo processes with half the batch each (and their images' masks) give the
    single process's gradients on the whole batch, and the same centres after the step."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path)),
                                nprocs=WORLD_SIZE, join=True)
    views, masks = _ddp_inputs()
    method = _ddp_method(masks)
    output = method.training_step(Batch.from_views(*views), torch.Generator(), 0.5)
    output.loss.backward()
    method.after_optimizer_step(output, 0.5)
    expected = {key: param.grad for key, param in method.named_parameters()
                if param.grad is not None}
    scale = max(grad.abs().max().item() for grad in expected.values())
    for rank in range(WORLD_SIZE):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(found["grads"]) == set(expected)
        for key, grad in expected.items():
            torch.testing.assert_close(found["grads"][key], grad, rtol=1e-4,
                                       atol=1e-6 * scale, msg=key)
        for centre, single in zip(found["centres"], (method.center, method.patch_center),
                                  strict=True):
            torch.testing.assert_close(centre, single)
