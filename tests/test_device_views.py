"""Tests for mixmask.data.device_views: batches made on the device from a uint8 dataset."""

from __future__ import annotations

import pytest
import torch

from mixmask.data import load_image_set
from mixmask.data.device_views import DeviceTwoViews
from mixmask.engine import EpochBatchSampler


def make_views(image_set, sampler, seed=0):
    return DeviceTwoViews(image_set, sampler, preset="cifar", image_size=32,
                          device=torch.device("cpu"), seed=seed)


@pytest.fixture
def image_set():
    return load_image_set("synthetic", "", "train", subset=64)


def test_batches_follow_the_sampler_order_with_their_labels(image_set):
    sampler = EpochBatchSampler(64, 16, seed=3)
    sampler.set_epoch(1)
    views = make_views(image_set, sampler)
    expected = [[index for index, _ in batch] for batch in sampler]
    batches = list(views)
    assert len(batches) == len(views) == 4
    for (view1, view2, labels), indices in zip(batches, expected, strict=True):
        assert view1.shape == view2.shape == (16, 3, 32, 32)
        assert view1.dtype == torch.float32
        assert not torch.equal(view1, view2)  # two independent views
        assert torch.equal(labels, image_set.labels[indices])


def test_views_are_a_function_of_seed_epoch_and_batch_so_resume_is_exact(image_set):
    sampler = EpochBatchSampler(64, 16, seed=0)
    sampler.set_epoch(2)
    straight = list(make_views(image_set, sampler))
    sampler.set_epoch(2, start_batch=2)  # a run resumed after two batches of epoch 2
    resumed = list(make_views(image_set, sampler))
    for (a1, a2, _), (b1, b2, _) in zip(straight[2:], resumed, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    sampler.set_epoch(3)
    other_epoch = next(iter(make_views(image_set, sampler)))
    assert not torch.equal(other_epoch[0], straight[0][0])


def test_files_on_disk_are_refused_with_a_clear_message(image_set):
    from mixmask.data.datasets import ImageSet

    on_disk = ImageSet(None, ["a.jpg"], None, [], image_set.mean, image_set.std)
    with pytest.raises(ValueError, match="data.pipeline=cpu"):
        make_views(on_disk, EpochBatchSampler(1, 1, seed=0))
