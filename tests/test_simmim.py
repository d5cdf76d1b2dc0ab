"""SimMIM as a method (mixmask.methods.mim.simmim): its L1 against a hand computation, the
mask token *replacing* exactly the masked cells (ViT patch embeddings; a ResNet's stem output,
with the masked input pixels at 0), every parameter learning on real CIFAR images, `mixmask
pretrain` of the CIFAR recipes, and its config errors as one sentence."""

from __future__ import annotations

import pytest
import torch
from helpers import parameters_without_gradient, pretrain_recipe_briefly

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.methods import PixelStats, build_method
from mixmask.ops.grid_masks import upsample_mask
from mixmask.ops.losses.mim import masked_l1
from mixmask.ops.optim import build_optimizer
from mixmask.train.step import training_step

VIT = ["model.backbone=vit_tiny", "model.patch_size=4"]
R18 = ["model.backbone=resnet18", "model.width=0.25"]
R50 = ["model.backbone=resnet50", "model.stem=imagenet", "model.width=0.25",
       "data.image_size=64"]


def _method(overrides, stats=None):
    config = load_config(None, ["method.name=simmim", "train.optimizer=adamw", *overrides])
    torch.manual_seed(0)
    return build_method(config, stats)


def _real_images(cifar10_tarball, count: int = 16):
    """SimMIM's one view (RRC (0.67, 1) + flip) of real CIFAR-10 images, and their stats."""
    from mixmask.data import load_image_set, preset_views, view_transform

    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=count)
    view = preset_views("a2mim_vit", 32, 1)[0]
    transform = view_transform(view, image_set.mean, image_set.std)
    torch.manual_seed(0)
    images = torch.stack([transform(image_set.load_pil(index))[0] for index in range(count)])
    return images, PixelStats(tuple(image_set.mean), tuple(image_set.std))


