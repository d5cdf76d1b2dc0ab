"""Pictures of masked image modeling: `mixmask show-masks` on MAE / PixMIM / A2MIM configs
and `mixmask reconstruct RUN`, and the masked views they draw, checked by hand."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from torch import nn

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.methods import PixelStats, build_method
from mixmask.models.vit import patchify
from mixmask.ops.losses.mim import norm_pix_target
from mixmask.pictures.masks import GALLERY_PADDING
from mixmask.pictures.mim_gallery import MIM_LABEL_WIDTH
from mixmask.train.loop import pretrain

STATS = PixelStats((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
SMALL_DECODER = ["method.mae.decoder_depth=1", "method.mae.decoder_dim=64",
                 "method.mae.decoder_heads=2", "data.root=/nonexistent"]


def _mae(*overrides: str):
    torch.manual_seed(0)
    config = load_config("configs/cifar10/mae_vit_tiny.yaml", [*SMALL_DECODER, *overrides])
    return build_method(config, STATS).eval()


class _Perfect(nn.Module):
    """A decoder that predicts exactly the norm_pix target of ``images``."""

    def __init__(self, images: torch.Tensor, patch_size: int):
        super().__init__()
        self.target = norm_pix_target(patchify(images, patch_size))

    def forward(self, encoded, restore_indices):
        return self.target


def test_mae_views_mask_a_quarter_kept_and_a_perfect_prediction_reconstructs_the_image():
    method = _mae()
    images = torch.randn(2, 3, 32, 32)
    method.decoder = _Perfect(images, method.patch_size)
    views = method.masked_views(images, torch.Generator().manual_seed(0))
    # 64 patches of 4 x 4 px, 48 masked per image.
    assert views.mask.shape == (2, 1, 32, 32)
    assert views.mask.sum(dim=(1, 2, 3)).tolist() == [48 * 16, 48 * 16]
    assert torch.equal(views.inputs, images * ~views.mask)
    # norm_pix predictions go back to each target patch's own mean and std (MAE's notebook).
    assert torch.allclose(views.reconstruction, images, atol=1e-4)


def test_pixmim_views_regress_the_low_pass_image():
    method = _mae("method.mae.target=lowpass", "method.mae.lowpass_mode=clean")
    # A constant image is all DC: its low-pass is itself.
    images = torch.full((1, 3, 32, 32), 0.3)
    views = method.masked_views(images, torch.Generator().manual_seed(0))
    assert torch.allclose(views.target, images, atol=1e-5)


def test_a2mim_views_fill_masked_pixels_with_the_image_mean():
    torch.manual_seed(0)
    method = build_method(load_config("configs/cifar10/a2mim_r18.yaml",
                                      ["data.root=/nonexistent"]), STATS).eval()
    images = torch.randn(2, 3, 32, 32)
    views = method.masked_views(images, torch.Generator().manual_seed(0))
    masked = views.mask.expand_as(images)
    means = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    assert torch.equal(views.inputs[masked], means[masked])
    assert torch.equal(views.inputs[~masked], images[~masked])
    assert views.reconstruction.shape == images.shape


def _png_size(path) -> tuple[int, int]:
    with PIL.Image.open(path) as picture:
        picture.load()
        return picture.size


@pytest.mark.parametrize("recipe", ["pixmim_vit_tiny", "a2mim_r18"])
def test_show_masks_draws_a_mim_config(tmp_path, capsys, cifar10_tarball, recipe):
    out = tmp_path / "gallery.png"
    code = main(["show-masks", f"configs/cifar10/{recipe}.yaml", f"data.root={cifar10_tarball}",
                 "--out", str(out), "--num-images", "4", *(
                     SMALL_DECODER[:3] if recipe.startswith("pixmim") else [])])
    assert code == 0, capsys.readouterr().err
    assert "low-pass" in capsys.readouterr().out
    cell = 32 + GALLERY_PADDING
    assert _png_size(out) == (MIM_LABEL_WIDTH + 4 * cell + GALLERY_PADDING,
                              4 * cell + GALLERY_PADDING)


def test_reconstruct_draws_a_runs_predictions_and_refuses_other_methods(tmp_path, capsys,
                                                                      cifar10_tarball):
    run = tmp_path / "mae"
    pretrain(load_config("configs/cifar10/mae_vit_tiny.yaml", [
        *SMALL_DECODER[:3], f"data.root={cifar10_tarball}", "data.subset=32",
        "data.eval_train_subset=64", "data.eval_test_subset=16", "data.num_workers=0",
        "train.batch_size=16", "train.epochs=1", "train.warmup_epochs=0",
        "train.progress_bar=false", "monitor.knn=false", "eval.knn=false", "eval.linear=false",
        f"out_dir={run}"]))
    out = tmp_path / "reconstruction.png"
    assert main(["reconstruct", str(run), "--out", str(out), "--num-images", "3"]) == 0
    cell = 32 + GALLERY_PADDING
    assert _png_size(out) == (MIM_LABEL_WIDTH + 3 * cell + GALLERY_PADDING,
                              6 * cell + GALLERY_PADDING)
    capsys.readouterr()
    siamese = tmp_path / "siamese"
    siamese.mkdir()
    from mixmask.config import save_config

    save_config(load_config("configs/cifar10/mocov2_r18.yaml", [f"data.root={cifar10_tarball}"]),
                siamese / "config.yaml")
    assert main(["reconstruct", str(siamese), "--out", str(tmp_path / "x.png")]) == 2
    assert "reconstructs nothing" in capsys.readouterr().err
