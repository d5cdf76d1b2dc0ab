"""A2MIM as a method: the filled input and the mask token touch only masked positions, the
token has its stage's width, the optimiser groups follow the reference, the step learns on
real CIFAR images, and `mixmask pretrain` runs each CIFAR config."""

from __future__ import annotations

import math

import pytest
import torch

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.data.datasets import load_image_set
from mixmask.data.transforms import eval_transform
from mixmask.methods import PixelStats, build_method
from mixmask.methods.mim.a2mim import add_mask_token
from mixmask.ops.block_masks import mean_fill
from mixmask.ops.grid_masks import upsample_mask
from mixmask.ops.optim import build_optimizer
from mixmask.train.loop import pretrain
from mixmask.train.step import training_step

VIT = ["model.backbone=vit_tiny", "model.patch_size=4"]
R18 = ["model.backbone=resnet18", "model.width=0.25"]


def _method(overrides, stats=None):
    config = load_config(None, ["method.name=a2mim", "train.optimizer=adamw", *overrides])
    return build_method(config, stats)


def _cifar_batch(tarball, count: int = 16):
    image_set = load_image_set("imagefolder", str(tarball), "train", subset=count)
    transform = eval_transform(32, image_set.mean, image_set.std, resize_from_larger=False)
    images = torch.stack([transform(image_set.load_pil(i)) for i in range(count)])
    return images, PixelStats(tuple(image_set.mean), tuple(image_set.std))


def test_filled_pixels_are_the_image_mean_and_the_masked_count_is_exact(cifar10_tarball):
    images, _ = _cifar_batch(cifar10_tarball, 4)
    method = _method(R18)
    mask = method.sample_mask(images, torch.Generator().manual_seed(0))
    mask_pixels = upsample_mask(mask, 32)
    inputs = mean_fill(images, mask_pixels)
    # 8 px blocks: ceil(0.6 x 16) = 10 blocks of 64 pixels per image.
    assert (mask_pixels.sum(dim=(1, 2, 3)) == math.ceil(0.6 * 16) * 64).all()
    mean = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    masked = mask_pixels.expand_as(images)
    assert torch.equal(inputs[masked], mean[masked])
    assert torch.equal(inputs[~masked], images[~masked])


def _stage_input(method, images, mask, token_on: bool):
    """The input of the token's stage (ResNet) or of the first block (ViT), hooked."""
    seen = []
    if method.is_vit:
        module = method.backbone.blocks[method.mask_layer]
    else:
        module = [method.backbone.layer1, method.backbone.layer2, method.backbone.layer3,
                  method.backbone.layer4][method.mask_layer]
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    saved = method.mask_token.data.clone()
    if not token_on:
        method.mask_token.data.zero_()
    gamma = getattr(method, "mask_gamma", None)
    if gamma is not None and not token_on:
        saved_gamma = gamma.data.clone()
        gamma.data.fill_(1.0)  # (1 - m) x + m x = x: no token, no gain
    with torch.no_grad():
        method.encode(images, mask)
    method.mask_token.data.copy_(saved)
    if gamma is not None and not token_on:
        gamma.data.copy_(saved_gamma)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("overrides, channels, size", [
    (["model.backbone=resnet18"], 256, 32),
    (R18, 64, 32),
    (["model.backbone=resnet50", "model.stem=imagenet", "model.width=0.25"], 256, 64),
    (["model.backbone=resnet50", "model.stem=imagenet"], 1024, 64),
    (VIT, 192, 32),
])
def test_the_mask_token_touches_only_masked_positions(overrides, channels, size):
    method = _method([*overrides, f"data.image_size={size}"]).eval()
    with torch.no_grad():
        method.mask_token.normal_()
    token = method.mask_token.reshape(-1)
    assert token.numel() == channels
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    mask = method.sample_mask(images, torch.Generator().manual_seed(2))
    with_token = _stage_input(method, images, mask, True)
    without = _stage_input(method, images, mask, False)
    if method.is_vit:  # [B, 1 + N, D], cls first, never touched
        difference = with_token - without
        assert torch.equal(difference[:, 0], torch.zeros_like(difference[:, 0]))
        flat = mask.reshape(2, -1)
        patches = difference[:, 1:]
        assert torch.equal(patches[~flat], torch.zeros_like(patches[~flat]))
        torch.testing.assert_close(patches[flat], token.expand_as(patches[flat]))
        return
    # [B, C, h, w]: x where unmasked, gain * x + token where masked (mim_resnet.py).
    assert with_token.shape[1] == channels and with_token.shape[-1] == mask.shape[-1]
    gain = method.mask_gamma.reshape(1, -1, 1, 1)
    expected = torch.where(mask.unsqueeze(1), gain * without + token.reshape(1, -1, 1, 1),
                           without)
    torch.testing.assert_close(with_token, expected)
    unmasked = ~mask.unsqueeze(1).expand_as(with_token)
    assert torch.equal(with_token[unmasked], without[unmasked])


def test_add_mask_token_without_gain_is_residual():
    features = torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 4, 4) > 0.5
    token = torch.randn(1, 3, 1, 1)
    out = add_mask_token(features, mask, token)
    torch.testing.assert_close(out, features + token * mask.unsqueeze(1))


