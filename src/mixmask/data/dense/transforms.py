"""The transforms every dense dataset shares, and batching.

Detectron2's and mmsegmentation's transfer recipes resize each image so its shorter side
is ``image_size`` (the longer one at most ``max_size``) and, in training, flip it
horizontally with probability 1/2; that is what :class:`DenseTransformed` does, with the
flip drawn from (seed, epoch, image), so a resumed run sees what the uninterrupted one saw.
Boxes scale with the image, masks and label maps are resized by nearest neighbour (a
label is never blended).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.data.dense.sample import IGNORE_INDEX, DenseDataset, DenseTarget


def resize_sample(image: Tensor, target: DenseTarget, image_size: int,
                  max_size: int) -> tuple[Tensor, DenseTarget]:
    """``image`` uint8 [3, H, W] -> float [0, 1], shorter side ``image_size`` unless the
    longer would pass ``max_size``; the target in the new frame."""
    height, width = image.shape[-2:]
    scale = min(image_size / min(height, width), max_size / max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    pixels = image.float().div_(255)
    if (new_h, new_w) == (height, width):
        return pixels, target
    pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear",
                           align_corners=False, antialias=True)[0].clamp_(0, 1)
    factors = torch.tensor([new_w / width, new_h / height] * 2)
    masks = semantic = None
    if target.masks is not None:
        masks = _nearest(target.masks, new_h, new_w)
    if target.semantic is not None:
        semantic = _nearest(target.semantic[None], new_h, new_w)[0]
    return pixels, replace(target, boxes=target.boxes * factors, masks=masks, semantic=semantic)


def _nearest(maps: Tensor, height: int, width: int) -> Tensor:
    if len(maps) == 0:
        return maps.new_zeros(0, height, width)
    resized = F.interpolate(maps[:, None].float(), size=(height, width), mode="nearest")
    return resized[:, 0].to(maps.dtype)


def flip_sample(image: Tensor, target: DenseTarget) -> tuple[Tensor, DenseTarget]:
    """The horizontal mirror image and its target: x -> W - x for the boxes."""
    width = image.shape[-1]
    boxes = target.boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0])
    boxes = boxes + torch.tensor([width, 0.0, width, 0.0])
    return image.flip(-1), replace(
        target, boxes=boxes,
        masks=None if target.masks is None else target.masks.flip(-1),
        semantic=None if target.semantic is None else target.semantic.flip(-1))


class DenseTransformed(torch.utils.data.Dataset):
    """``dataset`` resized (and, when ``train``, flipped at random). Training items are
    asked for as ``(index, epoch)`` (the batches of :class:`mixmask.eval.data.EpochBatches`),
    evaluation items by index."""

    def __init__(self, dataset: DenseDataset, *, image_size: int, max_size: int,
                 train: bool, seed: int, flip: bool = True):
        self.dataset, self.train, self.seed, self.flip = dataset, train, seed, flip
        self.image_size, self.max_size = image_size, max_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> tuple[Tensor, DenseTarget]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image, target = self.dataset[index]
        image, target = resize_sample(image, target, self.image_size, self.max_size)
        if self.train and self.flip:
            draw = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            if bool(torch.rand((), generator=draw) < 0.5):
                image, target = flip_sample(image, target)
        return image, target


def collate_dense(items: list[tuple[Tensor, DenseTarget]]) -> tuple[list[Tensor],
                                                                   list[DenseTarget]]:
    """Lists, not stacked tensors: images may differ in size (the detector pads them)."""
    return [image for image, _ in items], [target for _, target in items]


def pad_batch(images: list[Tensor], targets: list[DenseTarget],
              multiple: int = 32) -> tuple[Tensor, Tensor]:
    """Images and label maps padded (bottom and right) to a common size that ``multiple``
    divides, as mmsegmentation's ``size_divisor``: [B, 3, H, W] with zeros and [B, H, W]
    with IGNORE_INDEX, so the padding is never scored."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    batch = images[0].new_zeros(len(images), 3, height, width)
    labels = torch.full((len(images), height, width), IGNORE_INDEX, dtype=torch.int64)
    for row, (image, target) in enumerate(zip(images, targets, strict=True)):
        batch[row, :, :image.shape[-2], :image.shape[-1]] = image
        labels[row, :image.shape[-2], :image.shape[-1]] = target.semantic
    return batch, labels
