"""What the segmentation readers (VOC, ADE20k) share: an image as uint8 RGB, a label PNG
as class indices (checked against its image), a stable integer id per image name."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from mixmask.data.image_set import open_rgb
from mixmask.errors import DatasetError


def read_rgb(path: str) -> Tensor:
    """The image at ``path`` as uint8 [3, H, W] RGB (palette, greyscale and RGBA converted)."""
    return torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1).contiguous()


def read_index_png(path: str, image_size: tuple[int, int]) -> np.ndarray:
    """A label PNG's class indices as uint8 [H, W], read as stored (a palette PNG's indices,
    not its colours); its (width, height) must be ``image_size``."""
    try:
        with PIL.Image.open(path) as png:
            mode, size = png.mode, png.size
            indices = np.array(png)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise DatasetError(f"Could not read label PNG {path!r} ({error}). Remove or replace "
                           "the file.") from None
    if mode not in ("P", "L"):
        raise DatasetError(f"Label PNG {path!r} is a {mode} image, not class indices (a palette "
                           "or greyscale PNG); use the dataset's original annotation files.")
    if size != image_size:
        raise DatasetError(f"Label PNG {path!r} is {size[0]}x{size[1]} pixels but its image is "
                           f"{image_size[0]}x{image_size[1]}; they must match pixel for pixel.")
    return indices


def stable_image_ids(names: Sequence[str]) -> list[int]:
    """An integer id per image name: its digits ("2008_000008" -> 2008000008), so an id
    leads back to its file; positions in ``names`` when the digits are not unique."""
    digits = ["".join(char for char in name if char.isdigit()) for name in names]
    if all(digits) and len(set(map(int, digits))) == len(names):
        return [int(value) for value in digits]
    return list(range(len(names)))
