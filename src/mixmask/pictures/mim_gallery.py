"""Pictures of masked image modeling (MAE, PixMIM, A2MIM): what the encoder is given, what
the loss regresses and, for a trained run, what the model predicts.

``mixmask show-masks CONFIG`` on a MIM config draws one masking of the config's training
views (the weights are untrained, so no prediction is shown); ``mixmask reconstruct RUN
--out PNG`` draws the run's predictions on test images. Columns are images; rows, top to
bottom (:func:`mim_rows`): the original, the mask (white = visible, black = masked), the
encoder's input, the low-pass image (PixMIM's target, radius r = 40 x S / 224 unless set),
and for a run the reconstruction and the reconstruction pasted into the visible pixels
(MAE's visualisation notebook). The row of what the method regresses says "(target)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from mixmask.data import preset_views, view_transform
from mixmask.data.splits import load_split
from mixmask.data.transforms import eval_transform
from mixmask.errors import ConfigError, MixmaskError, writing
from mixmask.methods import PixelStats, build_method
from mixmask.methods.protocol import Method
from mixmask.methods.registry import method_class
from mixmask.pictures.masks import GALLERY_PADDING
from mixmask.runs.folder import build_run_method, load_run_checkpoint, load_run_config

MIM_LABEL_WIDTH = 128  # pixels of the label column
_PAD_VALUE = 0.5


def is_mim_method(name: str) -> bool:
    """Whether the registered method ``name`` draws masked views (MAE, A2MIM)."""

    return method_class(name).masked_views is not Method.masked_views


def mim_rows(method, images: Tensor, generator: torch.Generator, *,
             reconstruction: bool) -> list[tuple[str, Tensor]]:
    """``(label, [N, C, H, W] in [0, 1])`` rows of one masking of ``images`` (normalised
    with ``method.pixel_stats``) by ``method`` (its :meth:`~mixmask.methods.protocol.Method.
    masked_views`); ``reconstruction`` adds the prediction rows."""
    views = method.masked_views(images, generator)
    if views is None:
        raise ConfigError(f"method '{method.run_config.method.name}' is not a masked image "
                          "modeling method; its gallery is the masking axis (show-masks).")
    stats = method.pixel_stats
    mean = torch.tensor(stats.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, device=images.device).view(1, -1, 1, 1)

    def shown(normalised: Tensor) -> Tensor:
        return (normalised.float() * std + mean).clamp(0.0, 1.0)

    params = method.params
    lowpass_is_target = params.target == "lowpass"
    lowpass = (views.target if lowpass_is_target
               else method.pixel_target.lowpass(images.float()))
    keep = (~views.mask).float().expand_as(images)
    rows = [("original" + ("" if lowpass_is_target else " (target)"), shown(images)),
            ("mask", keep),
            ("input", shown(views.inputs)),
            (f"low-pass r={method.pixel_target.radius:.3g}"
             + (" (target)" if lowpass_is_target else ""),
             shown(lowpass))]
    if reconstruction:
        pasted = torch.where(views.mask, views.reconstruction, images.float())
        rows += [("reconstruction", shown(views.reconstruction)),
                 ("+ visible", shown(pasted))]
    return rows


def save_rows(rows: list[tuple[str, Tensor]], path: str | Path) -> Path:
    """One PNG: the rows as a grid (one column per image) behind a label column."""
    count = rows[0][1].shape[0]
    cells = torch.cat([row.cpu() for _, row in rows])
    if cells.shape[1] == 1:
        cells = cells.expand(-1, 3, -1, -1)
    grid = make_grid(cells, nrow=count, padding=GALLERY_PADDING, pad_value=_PAD_VALUE)
    pixels = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    gallery = Image.fromarray(pixels.contiguous().numpy())
    picture = Image.new("RGB", (gallery.width + MIM_LABEL_WIDTH, gallery.height), "white")
    picture.paste(gallery, (MIM_LABEL_WIDTH, 0))
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    cell_height = rows[0][1].shape[-2]
    for index, (label, _) in enumerate(rows):
        centre = GALLERY_PADDING + index * (cell_height + GALLERY_PADDING) + cell_height / 2
        top = draw.textbbox((0, 0), label, font=font)[3] / 2
        draw.text((2, centre - top), label, fill="black", font=font)
    with writing(path) as path:
        picture.save(path, format="PNG")
    return path


def mim_gallery_from_config(config: Any, path: str | Path, *, num_images: int = 8) -> Path:
    """``mixmask show-masks`` for a MIM config: view 1 of the first ``num_images`` training
    images through the config's augmentation (seeded by ``train.seed``), one masking drawn
    by the method at its random init (seed ``train.seed``)."""

    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    image_set = load_split(config, "train", num_images)
    if len(image_set) < num_images:
        raise ConfigError(f"the dataset has only {len(image_set)} images; lower --num-images.")
    view = view_transform(preset_views(config.data.augmentation, config.data.image_size)[0],
                          image_set.mean, image_set.std)
    torch.manual_seed(config.train.seed)
    images = torch.stack([view(image_set.load_pil(index))[0] for index in range(num_images)])
    torch.manual_seed(config.train.seed)
    method = build_method(config, PixelStats(tuple(image_set.mean), tuple(image_set.std)))
    method.eval()
    generator = torch.Generator().manual_seed(config.train.seed)
    return save_rows(mim_rows(method, images, generator, reconstruction=False), path)


def reconstruct_run(run: Path, out: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
                    checkpoint: str | None = None, num_images: int = 8) -> Path:
    """``mixmask reconstruct RUN --out PNG``: the run's predictions on the first
    ``num_images`` test images (the evaluation's centre view), one masking seeded by
    ``train.seed``."""

    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    config = load_run_config(run, list(overrides))
    if not is_mim_method(config.method.name):
        raise ConfigError(f"{run} is a '{config.method.name}' run, which reconstructs nothing; "
                          "reconstruct takes MAE, PixMIM and A2MIM runs.")
    checkpoint_path, content = load_run_checkpoint(run, checkpoint)
    # The normalisation of the evaluation protocols (the labelled train split's statistics).
    stats_set = load_split(config, "train", config.data.eval_train_subset)
    try:
        test_set = load_split(config, "test", num_images)
    except MixmaskError:
        test_set = load_split(config, "train", num_images)  # a dataset without a test split
    method = build_run_method(config, PixelStats(tuple(stats_set.mean), tuple(stats_set.std)),
                              checkpoint_path, content)
    method.eval()
    transform = eval_transform(config.data.image_size, stats_set.mean, stats_set.std,
                               resize_from_larger=config.data.image_size >= 128)
    count = min(num_images, len(test_set))
    images = torch.stack([transform(test_set.load_pil(index)) for index in range(count)])
    generator = torch.Generator().manual_seed(config.train.seed)
    return save_rows(mim_rows(method, images, generator, reconstruction=True), out)
