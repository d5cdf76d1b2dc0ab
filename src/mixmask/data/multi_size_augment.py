"""Views of several sizes on the device (DINO's multi-crop): one
:class:`~mixmask.data.gpu_augment.BatchedViewAugment` per group of views that can share
one, the views handed back in view order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from mixmask.data.gpu_augment import SHARED_ATTRIBUTES, BatchedViewAugment, ViewParams
from mixmask.data.views import ViewConfig

__all__ = ["MultiSizeViewAugment"]


def _rows(params: ViewParams, rows: slice) -> ViewParams:
    return ViewParams(**{field.name: getattr(params, field.name)[rows]
                         for field in dataclasses.fields(ViewParams)})


class MultiSizeViewAugment:
    """N views that need not share :data:`SHARED_ATTRIBUTES`, as DINO's multi-crop
    (Caron et al. 2021, arXiv 2104.14294, sec. 3: two global views at 224 px and several
    local ones at 96 px): one :class:`BatchedViewAugment` per group of views that can
    share one, each on the same images, and the views handed back in view order.

    >>> globals_ = [ViewConfig(32, scale=(0.4, 1.0))] * 2
    >>> locals_ = [ViewConfig(16, scale=(0.05, 0.4))] * 4
    >>> augment = MultiSizeViewAugment(globals_ + locals_, mean=mean, std=std)
    >>> views, params = augment(images_uint8, generator)  # 2 x [B, 3, 32, 32], 4 x 16 px

    The same interface as :class:`BatchedViewAugment` (``__call__``, ``augment_crops``,
    ``sample_params``, ``views``, ``num_views``), which the device loaders
    (:mod:`mixmask.data.device_views`) use for every view list.

    Groups (``groups``, with their view indices in ``members``): the views with equal
    shared attributes, in the order of each group's first view. Random draws: group by
    group in that order, each as its BatchedViewAugment draws (view by view), from the
    one generator; so the first group's views are exactly what its BatchedViewAugment
    alone makes from that generator (multi-crop's global views are the single-size
    pipeline's). With one group (every preset) a call is that group's call, nothing
    added. The returned :class:`ViewParams` are in view order, as BatchedViewAugment's:
    rows ``v * B`` to ``(v + 1) * B`` are view v's. Each group runs as one batch, so the
    kernel launches grow with the number of groups, not of views.
    """

    def __init__(
        self,
        views: Sequence[ViewConfig],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
    ):
        views = tuple(views)
        if not views:
            raise ValueError("MultiSizeViewAugment needs at least one view.")
        members: dict[tuple, list[int]] = {}
        for index, view in enumerate(views):
            key = tuple(getattr(view, name) for name in SHARED_ATTRIBUTES)
            members.setdefault(key, []).append(index)
        self.views = views
        self.members = tuple(tuple(indices) for indices in members.values())
        self.groups = tuple(
            BatchedViewAugment([views[index] for index in indices], mean=mean, std=std,
                               channels_last=channels_last)
            for indices in self.members
        )

    @property
    def num_views(self) -> int:
        return len(self.views)

    def _params_in_view_order(self, per_group: Sequence[ViewParams], batch: int) -> ViewParams:
        if len(per_group) == 1:
            return per_group[0]
        rows = {}
        for params, indices in zip(per_group, self.members, strict=True):
            for position, index in enumerate(indices):
                rows[index] = _rows(params, slice(position * batch, (position + 1) * batch))
        return ViewParams.cat([rows[index] for index in range(self.num_views)])

    def _views_in_view_order(self, per_group: Sequence[list[Tensor]]) -> list[Tensor]:
        by_index = {index: view for views, indices in zip(per_group, self.members, strict=True)
                    for index, view in zip(indices, views, strict=True)}
        return [by_index[index] for index in range(self.num_views)]

    def sample_params(
        self, batch: int, height: int, width: int, *, generator=None, device=None
    ) -> ViewParams:
        """Parameters of every view, drawn group by group, returned in view order."""
        per_group = [group.sample_params(batch, height, width, generator=generator,
                                         device=device) for group in self.groups]
        return self._params_in_view_order(per_group, batch)

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], ViewParams]:
        """As :meth:`BatchedViewAugment.__call__`: V float32 views, view v [B, 3, S_v, S_v]
        with S_v its ``image_size``, and their parameters in view order."""
        if len(self.groups) == 1:
            return self.groups[0](images, generator)
        views, params = zip(*[group(images, generator) for group in self.groups], strict=True)
        return (self._views_in_view_order(views),
                self._params_in_view_order(params, images.shape[0]))

    def augment_crops(
        self,
        crops: Sequence[Tensor],
        generator: torch.Generator | None = None,
        *,
        boxes: Tensor | None = None,
    ) -> tuple[list[Tensor], ViewParams]:
        """As :meth:`BatchedViewAugment.augment_crops`: crops, one [B, 3, S_v, S_v] tensor
        per view at its own size, in view order; boxes: optional [V * B, 4] in view order."""
        if len(crops) != self.num_views:
            raise ValueError(f"Expected {self.num_views} crops (one per view), got {len(crops)}.")
        if len(self.groups) == 1:
            return self.groups[0].augment_crops(crops, generator, boxes=boxes)
        views, params = zip(*[group.augment_crops([crops[index] for index in indices], generator)
                              for group, indices in zip(self.groups, self.members, strict=True)],
                            strict=True)
        params = self._params_in_view_order(params, crops[0].shape[0])
        if boxes is not None:
            params.boxes = boxes
        return self._views_in_view_order(views), params