def _input_of(module, run) -> torch.Tensor:
    """What ``module`` receives while ``run()`` runs (a forward pre-hook)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        run()
    handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- the loss


def test_the_masked_l1_is_eq_1_computed_by_hand():
    """SimMIM's eq. 1 as models/simmim.py computes it: sum(|x - x_rec| m) / (sum(m) + 1e-5)
    / in_chans. Two of four pixels masked, three channels, prediction 0."""
    target = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]],
                            [[0.5, 0.0], [-1.0, 2.0]],
                            [[2.0, 1.0], [0.0, -3.0]]]])
    mask = torch.tensor([[[[True, False], [False, True]]]])
    # Masked pixel (0, 0): |1| + |0.5| + |2| = 3.5; pixel (1, 1): |4| + |2| + |-3| = 9.
    expected = (3.5 + 9.0) / (2 + 1e-5) / 3
    found = masked_l1(torch.zeros_like(target), target, mask)
    assert found.item() == pytest.approx(expected, rel=1e-6)
    # Visible pixels do not count, whatever they hold.
    changed = target.clone()
    changed[..., 0, 1] = 100.0
    assert masked_l1(torch.zeros_like(target), changed, mask).item() == pytest.approx(expected,
                                                                                        rel=1e-6)


# --------------------------------------------------------------------------- the mask token


def test_the_vit_token_replaces_exactly_the_masked_patch_embeddings():
    method = _method(VIT).eval()
    with torch.no_grad():
        method.mask_token.normal_()
    backbone, token = method.backbone, method.mask_token.reshape(-1)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    others = torch.randn(2, 3, 32, 32, generator=generator)
    mask = method.sample_mask(images, torch.Generator().manual_seed(2))
    flat = mask.reshape(2, -1)
    assert flat.sum(dim=1).tolist() == [40, 40]  # 10 of 16 blocks of 2x2 patches

    def first_block_input(pixels, masked, replace=True):
        return _input_of(backbone.blocks[0], lambda: backbone.forward_with_mask_token(
            pixels, masked, method.mask_token, replace=replace))

    plain = first_block_input(images, torch.zeros_like(mask))  # nothing masked
    replaced = first_block_input(images, mask)
    position = backbone.pos_embed[0, 1:].expand(2, -1, -1)
    assert torch.equal(replaced[:, 0], plain[:, 0])  # the cls token is never touched
    assert torch.equal(replaced[:, 1:][~flat], plain[:, 1:][~flat])
    assert torch.equal(replaced[:, 1:][flat], (token + position)[flat])
    # Nothing of a masked patch's pixels is left: other images give the same masked tokens.
    assert torch.equal(first_block_input(others, mask)[:, 1:][flat], replaced[:, 1:][flat])
    # A2MIM's additive token (replace=False) keeps the patch embedding: it fails both checks.
    added = first_block_input(images, mask, replace=False)
    assert not torch.allclose(added[:, 1:][flat], (token + position)[flat])
    torch.testing.assert_close(added[:, 1:][flat] - plain[:, 1:][flat],
                               token.expand(int(flat.sum()), -1))
    assert not torch.allclose(first_block_input(others, mask, replace=False)[:, 1:][flat],
                              added[:, 1:][flat])


@pytest.mark.parametrize("overrides, cell", [(R18, 1), (R50, 4)])
def test_resnet_inputs_are_zero_where_masked_and_the_token_replaces_the_stem_output(
        overrides, cell):
    method = _method(overrides).eval()
    with torch.no_grad():
        method.mask_token.normal_()
    size = 64 if "data.image_size=64" in overrides else 32
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    mask = method.sample_mask(images, torch.Generator().manual_seed(2))
    assert method.cell == cell and mask.shape == (2, size // cell, size // cell)
    mask_pixels = upsample_mask(mask, size)
    backbone = method.backbone

    def step():
        method.encode(method.encoder_input(images, mask_pixels), mask)

    # The stem's input: masked pixels 0, visible ones the image.
    stem_input = _input_of(backbone.conv1, step)
    masked = mask_pixels.expand_as(images)
    assert torch.equal(stem_input[masked], torch.zeros_like(stem_input[masked]))
    assert torch.equal(stem_input[~masked], images[~masked])
    # Stage 0's input: the token on the masked cells, the stem's output elsewhere.
    replaced = _input_of(backbone.layer1, step)
    stem_output = _input_of(backbone.layer1, lambda: backbone.forward_stages(stem_input))
    cells = mask.unsqueeze(1).expand_as(replaced)
    token = method.mask_token.expand_as(replaced)
    assert torch.equal(replaced[cells], token[cells])
    assert torch.equal(replaced[~cells], stem_output[~cells])
    assert replaced.shape[1] == method.mask_token.shape[1]


def test_input_fill_none_is_the_reference_and_the_vit_default():
    images = torch.randn(2, 3, 32, 32)
    mask_pixels = torch.rand(2, 1, 32, 32) > 0.5
    for overrides in (VIT, [*R18, "method.simmim.input_fill=none"]):
        assert torch.equal(_method(overrides).encoder_input(images, mask_pixels), images)


@pytest.mark.parametrize("overrides", [VIT, R18])
def test_masked_views_show_the_hidden_pixels_at_zero_and_regress_the_image(overrides):
    method = _method(overrides).eval()
    images = torch.randn(2, 3, 32, 32)
    views = method.masked_views(images, torch.Generator().manual_seed(0))
    masked = views.mask.expand_as(images)
    assert views.mask.dtype == torch.bool and masked.float().mean().item() == pytest.approx(0.625)
    assert torch.equal(views.inputs[masked], torch.zeros_like(views.inputs[masked]))
    assert torch.equal(views.inputs[~masked], images[~masked])
    assert torch.equal(views.target, images)
    assert views.reconstruction.shape == images.shape


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("overrides", [VIT, R18])
def test_every_trainable_parameter_gets_a_gradient_on_a_real_batch(cifar10_tarball, overrides):
    images, stats = _real_images(cifar10_tarball)
    method = _method(overrides, stats)
    output = method.training_step(Batch.from_views(images), torch.Generator().manual_seed(0))
    assert torch.isfinite(output.loss) and set(output.logs) == {"loss"}
    assert output.features.shape == (16, method.feature_dim) and not output.features.requires_grad
    output.loss.backward()
    assert parameters_without_gradient(method) == []
    assert method.mask_token.requires_grad


@pytest.mark.parametrize("overrides", [VIT, R18])
def test_a_few_steps_on_a_repeated_real_batch_lower_the_loss(cifar10_tarball, overrides):
    images, stats = _real_images(cifar10_tarball, 8)
    method = _method(overrides, stats)
    optimizer = build_optimizer("adamw", method.parameter_groups("adamw"), lr=1e-3,
                                weight_decay=0.05)
    batch, losses = Batch.from_views(images), []
    for _ in range(8):
        generator = torch.Generator().manual_seed(0)  # the same masks every step
        losses.append(training_step(method, optimizer, batch, generator, 0.0).loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("recipe", ["simmim_vit_tiny", "simmim_r18"])
def test_the_recipes_pretrain_on_real_cifar(recipe, tmp_path, cifar10_tarball):
    """`mixmask pretrain` of each CIFAR-10 recipe, a few steps of 16 real images."""
    small = ["model.width=0.125"] if "r18" in recipe else []
    summary = pretrain_recipe_briefly(recipe, cifar10_tarball, tmp_path / "run", *small)
    assert summary["steps"] == 3 and summary["method"] == "simmim"
    assert 0 <= summary["knn_top1"] <= 100
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- configs


def test_the_recipes_load_with_the_references_settings():
    vit = load_config("configs/cifar10/simmim_vit_tiny.yaml")
    assert (vit.method.simmim.mask_block_size, vit.method.simmim.input_fill,
            vit.data.augmentation, vit.model.patch_size) == (8, "none", "a2mim_vit", 4)
    r18 = load_config("configs/cifar10/simmim_r18.yaml")
    assert (r18.model.backbone, r18.method.simmim.input_fill) == ("resnet18", "zero")
    vit_b = load_config("configs/imagenet/simmim_vit_base.yaml")
    # BASE_LR 1e-4 x batch / 512 is 5e-5 x batch / 256: 4e-4 at batch 2048.
    assert vit_b.train.lr * vit_b.train.batch_size / 256 == pytest.approx(4e-4)
    assert vit_b.train.scale_lr_by_batch
    assert (vit_b.train.schedule, vit_b.train.lr_milestones, vit_b.train.lr_gamma,
            vit_b.train.warmup_epochs, vit_b.train.grad_clip) == ("step", (700.0,), 0.1, 10, 5.0)
    assert (vit_b.method.simmim.mask_block_size, vit_b.method.simmim.mask_ratio,
            vit_b.data.image_size) == (32, 0.6, 224)


@pytest.mark.parametrize("recipe, override, words", [
    ("simmim_r18", "method.simmim.mask_ratio=1.0", "mask_ratio must lie in (0, 1)"),
    ("simmim_r18", "method.simmim.mask_ratio=0", "mask_ratio must lie in (0, 1)"),
    ("simmim_r18", "method.simmim.mask_block_size=6", "must divide data.image_size (32)"),
    ("simmim_vit_tiny", "method.simmim.mask_block_size=2", "multiple of the ViT patch size"),
    ("simmim_r18", "method.masking=mixmask", "no masking axis"),
])
def test_bad_settings_are_refused_in_one_sentence(capsys, recipe, override, words):
    code = main(["pretrain", f"configs/cifar10/{recipe}.yaml", override,
                 "data.root=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and words in err
    assert len(err.strip().splitlines()) == 1, err
