"""Tests for mixmask.data.device_views: batches made on the device from a uint8 dataset
(DeviceTwoViews), and from files decoded and cropped by DataLoader workers
(DecodedTwoViews, with mixmask.data.loaders.TwoCropDataset)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mixmask.config import load_config
from mixmask.data import load_image_set
from mixmask.data.datasets import ImageSet
from mixmask.data.device_views import DecodedTwoViews, DeviceTwoViews, device_two_views
from mixmask.data.gpu_augment import view_config
from mixmask.data.loaders import TwoCropDataset
from mixmask.engine import EpochBatchSampler, pretrain

CPU = torch.device("cpu")


def make_views(image_set, sampler, seed=0):
    return DeviceTwoViews(image_set, sampler, preset="cifar", image_size=32, device=CPU,
                          seed=seed)


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


def test_each_batch_is_the_augmentation_of_its_images_with_its_own_seed(image_set):
    # Independent of how the epoch's indices reach the device: batch b of epoch e is
    # augment(images[indices of b]) with a generator seeded from (seed, e, b, rank).
    from mixmask.data.device_views import _batch_seed

    sampler = EpochBatchSampler(64, 16, seed=5)
    sampler.set_epoch(2, start_batch=1)
    views = make_views(image_set, sampler, seed=5)
    for offset, (batch, (view1, view2, _)) in enumerate(zip(sampler, views, strict=True)):
        indices = torch.tensor([index for index, _ in batch])
        generator = torch.Generator().manual_seed(_batch_seed(5, 2, 1 + offset, 0))
        expected1, expected2 = views.augment(image_set.images[indices], generator)
        assert torch.equal(view1, expected1) and torch.equal(view2, expected2)


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


def test_files_on_disk_need_the_decoding_loader(image_set):
    on_disk = ImageSet(None, ["a.jpg"], None, [], image_set.mean, image_set.std)
    with pytest.raises(ValueError, match="DecodedTwoViews"):
        make_views(on_disk, EpochBatchSampler(1, 1, seed=0))
    sampler = EpochBatchSampler(1, 1, seed=0)
    common = dict(preset="cifar", image_size=32, device=CPU, seed=0)
    assert isinstance(device_two_views(on_disk, sampler, **common), DecodedTwoViews)
    assert isinstance(device_two_views(image_set, sampler, **common), DeviceTwoViews)


# -- files decoded by DataLoader workers --------------------------------------------------

GREY_LEVELS = (40, 90, 140, 190, 230, 250)


def write_folder(root: Path, size: tuple[int, int] = (48, 40)) -> Path:
    """12 PNGs in two classes: class "a" noise, class "b" flat greys (GREY_LEVELS)."""
    rng = np.random.default_rng(0)
    width, height = size
    for i, level in enumerate(GREY_LEVELS):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "b").mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "a" / f"{i}.png")
        Image.new("RGB", size, (level,) * 3).save(root / "b" / f"{i}.png")
    return root


@pytest.fixture
def files(tmp_path) -> ImageSet:
    root = write_folder(tmp_path / "folder")
    image_set = load_image_set("imagefolder", str(root), "train", in_memory_max_side=32,
                               cache_dir=str(tmp_path / "cache"))
    assert image_set.paths is not None and image_set.images is None
    return image_set


def decoded(image_set, sampler, *, seed=0, preset="byol", workers=0):
    return DecodedTwoViews(image_set, sampler, preset=preset, image_size=32, device=CPU,
                           seed=seed, num_workers=workers)


def unnormalise(views, image_set):
    mean = torch.tensor(image_set.mean).view(1, 3, 1, 1)
    std = torch.tensor(image_set.std).view(1, 3, 1, 1)
    return views * std + mean


def test_two_crops_are_pils_antialiased_resize_of_a_box_of_the_image():
    # A 12 x 10 noise image has few enough boxes to try them all: each crop must be PIL's
    # resize of one of them, by torchvision's PIL resized_crop.
    rng = np.random.default_rng(1)
    image_set = ImageSet(torch.from_numpy(rng.integers(0, 256, (1, 3, 10, 12), dtype=np.uint8)),
                         None, None, [], (0.5,) * 3, (0.5,) * 3)
    image = image_set.load_pil(0)
    config = view_config("byol", 8)
    boxes = [(top, left, h, w) for h, w in itertools.product(range(1, 11), range(1, 13))
             for top in range(11 - h) for left in range(13 - w)]
    candidates = torch.stack([TF.pil_to_tensor(TF.resized_crop(image, *box, [8, 8]))
                              for box in boxes])
    dataset = TwoCropDataset(image_set, config, config, seed=0)
    found = []
    for epoch in range(4):
        first, second, label, item_epoch = dataset[(0, epoch)]
        assert (label, item_epoch) == (-1, epoch)
        for crop in (first, second):
            assert crop.dtype == torch.uint8 and crop.shape == (3, 8, 8)
            matches = (candidates == crop).flatten(1).all(1).nonzero().flatten().tolist()
            assert matches, "the crop is no PIL resize of any box"
            found.append(boxes[matches[0]])
    assert len(set(found)) > 4  # fresh boxes per view and per epoch


def test_decoded_views_are_normalised_labelled_batches_of_the_sampler(files):
    sampler = EpochBatchSampler(12, 4, seed=1)
    sampler.set_epoch(1)
    views = decoded(files, sampler)
    batches = list(views)
    assert len(batches) == len(views) == 3
    for batch, (view1, view2, labels) in zip(sampler, batches, strict=True):
        indices = [index for index, _ in batch]
        assert view1.shape == view2.shape == (4, 3, 32, 32) and view1.dtype == torch.float32
        assert labels.dtype == torch.int64 and torch.equal(labels, files.labels[indices])
        for view in (view1, view2):
            pixels = unnormalise(view, files)
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
            # Flat greys stay grey through every op (the colour ops, blur, solarize) if,
            # and only if, the views were normalised with the dataset's statistics.
            grey = pixels[labels == 1]
            torch.testing.assert_close(grey, grey[:, :1].expand_as(grey), atol=1e-5, rtol=0)
        # The noise images (label 0) do not come out flat.
        assert (unnormalise(view1, files)[labels == 0].std(dim=(1, 2, 3)) > 0.02).all()


def test_decoded_views_are_the_photometric_ops_of_each_batch_on_its_workers_crops(files):
    from mixmask.data.device_views import _batch_seed

    sampler = EpochBatchSampler(12, 4, seed=2)
    sampler.set_epoch(3)
    views = decoded(files, sampler, seed=2)
    crops = TwoCropDataset(files, views.augment.first, views.augment.second, seed=2)
    for offset, (batch, (view1, view2, _)) in enumerate(zip(sampler, views, strict=True)):
        items = [crops[key] for key in batch]
        first = torch.stack([item[0] for item in items])
        second = torch.stack([item[1] for item in items])
        generator = torch.Generator().manual_seed(_batch_seed(2, 3, offset, 0))
        expected1, expected2 = views.augment.augment_crops(first, second, generator)
        assert torch.equal(view1, expected1) and torch.equal(view2, expected2)


def test_decoded_views_are_deterministic_resumable_and_worker_count_free(files):
    sampler = EpochBatchSampler(12, 4, seed=0)
    sampler.set_epoch(2)
    straight = list(decoded(files, sampler))
    again = list(decoded(files, sampler, workers=2))
    sampler.set_epoch(2, start_batch=1)
    resumed = list(decoded(files, sampler))
    for (a1, a2, a3), (b1, b2, b3) in zip(straight, again, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(a3, b3)
    for (a1, a2, _), (b1, b2, _) in zip(straight[1:], resumed, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(decoded(files, sampler)))[0], straight[0][0])
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(decoded(files, sampler, seed=1)))[0], straight[0][0])


def test_engine_pretrains_on_files_with_the_device_pipeline(tmp_path):
    # 100 x 120 px: above load_image_set's in-memory limit (96 px), so the train set is
    # files on disk and data.pipeline=device goes through DataLoader workers.
    root = write_folder(tmp_path / "large", size=(120, 100))
    assert load_image_set("imagefolder", str(root), "train",
                          cache_dir=str(tmp_path / "cache")).paths is not None
    config = load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.pipeline=device",
        "data.augmentation=byol", "data.image_size=32", "data.num_workers=0",
        "model.width=0.125", "method.mocov2.proj_hidden_dim=32", "method.mocov2.queue_size=64",
        "train.batch_size=4", "train.epochs=1", "train.max_steps=2", "train.log_every=1",
        "train.progress_bar=false", "monitor.knn=false", "monitor.online_probe=false",
        "eval.knn=false", "eval.linear=false", f"out_dir={tmp_path / 'run'}"])
    summary = pretrain(config)
    assert summary["steps"] == 2
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["step"] == 2 and checkpoint["config"]["data"]["pipeline"] == "device"


def test_engine_resumes_mid_epoch_on_files_to_the_uninterrupted_weights(tmp_path):
    """As tests/test_engine.py's resume test, for the worker-decoded device pipeline: stop
    at step 1 of epoch 0, resume, and end with the weights of a straight 4-step run."""
    root = write_folder(tmp_path / "large", size=(120, 100))

    def run(folder, *overrides):
        return pretrain(load_config(None, [
            "data.dataset=imagefolder", f"data.root={root}", "data.pipeline=device",
            "data.subset=8", "data.image_size=16", "data.num_workers=0", "model.width=0.0625",
            "method.mocov2.proj_hidden_dim=16", "method.mocov2.queue_size=16",
            "train.batch_size=4", "train.epochs=2", "train.progress_bar=false",
            "monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
            "eval.linear=false", f"out_dir={tmp_path / folder}", *overrides]))

    assert run("straight")["steps"] == 4
    run("resumed", "train.max_steps=1")
    assert run("resumed", "resume=auto")["steps"] == 4
    weights = [torch.load(tmp_path / folder / "checkpoints/last.ckpt", weights_only=False)["method"]
               for folder in ("straight", "resumed")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=0, rtol=0, msg=name)
