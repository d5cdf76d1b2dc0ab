"""The training loader: the CPU pipeline (:mod:`mixmask.data.loaders`, PIL in DataLoader
workers) or the device pipeline (:mod:`mixmask.data.device_views`, batched on the GPU), as
``data.pipeline`` picks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from mixmask.data.device_views import DecodedViews, DeviceViews
from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import HostViews
from mixmask.data.views import ViewConfig


def build_train_loader(
    image_set: ImageSet,
    batch_sampler,
    views: Sequence[ViewConfig],
    *,
    pipeline: Literal["cpu", "device"],
    device: torch.device,
    seed: int,
    rank: int = 0,
    num_workers: int = 0,
    channels_last: bool = False,
):
    """The training loader: an iterable of :class:`~mixmask.data.batch.Batch` on
    ``device``, one per batch of ``batch_sampler`` (lists of ``(index, epoch)``, as
    :class:`~mixmask.data.loaders.EpochBatchSampler` yields them), with ``len()`` =
    ``len(batch_sampler)``.

    views: one :class:`~mixmask.data.views.ViewConfig` per view, in view order
        (:func:`~mixmask.data.views.preset_views` gives a preset's).
    pipeline: "cpu", :class:`~mixmask.data.loaders.HostViews` (PIL in ``num_workers``
        DataLoader workers);
        "device", :class:`~mixmask.data.device_views.DeviceViews` for an in-memory
        ImageSet (``image_set.images`` is not None; no workers) or
        :class:`~mixmask.data.device_views.DecodedViews` for files (``num_workers``
        workers decode and crop).
    seed: the run's seed; items draw from :func:`~mixmask.data.loaders.item_seed`
        (seed, epoch, index) and device batches from (seed, epoch, batch, rank).
    channels_last: the views in ``torch.channels_last`` memory format.
    """
    device = torch.device(device)
    if pipeline == "cpu":
        return HostViews(image_set, batch_sampler, views, device=device, seed=seed,
                         num_workers=num_workers, channels_last=channels_last)
    if pipeline == "device":
        common = dict(device=device, seed=seed, rank=rank, channels_last=channels_last)
        if image_set.images is not None:
            return DeviceViews(image_set, batch_sampler, views, **common)
        return DecodedViews(image_set, batch_sampler, views, num_workers=num_workers, **common)
    raise ValueError(f"Unknown pipeline {pipeline!r}. Use one of: cpu, device.")
