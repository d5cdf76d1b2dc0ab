"""Pictures of what the masking axis does to a batch (MixMask, arXiv 2210.11456).

:func:`mask_gallery` draws every masking strategy on the same batch of normalised views
and lays the results out as one image grid; :func:`save_mask_gallery` writes it as a PNG
with a label column. Use it to check a config by eye before a long run::

    generator = torch.Generator().manual_seed(0)
    save_mask_gallery(views[:8], "runs/run/masks.png", pixel_mean=dataset_mean,
                      pixel_std=dataset_std, method_config=config.method, generator=generator)

Only torchvision and Pillow are used (no matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from mixmask.config import MethodConfig
from mixmask.data import preset_views, view_transform
from mixmask.data.splits import load_split
from mixmask.errors import ConfigError
from mixmask.methods.siamese.masking_axis import EraseMasking, MixMaskMasking, UnMixMasking
from mixmask.ops.grid_masks import upsample_mask
from mixmask.ops.tensors import channel_values

__all__ = ["GALLERY_ROWS", "GALLERY_PADDING", "LABEL_WIDTH", "mask_gallery", "save_mask_gallery"]

# Row order of the gallery, top to bottom (also the labels of the saved PNG).
GALLERY_ROWS = ("original", "keep mask", "mixmask", "switched", "erase", "un-mix")
GALLERY_PADDING = 2  # pixels between and around the cells (torchvision's make_grid default)
LABEL_WIDTH = 64  # pixels of the label column that save_mask_gallery puts on the left
_PAD_VALUE = 0.5  # grey lines, so the white/black keep-mask cells keep their outline


def mask_gallery(
    images: Tensor,
    *,
    pixel_mean: Sequence[float] | Tensor,
    pixel_std: Sequence[float] | Tensor,
    method_config: Any,
    generator: torch.Generator,
) -> Tensor:
    """One image grid [3 or C, rows * (H + 2) + 2, N * (W + 2) + 2] in [0, 1], CPU, float32.

    ``images``: a batch of normalised views [N, C, H, W], N even (e.g. 8). Each column is
    one image; the rows, top to bottom (:data:`GALLERY_ROWS`):

    0. ``original``: the views, un-normalised (``x * std + mean``, clipped to [0, 1]);
    1. ``keep mask``: the MixMask keep mask upsampled to pixels, white = kept, black =
       filled from the partner (one mask for all columns unless ``mask.per_sample``);
    2. ``mixmask``: ``M * x + (1 - M) * flip(x, 0)``, the axis's ``mixmask`` strategy;
    3. ``switched``: the complementary mixes, ``flip(mixed, 0)``: column i is the mix in
       which image i is the partner (the "1 - lambda" view of MixMask's loss);
    4. ``erase``: MSCN erasing, the axis's ``erase`` strategy;
    5. ``un-mix``: Un-Mix's Mixup or CutMix with the reversed batch, the axis's ``unmix``
       strategy (one draw for the whole row).

    ``method_config`` is a Siamese method's :class:`mixmask.config.MethodConfig` or its
    :class:`~mixmask.methods.siamese.masking_axis.MaskingAxisConfig`; each row is drawn by
    the strategy training runs (:mod:`mixmask.methods.siamese.masking_axis`), with the
    config's ``mask``, ``erase`` and ``unmix`` sections, in the order of the rows from
    ``generator`` (a CPU generator), so the same seed gives the same gallery.
    ``pixel_mean``/``pixel_std``: the per-channel statistics the views were normalised
    with.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}.")
    count, _, height, width = images.shape
    if count < 2 or count % 2:
        raise ValueError(
            f"The gallery pairs each image with the reversed batch: give an even number of "
            f"images (e.g. 8), got {count}."
        )
    mean = channel_values(pixel_mean, images.shape[1], images.device, "pixel_mean")
    std = channel_values(pixel_std, images.shape[1], images.device, "pixel_std")

    # The masking axis's own strategies (the ones training runs), each drawn once, in the
    # order of the rows; the generator is on the CPU, so it draws BEiT's host masks too.
    axis = method_config.axis if isinstance(method_config, MethodConfig) else method_config
    if axis is None:
        raise ValueError(f"method '{method_config.name}' has no masking axis to draw.")
    mix = MixMaskMasking(axis.mask).mixes(images, generator, generator)[0][1]
    erased = EraseMasking(axis.mask, axis.erase, pixel_mean, pixel_std).erase(
        images, generator, generator)
    unmixed = UnMixMasking(axis.unmix).mixes(images, generator, generator)[0][1]

    def shown(views: Tensor) -> Tensor:
        return (views.float() * std + mean).clamp(0.0, 1.0)

    keep_pixels = upsample_mask(mix.keep_mask, (height, width)).to(images.device)
    rows = [
        shown(images),
        keep_pixels.expand_as(images).float(),
        shown(mix.images),
        shown(mix.images.flip(0)),
        shown(erased),
        shown(unmixed.images),
    ]
    cells = torch.cat(rows).cpu()
    return make_grid(cells, nrow=count, padding=GALLERY_PADDING, pad_value=_PAD_VALUE)


