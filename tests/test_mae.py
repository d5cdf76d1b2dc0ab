"""MAE and PixMIM as methods: the step learns on real CIFAR images, the decoder puts each
prediction at its patch, the recipes are the references', and a run through `mixmask
pretrain` writes a run folder that every evaluation protocol reads."""

from __future__ import annotations

import json

import pytest
import torch

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.data.datasets import load_image_set
from mixmask.data.transforms import eval_transform
from mixmask.methods import PixelStats, build_method
from mixmask.methods.mim.mae import MAEDecoder
from mixmask.models.vit import patchify
from mixmask.ops.optim import build_optimizer
from mixmask.ops.token_masks import mae_random_masking
from mixmask.train.loop import pretrain
from mixmask.train.step import training_step

SMALL = ["method.name=mae", "model.backbone=vit_tiny", "model.patch_size=4",
         "method.mae.decoder_depth=1", "method.mae.decoder_dim=64", "method.mae.decoder_heads=2",
         "data.augmentation=mae"]


def _cifar_batch(tarball, count: int = 16) -> tuple[torch.Tensor, PixelStats]:
    image_set = load_image_set("imagefolder", str(tarball), "train", subset=count)
    transform = eval_transform(32, image_set.mean, image_set.std, resize_from_larger=False)
    images = torch.stack([transform(image_set.load_pil(i)) for i in range(count)])
    return images, PixelStats(tuple(image_set.mean), tuple(image_set.std))


@pytest.mark.parametrize("target", ["pixels", "lowpass"])
def test_a_few_steps_on_a_repeated_real_batch_lower_the_loss(cifar10_tarball, target):
    images, stats = _cifar_batch(cifar10_tarball)
    torch.manual_seed(0)
    config = load_config(None, [*SMALL, f"method.mae.target={target}", "train.optimizer=adamw"])
    method = build_method(config, stats)
    optimizer = build_optimizer("adamw", method.parameter_groups("adamw"), lr=1e-3,
                                momentum=0.9, weight_decay=0.05, betas=(0.9, 0.95))
    batch = Batch.from_views(images)
    losses = []
    for _ in range(12):
        # The same masks every step (a fresh generator of the same seed): a repeated batch.
        generator = torch.Generator().manual_seed(0)
        losses.append(training_step(method, optimizer, batch, generator, 0.0).loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_decoder_puts_each_token_back_at_its_patch():
    # With no blocks, an identity embedding and a prediction head reading one coordinate,
    # the decoder's output at patch n is the token that belongs there (or the mask token).
    decoder = MAEDecoder(encoder_dim=4, grid=2, patch_size=1, dim=4, depth=0, heads=1)
    with torch.no_grad():
        decoder.embed.weight.copy_(torch.eye(4))
        decoder.embed.bias.zero_()
        decoder.mask_token.fill_(-1.0)
        decoder.pos_embed.zero_()
        decoder.norm = torch.nn.Identity()
        decoder.pred.weight.zero_()
        decoder.pred.weight[0, 0] = 1.0
        decoder.pred.bias.zero_()
    generator = torch.Generator().manual_seed(3)
    keep, mask, restore = mae_random_masking(2, 4, 0.5, generator)
    # Visible tokens carry their patch index + 10 in coordinate 0; cls carries 99.
    visible = torch.zeros(2, 3, 4)
    visible[:, 0, 0] = 99.0
    visible[:, 1:, 0] = keep.float() + 10.0
    predicted = decoder(visible, restore)[..., 0]
    expected = torch.where(mask.bool(), torch.tensor(-1.0), torch.arange(4.0) + 10.0)
    assert torch.equal(predicted, expected)


def test_the_loss_ignores_visible_patches():
    # Change the image only where patches are kept: the target changes there, the loss
    # (masked patches only) must not, given the same encoder output.
    config = load_config(None, [*SMALL, "method.mae.norm_pix=false"])
    torch.manual_seed(0)
    method = build_method(config)
    images = torch.randn(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(1)
    keep, mask, restore = mae_random_masking(2, 64, 0.75, generator)
    predicted = method.decoder(method.backbone.forward_visible(images, keep), restore)
    from mixmask.ops.losses.mim import masked_mse_per_patch

    target = method.target_patches(images)
    changed = target.clone()
    changed[~mask.bool()] += 5.0
    assert torch.equal(masked_mse_per_patch(predicted, target, mask),
                       masked_mse_per_patch(predicted, changed, mask))
    assert torch.equal(target, patchify(images, 4))  # norm_pix off: the raw patches


def test_recipes_are_the_references():
    mae = load_config("configs/imagenet/mae_vit_base.yaml")
    assert (mae.model.backbone, mae.model.patch_size, mae.train.epochs) == ("vit_base", 16, 800)
    assert (mae.train.batch_size, mae.train.lr, mae.train.scale_lr_by_batch) == (4096, 1.5e-4,
                                                                                  True)
    assert tuple(mae.train.betas) == (0.9, 0.95) and mae.train.weight_decay == 0.05
    assert (mae.method.mae.decoder_depth, mae.method.mae.decoder_dim) == (8, 512)
    assert mae.data.augmentation == "mae" and mae.method.mae.mask_ratio == 0.75
    pixmim = load_config("configs/imagenet/pixmim_vit_base.yaml")
    assert (pixmim.method.mae.target, pixmim.data.augmentation) == ("lowpass", "conservative")
    for dataset in ("cifar10", "cifar100"):
        small = load_config(f"configs/{dataset}/pixmim_vit_tiny.yaml")
        assert (small.method.name, small.method.mae.target) == ("mae", "lowpass")
        assert small.data.augmentation == "conservative" and small.model.patch_size == 4


def test_the_masking_axis_is_refused_for_mae(capsys):
    assert main(["pretrain", "configs/cifar10/mae_vit_tiny.yaml", "method.masking=mixmask"]) == 2
    assert "no masking axis" in capsys.readouterr().err


def test_mae_needs_a_token_encoder(capsys):
    code = main(["pretrain", "configs/cifar10/mae_vit_tiny.yaml", "model.backbone=resnet18",
                 "data.root=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a token encoder" in err and "convvit_tiny" in err


@pytest.mark.parametrize("variant", ["mae", "pixmim"])
def test_a_pretrain_run_is_complete_and_every_protocol_reads_it(tmp_path, cifar10_tarball,
                                                                 variant, capsys):
    run = tmp_path / "run"
    config = load_config(f"configs/cifar10/{variant}_vit_tiny.yaml", [
        "method.mae.decoder_depth=1", "method.mae.decoder_dim=64", "method.mae.decoder_heads=2",
        f"data.root={cifar10_tarball}", "data.subset=64", "data.eval_train_subset=100",
        "data.eval_test_subset=50", "data.num_workers=0", "train.batch_size=32",
        "train.epochs=1", "train.warmup_epochs=0", "train.progress_bar=false",
        "monitor.knn=false", "eval.knn=true", "eval.linear=false", f"out_dir={run}"])
    summary = pretrain(config)
    assert summary["method"] == "mae" and summary["steps"] == 2
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert 0 <= summary["knn_top1"] <= 100
    fast = ["eval.finetune_epochs=1", "eval.finetune_batch_size=16", "eval.linear_epochs=1"]
    assert main(["finetune", str(run), "--labels", "10%", *fast]) == 0
    assert main(["linear", str(run), "--protocol", "cached", *fast]) == 0
    assert main(["knn", str(run)]) == 0
    for protocol in ("finetune_10pct", "linear_cached", "knn"):
        result = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert result["method"] == "mae" and 0 <= result["top1"] <= 100