def test_the_loss_gradient_reaches_only_through_the_prediction():
    # The frequency weight itself is detached (tests/test_mim_losses.py); here: the loss
    # ignores the target's gradient path and reaches the prediction.
    method = _method(R18)
    prediction = torch.randn(2, 3, 32, 32, requires_grad=True)
    target = torch.randn(2, 3, 32, 32, requires_grad=True)
    mask_pixels = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask_pixels[..., :16, :] = True
    spatial, frequency = method.loss_terms(prediction, target, mask_pixels)
    (spatial + 0.5 * frequency).backward()
    assert prediction.grad.abs().sum() > 0
    # Visible pixels get only the composite's 1e-3 share of the frequency gradient.
    visible = prediction.grad[..., 16:, :].abs().max()
    assert visible < 1e-2 * prediction.grad[..., :16, :].abs().max()


@pytest.mark.parametrize("overrides", [VIT, R18])
def test_the_mask_token_group_has_its_lr_scale_and_no_decay(overrides):
    method = _method(overrides)
    groups = method.parameter_groups("adamw")
    token_group = groups[-1]
    assert token_group["lr_scale"] == 0.1 and token_group["weight_decay"] == 0.0
    assert set(token_group["param_names"]) <= {"mask_token", "mask_gamma"}
    names = [name for group in groups[:-1] for name in group["param_names"]]
    assert "mask_token" not in names
    trainable = [param for param in method.parameters() if param.requires_grad]
    assert len(names) + len(token_group["params"]) == len(trainable)


@pytest.mark.parametrize("overrides", [VIT, R18])
def test_a_few_steps_on_a_repeated_real_batch_lower_the_loss(cifar10_tarball, overrides):
    images, stats = _cifar_batch(cifar10_tarball, 8)
    torch.manual_seed(0)
    method = _method(overrides, stats)
    optimizer = build_optimizer("adamw", method.parameter_groups("adamw"), lr=1e-3,
                                weight_decay=0.05)
    batch = Batch.from_views(images)
    losses = []
    for _ in range(8):
        generator = torch.Generator().manual_seed(0)  # the same masks every step
        losses.append(training_step(method, optimizer, batch, generator, 0.0).loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name, extra", [
    ("a2mim_vit_tiny", []),
    ("a2mim_r18", ["model.width=0.25"]),
])
def test_a_pretrain_run_of_each_cifar_config_is_complete(tmp_path, cifar10_tarball, name,
                                                         extra):
    run = tmp_path / "run"
    config = load_config(f"configs/cifar10/{name}.yaml", [
        *extra, f"data.root={cifar10_tarball}", "data.subset=64", "data.num_workers=0",
        "data.eval_train_subset=100", "data.eval_test_subset=50", "train.batch_size=32",
        "train.epochs=1", "train.warmup_epochs=0", "train.progress_bar=false",
        "monitor.knn=false", "eval.knn=true", "eval.linear=false", f"out_dir={run}"])
    summary = pretrain(config)
    assert summary["method"] == "a2mim" and summary["steps"] == 2
    for item in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / item).is_file(), item


def test_the_masking_axis_is_refused(capsys):
    assert main(["pretrain", "configs/cifar10/a2mim_r18.yaml", "method.masking=mixmask"]) == 2
    assert "no masking axis" in capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("method.a2mim.mask_ratio=1.0", "mask_ratio"),
    ("method.a2mim.mask_layer=4", "mask_layer"),
    ("method.a2mim.mask_block_size=6", "mask_block_size"),
])
def test_bad_settings_are_refused(capsys, override, words):
    code = main(["pretrain", "configs/cifar10/a2mim_r18.yaml", override, "data.root=/nonexistent"])
    assert code == 2 and words in capsys.readouterr().err


def test_every_config_loads():
    for dataset in ("cifar10", "cifar100"):
        vit = load_config(f"configs/{dataset}/a2mim_vit_tiny.yaml")
        assert (vit.method.name, vit.data.augmentation, vit.model.patch_size) == (
            "a2mim", "a2mim_vit", 4)
        r18 = load_config(f"configs/{dataset}/a2mim_r18.yaml")
        assert (r18.method.a2mim.mask_layer, r18.data.augmentation) == (3, "a2mim_resnet")
    vit_b = load_config("configs/imagenet/a2mim_vit_base.yaml")
    assert (vit_b.train.batch_size, vit_b.train.lr, vit_b.train.scale_lr_by_batch) == (
        2048, 4e-4, False)
    # openmixup's step schedule (x0.1 at epoch 700 of 800) and gradient clip at 5.0.
    assert (vit_b.train.schedule, vit_b.train.lr_milestones, vit_b.train.grad_clip) == (
        "step", (700.0,), 5.0)
    r50 = load_config("configs/imagenet/a2mim_r50.yaml")
    assert (r50.train.epochs, r50.train.lr, r50.method.a2mim.mask_token_lr_scale) == (
        300, 1.2e-3, 0.1)
    assert (r50.train.schedule, r50.train.min_lr) == ("cosine", 1e-5)
    assert r50.method.a2mim.mask_block_size == 32 and r50.method.a2mim.mask_ratio == 0.6
