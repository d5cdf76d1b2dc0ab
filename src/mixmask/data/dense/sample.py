"""What every dense-transfer dataset yields, whatever its format on disk.

A dataset is a sequence of ``(image, target)`` pairs: ``image`` is uint8 [3, H, W] (RGB,
the file's own size) and ``target`` a :class:`DenseTarget` in the same pixel frame. The
readers (COCO JSON, Pascal VOC, ADE20k, the CIFAR mosaic) only decode; resizing,
flipping and normalising happen once, in :mod:`mixmask.data.dense.transforms`.

Class numbering:
- ``labels`` of boxes and masks (detection) run 1..K over ``DenseDataset.thing_classes``
  (torchvision's detectors reserve 0 for the background);
- ``semantic`` (segmentation) holds 0..S-1 over ``DenseDataset.segment_classes`` and
  :data:`IGNORE_INDEX` (255) where a pixel is not scored (VOC's object outlines, ADE20k's
  "other" after its zero label is reduced, pixels a resize invents).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = 255


@dataclass
class DenseTarget:
    """One image's annotations. Any part a format lacks is None (VOC detection has no
    masks; ADE20k has no boxes), and a task that needs it refuses in one sentence.

    boxes: float32 [N, 4], (x0, y0, x1, y1) in pixels, x1 > x0 and y1 > y0.
    labels: int64 [N], 1..K.
    masks: uint8 [N, H, W] of 0/1, or None.
    crowd: bool [N]: COCO's ``iscrowd`` and VOC's ``difficult``: not required to be
      found and not counted as a false positive (pycocotools' ignore regions).
    semantic: int64 [H, W] of 0..S-1 or IGNORE_INDEX, or None.
    image_id: a stable integer id (the COCO evaluation's ``image_id``).
    """

    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    masks: Tensor | None = None
    crowd: Tensor | None = None
    semantic: Tensor | None = None
    image_id: int = 0

    def __post_init__(self) -> None:
        if self.crowd is None:
            self.crowd = torch.zeros(len(self.labels), dtype=torch.bool)
        if not (len(self.boxes) == len(self.labels) == len(self.crowd)):
            raise ValueError("DenseTarget: boxes, labels and crowd must have one row per object.")
        if self.masks is not None and len(self.masks) != len(self.labels):
            raise ValueError("DenseTarget: masks must have one mask per object.")


class DenseDataset(torch.utils.data.Dataset):
    """The base of every reader: ``thing_classes`` (detection, K names; label k is
    ``thing_classes[k - 1]``), ``segment_classes`` (segmentation, S names; value s is
    ``segment_classes[s]``) and ``name`` (as results report it). Subclasses implement
    ``__len__`` and ``__getitem__ -> (uint8 [3, H, W], DenseTarget)``."""

    name: str = "dense"
    thing_classes: tuple[str, ...] = ()
    segment_classes: tuple[str, ...] = ()

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:  # pragma: no cover
        raise NotImplementedError
