"""A localisation proxy that runs here: labelled small images (CIFAR-10) pasted at
non-overlapping positions on larger canvases.

Each canvas is a pure function of (seed, split, canvas index): between ``objects[0]`` and
``objects[1]`` images of the split, each resized to a side drawn from ``object_size``,
each in its own cell of a grid of ``canvas // object_size[1]`` cells a side (so no two
overlap), at a random offset within the cell, on a canvas of the split's mean colour.
A pasted image's box is its exact extent, its instance mask fills the box, its class is
its label, and the semantic map holds label + 1 inside the box and 0 (background)
elsewhere. Train canvases draw from the train split, test canvases from the test split.

It measures whether pretrained features find and delineate whole objects among
distractors; it is not VOC or COCO (one object scale, box-shaped masks, no occlusion, a
flat background), and its numbers are not comparable to theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor

from mixmask.data.dense.sample import DenseDataset, DenseTarget
from mixmask.data.image_set import ImageSet
from mixmask.errors import ConfigError

_SPLIT_SALT = {"train": 0, "test": 1}


class CifarMosaic(DenseDataset):
    """``canvases`` canvases of ``canvas_size`` px made from ``images`` (a labelled
    :class:`~mixmask.data.image_set.ImageSet`)."""

    name = "mosaic"

    def __init__(self, images: ImageSet, *, split: str, canvases: int, canvas_size: int,
                 objects: tuple[int, int], object_size: tuple[int, int], seed: int):
        if images.labels is None or not images.classes:
            raise ConfigError("the mosaic proxy needs a labelled dataset (data.dataset "
                              "cifar10, cifar100 or a class-folder tree).")
        smallest, largest = object_size
        if not 1 <= smallest <= largest or not 1 <= objects[0] <= objects[1]:
            raise ConfigError(f"transfer.mosaic_object_size {object_size} and "
                              f"transfer.mosaic_objects {objects} must be increasing pairs "
                              "of positive integers.")
        self.cells_per_side = canvas_size // largest
        if self.cells_per_side ** 2 < objects[1]:
            raise ConfigError(
                f"a {canvas_size} px canvas holds {self.cells_per_side ** 2} objects of up "
                f"to {largest} px without overlap, fewer than transfer.mosaic_objects' "
                f"{objects[1]}; raise transfer.image_size or lower the object count.")
        self.images, self.split, self.seed = images, split, seed
        self.canvases, self.canvas_size = canvases, canvas_size
        self.objects, self.object_size = objects, object_size
        self.thing_classes = tuple(images.classes)
        self.segment_classes = ("background", *images.classes)
        self.background = torch.tensor([round(255 * value) for value in images.mean],
                                       dtype=torch.uint8)[:, None, None]

    def __len__(self) -> int:
        return self.canvases

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:
        draw = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + _SPLIT_SALT[self.split]) * 10_000_019 + index)
        count = int(torch.randint(self.objects[0], self.objects[1] + 1, (), generator=draw))
        cell = self.canvas_size // self.cells_per_side
        cells = torch.randperm(self.cells_per_side ** 2, generator=draw)[:count].tolist()
        canvas = self.background.expand(3, self.canvas_size, self.canvas_size).clone()
        semantic = torch.zeros(self.canvas_size, self.canvas_size, dtype=torch.int64)
        boxes, labels, masks = [], [], []
        for position in cells:
            source = int(torch.randint(len(self.images), (), generator=draw))
            side = int(torch.randint(self.object_size[0], self.object_size[1] + 1, (),
                                     generator=draw))
            row, column = divmod(position, self.cells_per_side)
            y0 = row * cell + int(torch.randint(cell - side + 1, (), generator=draw))
            x0 = column * cell + int(torch.randint(cell - side + 1, (), generator=draw))
            canvas[:, y0:y0 + side, x0:x0 + side] = self._pasted(source, side)
            label = self.images.label(source)
            semantic[y0:y0 + side, x0:x0 + side] = label + 1
            mask = torch.zeros(self.canvas_size, self.canvas_size, dtype=torch.uint8)
            mask[y0:y0 + side, x0:x0 + side] = 1
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(label + 1)
            masks.append(mask)
        target = DenseTarget(boxes=torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                             labels=torch.tensor(labels, dtype=torch.int64),
                             masks=torch.stack(masks) if masks else None,
                             semantic=semantic, image_id=index)
        return canvas, target

    def _pasted(self, source: int, side: int) -> Tensor:
        image = (self.images.images[source] if self.images.images is not None
                 else TF.pil_to_tensor(self.images.load_pil(source)))
        if image.shape[-2:] == (side, side):
            return image
        resized = F.interpolate(image[None].float(), size=(side, side), mode="bilinear",
                                align_corners=False, antialias=True)[0]
        return resized.round().clamp(0, 255).to(torch.uint8)