def save_mask_gallery(
    images: Tensor,
    path: str | Path,
    *,
    pixel_mean: Sequence[float] | Tensor,
    pixel_std: Sequence[float] | Tensor,
    method_config: Any,
    generator: torch.Generator,
    labels: bool = True,
) -> Path:
    """Write :func:`mask_gallery` as an RGB PNG and return its path.

    With ``labels`` a white column of :data:`LABEL_WIDTH` pixels on the left names each
    row (:data:`GALLERY_ROWS`); the gallery itself follows, pixel for pixel, as
    ``round(255 * value)`` (single-channel images are shown grey). Parent folders are
    created.
    """
    gallery = mask_gallery(
        images,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        method_config=method_config,
        generator=generator,
    )
    if gallery.shape[0] == 1:
        gallery = gallery.expand(3, -1, -1)
    pixels = gallery.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    picture = Image.fromarray(pixels.contiguous().numpy())
    if labels:
        picture = _with_labels(picture, cell_height=images.shape[-2])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _with_labels(gallery: Image.Image, *, cell_height: int) -> Image.Image:
    labelled = Image.new("RGB", (gallery.width + LABEL_WIDTH, gallery.height), "white")
    labelled.paste(gallery, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(labelled)
    font = ImageFont.load_default()
    for row, name in enumerate(GALLERY_ROWS):
        centre = GALLERY_PADDING + row * (cell_height + GALLERY_PADDING) + cell_height / 2
        top = draw.textbbox((0, 0), name, font=font)[3] / 2
        draw.text((2, centre - top), name, fill="black", font=font)
    return labelled


def gallery_from_config(config: Any, path: str | Path, *, num_images: int = 8) -> Path:
    """The gallery of a pretrain config: the first ``num_images`` training images of
    ``data.*`` through the config's view pipeline (view 1, seeded by ``train.seed``), with
    ``method.*``'s mask, erase and Un-Mix settings (``mixmask show-masks CONFIG``)."""

    if num_images < 2 or num_images % 2:
        raise ConfigError(f"--num-images must be an even number of at least 2, got {num_images}.")
    if getattr(config.method, "axis", None) is None:
        raise ConfigError(f"show-masks draws the masking axis of the Siamese methods; method "
                          f"'{config.method.name}' has none.")
    image_set = load_split(config, "train", num_images)
    if len(image_set) < num_images:
        raise ConfigError(f"the dataset has only {len(image_set)} images; lower --num-images.")
    views = [view_transform(view, image_set.mean, image_set.std)
             for view in preset_views(config.data.augmentation, config.data.image_size)]
    torch.manual_seed(config.train.seed)
    first_views = []
    for index in range(num_images):
        # Both views are drawn, in order, so that view 1 of each image is the one of the
        # two-view stream seeded once by train.seed.
        image = image_set.load_pil(index)
        drawn = [view(image) for view in views]
        first_views.append(drawn[0][0])
    images = torch.stack(first_views)
    generator = torch.Generator().manual_seed(config.train.seed)
    return save_mask_gallery(images, path, pixel_mean=image_set.mean, pixel_std=image_set.std,
                             method_config=config.method, generator=generator)
