"""What every training loader yields: a :class:`Batch` of N augmented views.

Both pipelines (``data.pipeline=cpu|device``) deliver the same object on the training
device, so a method reads ``batch.views[k]`` whatever made them. Besides the pixels, each
view carries its geometry: the crop box in source-image pixels and whether it was
mirrored, which SiameseIM needs to position one view inside the other (arXiv 2206.01204,
sec. 3.2) and which the Siamese bases ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNLABELED = -1


@dataclass
class Batch:
    """N views of the same B images.

    views: per view, float images [B, C, S, S], normalised.
    labels: [B] int64, ``UNLABELED`` (-1) where the dataset has no label.
    boxes: per view, [B, 4] int64 (top, left, height, width) of the crop in source pixels.
    flips: per view, [B] bool, true where the crop was mirrored horizontally (after the
        crop, torchvision's order).
    """

    views: list[Tensor]
    labels: Tensor
    boxes: list[Tensor]
    flips: list[Tensor]

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("A Batch needs at least one view.")
        if not len(self.views) == len(self.boxes) == len(self.flips):
            raise ValueError(
                f"A Batch needs one box and one flip tensor per view, got {len(self.views)} "
                f"views, {len(self.boxes)} boxes and {len(self.flips)} flips."
            )

    @classmethod
    def from_views(cls, *views: Tensor, labels: Tensor | None = None) -> Batch:
        """A Batch of views made elsewhere (benchmarks, tests, a notebook): whole-image
        boxes, no flips, labels -1 unless given."""
        size, height, width = views[0].shape[0], views[0].shape[-2], views[0].shape[-1]
        device = views[0].device
        box = torch.tensor([0, 0, height, width], device=device).expand(size, 4)
        flip = torch.zeros(size, dtype=torch.bool, device=device)
        if labels is None:
            labels = torch.full((size,), UNLABELED, device=device)
        return cls(list(views), labels, [box] * len(views), [flip] * len(views))

    @property
    def size(self) -> int:
        """B, the number of images."""
        return self.views[0].shape[0]

    @property
    def num_views(self) -> int:
        return len(self.views)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        def move(tensor: Tensor) -> Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return Batch([move(view) for view in self.views], move(self.labels),
                     [move(box) for box in self.boxes], [move(flip) for flip in self.flips])

    def channels_last(self) -> Batch:
        """The same batch with every view in ``torch.channels_last`` memory format."""
        views = [view.contiguous(memory_format=torch.channels_last) for view in self.views]
        return Batch(views, self.labels, self.boxes, self.flips)
