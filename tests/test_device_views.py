"""Tests for mixmask.data.device_views: N-view batches made on the device from a uint8
dataset (DeviceViews), and from files decoded and cropped by DataLoader workers
(DecodedViews, with mixmask.data.loaders.CropDataset), as build_train_loader picks them."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from test_data import check_marks, geometry_view, marked_image_set

from mixmask.config import load_config
from mixmask.data import (
    DATASET_STATS,
    Batch,
    EpochBatchSampler,
    ViewConfig,
    build_train_loader,
    load_image_set,
    preset_views,
)
from mixmask.data.device_views import DecodedViews, DeviceViews, _batch_seed
from mixmask.data.gpu_augment import BatchedViewAugment
from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import CropDataset, MultiViewDataset
from mixmask.train.loop import pretrain

CPU = torch.device("cpu")


def make_views(image_set, sampler, seed=0, num_views=2):
    return DeviceViews(image_set, sampler, preset_views("cifar", 32, num_views), device=CPU,
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
    for batch, indices in zip(batches, expected, strict=True):
        assert isinstance(batch, Batch)
        view1, view2 = batch.views
        assert view1.shape == view2.shape == (16, 3, 32, 32)
        assert view1.dtype == torch.float32
        assert not torch.equal(view1, view2)  # two independent views
        assert torch.equal(batch.labels, image_set.labels[indices])


def test_each_batch_is_the_augmentation_of_its_images_with_its_own_seed(image_set):
    # Independent of how the epoch's indices reach the device: batch b of epoch e is
    # augment(images[indices of b]) with a generator seeded from (seed, e, b, rank).
    sampler = EpochBatchSampler(64, 16, seed=5)
    sampler.set_epoch(2, start_batch=1)
    views = make_views(image_set, sampler, seed=5)
    for offset, (keys, batch) in enumerate(zip(sampler, views, strict=True)):
        indices = torch.tensor([index for index, _ in keys])
        generator = torch.Generator().manual_seed(_batch_seed(5, 2, 1 + offset, 0))
        (expected1, expected2), params = views.augment(image_set.images[indices], generator)
        view1, view2 = batch.views
        assert torch.equal(view1, expected1) and torch.equal(view2, expected2)
        # Each view's boxes and flips are its rows of the drawn parameters.
        assert torch.equal(torch.cat(batch.boxes), params.boxes)
        assert torch.equal(torch.cat(batch.flips), params.flip)
        assert all(box.shape == (16, 4) and box.dtype == torch.int64 for box in batch.boxes)


def test_views_are_a_function_of_seed_epoch_and_batch_so_resume_is_exact(image_set):
    sampler = EpochBatchSampler(64, 16, seed=0)
    sampler.set_epoch(2)
    straight = list(make_views(image_set, sampler))
    sampler.set_epoch(2, start_batch=2)  # a run resumed after two batches of epoch 2
    resumed = list(make_views(image_set, sampler))
    for a, b in zip(straight[2:], resumed, strict=True):
        assert torch.equal(a.views[0], b.views[0]) and torch.equal(a.views[1], b.views[1])
        assert torch.equal(a.boxes[1], b.boxes[1]) and torch.equal(a.flips[0], b.flips[0])
    sampler.set_epoch(3)
    other_epoch = next(iter(make_views(image_set, sampler)))
    assert not torch.equal(other_epoch.views[0], straight[0].views[0])


def test_files_on_disk_need_the_decoding_loader(image_set):
    on_disk = ImageSet(None, ["a.jpg"], None, [], image_set.mean, image_set.std)
    with pytest.raises(ValueError, match="DecodedViews"):
        make_views(on_disk, EpochBatchSampler(1, 1, seed=0))
    sampler = EpochBatchSampler(1, 1, seed=0)
    common = dict(pipeline="device", device=CPU, seed=0)
    views = preset_views("cifar", 32)
    assert isinstance(build_train_loader(on_disk, sampler, views, **common), DecodedViews)
    assert isinstance(build_train_loader(image_set, sampler, views, **common), DeviceViews)


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_in_memory_device_loader_yields_n_views(image_set, num_views):
    sampler = EpochBatchSampler(64, 16, seed=1)
    loader = build_train_loader(image_set, sampler, preset_views("byol_cifar", 24, num_views),
                                pipeline="device", device=CPU, seed=2, channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    for keys, batch in zip(sampler, batches, strict=True):
        assert batch.num_views == num_views and batch.size == 16
        assert torch.equal(batch.labels, image_set.labels[[index for index, _ in keys]])
        for view, box, flip in zip(batch.views, batch.boxes, batch.flips, strict=True):
            assert view.shape == (16, 3, 24, 24) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert box.shape == (16, 4) and flip.shape == (16,) and flip.dtype == torch.bool
        if num_views > 1:
            assert not torch.equal(batch.views[0], batch.views[1])


@pytest.mark.parametrize("num_views", [1, 3])
def test_device_pipeline_boxes_and_flips_say_where_the_mark_is(num_views):
    marked, rects = marked_image_set(12)
    sampler = EpochBatchSampler(12, 4, seed=0)
    views = [geometry_view(24)] * num_views
    for epoch in range(3):
        sampler.set_epoch(epoch)
        loader = build_train_loader(marked, sampler, views, pipeline="device", device=CPU,
                                    seed=1)
        assert isinstance(loader, DeviceViews)
        check_marks(loader, rects)


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


def decoded(image_set, sampler, *, seed=0, preset="byol", workers=0, num_views=2):
    return DecodedViews(image_set, sampler, preset_views(preset, 32, num_views), device=CPU,
                        seed=seed, num_workers=workers)


def unnormalise(views, image_set):
    mean = torch.tensor(image_set.mean).view(1, 3, 1, 1)
    std = torch.tensor(image_set.std).view(1, 3, 1, 1)
    return views * std + mean


def test_two_crops_are_pils_antialiased_resize_of_a_box_of_the_image():
    # A 12 x 10 noise image has few enough boxes to try them all: each crop must be PIL's
    # resize of one of them, by torchvision's PIL resized_crop, and of the box returned.
    rng = np.random.default_rng(1)
    image_set = ImageSet(torch.from_numpy(rng.integers(0, 256, (1, 3, 10, 12), dtype=np.uint8)),
                         None, None, [], (0.5,) * 3, (0.5,) * 3)
    image = image_set.load_pil(0)
    config = preset_views("byol", 8)[0]
    boxes = [(top, left, h, w) for h, w in itertools.product(range(1, 11), range(1, 13))
             for top in range(11 - h) for left in range(13 - w)]
    candidates = torch.stack([TF.pil_to_tensor(TF.resized_crop(image, *box, [8, 8]))
                              for box in boxes])
    dataset = CropDataset(image_set, [config, config], seed=0)
    found = []
    for epoch in range(4):
        crops, label, item_boxes, item_epoch = dataset[(0, epoch)]
        assert (label, item_epoch) == (-1, epoch)
        assert len(crops) == 2 and item_boxes.shape == (2, 4)
        assert item_boxes.dtype == torch.int64
        for crop, box in zip(crops, item_boxes.tolist(), strict=True):
            assert crop.dtype == torch.uint8 and crop.shape == (3, 8, 8)
            matches = (candidates == crop).flatten(1).all(1).nonzero().flatten().tolist()
            assert matches, "the crop is no PIL resize of any box"
            assert tuple(box) in [boxes[match] for match in matches]
            found.append(boxes[matches[0]])
    assert len(set(found)) > 4  # fresh boxes per view and per epoch
    # Views of several sizes (multi-crop): each view is cut at its own size.
    small = preset_views("byol", 6)[0]
    crops, _, item_boxes, _ = CropDataset(image_set, [config, small], seed=0)[(0, 0)]
    assert crops[0].shape == (3, 8, 8) and crops[1].shape == (3, 6, 6)
    assert torch.equal(crops[0], dataset[(0, 0)][0][0])  # view 1 draws first, as before
    assert torch.equal(crops[1], TF.pil_to_tensor(TF.resized_crop(image, *item_boxes[1].tolist(),
                                                                  [6, 6])))


def test_decoded_views_are_normalised_labelled_batches_of_the_sampler(files):
    sampler = EpochBatchSampler(12, 4, seed=1)
    sampler.set_epoch(1)
    views = decoded(files, sampler)
    batches = list(views)
    assert len(batches) == len(views) == 3
    for keys, batch in zip(sampler, batches, strict=True):
        indices = [index for index, _ in keys]
        view1, view2 = batch.views
        labels = batch.labels
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
    sampler = EpochBatchSampler(12, 4, seed=2)
    sampler.set_epoch(3)
    views = decoded(files, sampler, seed=2)
    crops = CropDataset(files, views.augment.views, seed=2)
    for offset, (keys, batch) in enumerate(zip(sampler, views, strict=True)):
        items = [crops[key] for key in keys]
        first = torch.stack([item[0][0] for item in items])
        second = torch.stack([item[0][1] for item in items])
        generator = torch.Generator().manual_seed(_batch_seed(2, 3, offset, 0))
        (expected1, expected2), params = views.augment.augment_crops([first, second], generator)
        view1, view2 = batch.views
        assert torch.equal(view1, expected1) and torch.equal(view2, expected2)
        # Boxes from the workers, flips from the device draws.
        for k in range(2):
            assert torch.equal(batch.boxes[k], torch.stack([item[2][k] for item in items]))
        assert torch.equal(torch.cat(batch.flips), params.flip)


def test_decoded_views_are_deterministic_resumable_and_worker_count_free(files):
    sampler = EpochBatchSampler(12, 4, seed=0)
    sampler.set_epoch(2)
    straight = list(decoded(files, sampler))
    again = list(decoded(files, sampler, workers=2))
    sampler.set_epoch(2, start_batch=1)
    resumed = list(decoded(files, sampler))

    def same(a: Batch, b: Batch) -> bool:
        return (all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))
                and torch.equal(a.labels, b.labels)
                and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
                and all(torch.equal(x, y) for x, y in zip(a.flips, b.flips, strict=True)))

    for a, b in zip(straight, again, strict=True):
        assert same(a, b)
    for a, b in zip(straight[1:], resumed, strict=True):
        assert same(a, b)
    sampler.set_epoch(3)
    assert not torch.equal(next(iter(decoded(files, sampler))).views[0], straight[0].views[0])
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(decoded(files, sampler, seed=1))).views[0],
                           straight[0].views[0])


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_decoded_loader_yields_n_views(files, num_views):
    sampler = EpochBatchSampler(12, 4, seed=1)
    loader = build_train_loader(files, sampler, preset_views("byol", 32, num_views),
                                pipeline="device", device=CPU, seed=0)
    assert isinstance(loader, DecodedViews)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    for keys, batch in zip(sampler, batches, strict=True):
        assert batch.num_views == num_views and batch.size == 4
        assert torch.equal(batch.labels, files.labels[[index for index, _ in keys]])
        for view, box, flip in zip(batch.views, batch.boxes, batch.flips, strict=True):
            assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32
            assert box.shape == (4, 4) and box.dtype == torch.int64 and box.is_contiguous()
            assert flip.shape == (4,) and flip.dtype == torch.bool


@pytest.mark.parametrize("num_views", [1, 3])
def test_decoded_pipeline_boxes_and_flips_say_where_the_mark_is(tmp_path, num_views):
    marked, rects = marked_image_set(12, on_disk=tmp_path / "marked")
    sampler = EpochBatchSampler(12, 4, seed=0)
    views = [geometry_view(24)] * num_views
    for epoch in range(3):
        sampler.set_epoch(epoch)
        loader = build_train_loader(marked, sampler, views, pipeline="device", device=CPU,
                                    seed=1)
        assert isinstance(loader, DecodedViews)
        check_marks(loader, rects)


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
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
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
    weights = [torch.load(tmp_path / folder / "checkpoints/last.ckpt", weights_only=True)["method"]
               for folder in ("straight", "resumed")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=0, rtol=0, msg=name)


# -- views of several sizes: DINO's multi-crop --------------------------------------------

# 2 global views at 32 px and 4 local views at 16 px (Caron et al. 2021, arXiv 2104.14294,
# sec. 3: 2 x 224 + several x 96 px; the scales are DINO's defaults).
GLOBAL_VIEWS = [dataclasses.replace(view, scale=(0.4, 1.0))
                for view in preset_views("byol_cifar", 32)]
LOCAL_VIEWS = [ViewConfig(16, scale=(0.05, 0.4))] * 4
MULTI_CROP = GLOBAL_VIEWS + LOCAL_VIEWS
SIZES = [32, 32, 16, 16, 16, 16]
CIFAR10_SUBSET = (Path(os.environ.get("MIXMASK_DATA", Path(__file__).parents[2] / "shared/data"))
                  / "cifar10_exact_subset.npz")


@pytest.fixture(params=["synthetic", "cifar10"])
def in_memory(request) -> ImageSet:
    """64 in-memory 32 px images: synthetic, or real CIFAR-10 training images."""
    if request.param == "synthetic":
        return load_image_set("synthetic", "", "train", subset=64)
    if not CIFAR10_SUBSET.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {CIFAR10_SUBSET}; set MIXMASK_DATA "
                    "to the folder holding cifar10_exact_subset.npz")
    with np.load(CIFAR10_SUBSET) as data:
        images = torch.from_numpy(data["x_train"][:64]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data["y_train"][:64]).long()
    return ImageSet(images, None, labels, [], *DATASET_STATS["cifar10"])


def same_batches(a: Batch, b: Batch) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))
            and torch.equal(a.labels, b.labels)
            and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
            and all(torch.equal(x, y) for x, y in zip(a.flips, b.flips, strict=True)))


def check_boxes_inside(batch: Batch, height: int, width: int) -> None:
    for box in batch.boxes:
        top, left, box_height, box_width = box.unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (box_height >= 1).all() and (box_width >= 1).all()
        assert (top + box_height <= height).all() and (left + box_width <= width).all()


def test_single_size_device_views_are_batched_view_augment_to_the_bit(in_memory, files):
    """Every existing recipe has views of one size: the device loaders give what one
    BatchedViewAugment, built here directly, gives on the same images and generator."""
    sampler = EpochBatchSampler(64, 16, seed=4)
    sampler.set_epoch(1, start_batch=1)
    for views, channels_last in ((preset_views("byol_cifar", 32), False),
                                 (preset_views("byol", 24, 3), True)):
        augment = BatchedViewAugment(views, mean=in_memory.mean, std=in_memory.std,
                                     channels_last=channels_last)
        loader = DeviceViews(in_memory, sampler, views, device=CPU, seed=6,
                             channels_last=channels_last)
        for offset, (keys, batch) in enumerate(zip(sampler, loader, strict=True)):
            indices = torch.tensor([index for index, _ in keys])
            generator = torch.Generator().manual_seed(_batch_seed(6, 1, 1 + offset, 0))
            expected, params = augment(in_memory.images[indices], generator)
            assert all(torch.equal(a, b) for a, b in zip(batch.views, expected, strict=True))
            assert torch.equal(torch.cat(batch.boxes), params.boxes)
            assert torch.equal(torch.cat(batch.flips), params.flip)
    # Files: the workers' crops through augment_crops of one BatchedViewAugment.
    sampler = EpochBatchSampler(12, 4, seed=1)
    views = preset_views("byol", 32, 3)
    augment = BatchedViewAugment(views, mean=files.mean, std=files.std)
    crops = CropDataset(files, views, seed=3)
    loader = DecodedViews(files, sampler, views, device=CPU, seed=3)
    for offset, (keys, batch) in enumerate(zip(sampler, loader, strict=True)):
        items = [crops[key] for key in keys]
        generator = torch.Generator().manual_seed(_batch_seed(3, 0, offset, 0))
        expected, params = augment.augment_crops(
            [torch.stack([item[0][k] for item in items]) for k in range(3)], generator)
        assert all(torch.equal(a, b) for a, b in zip(batch.views, expected, strict=True))
        assert torch.equal(torch.cat(batch.flips), params.flip)


def test_multi_crop_device_views_are_each_size_group_in_view_order(in_memory):
    """2 x 32 px + 4 x 16 px: per batch, the global views' BatchedViewAugment and then the
    local views' on the same images and the batch's generator; the global views are the
    single-size loader's, bit for bit."""
    sampler = EpochBatchSampler(64, 16, seed=3)
    sampler.set_epoch(1)
    loader = DeviceViews(in_memory, sampler, MULTI_CROP, device=CPU, seed=5)
    single_size = list(DeviceViews(in_memory, sampler, GLOBAL_VIEWS, device=CPU, seed=5))
    global_augment, local_augment = (
        BatchedViewAugment(views, mean=in_memory.mean, std=in_memory.std)
        for views in (GLOBAL_VIEWS, LOCAL_VIEWS))
    areas = []
    for offset, (keys, batch) in enumerate(zip(sampler, loader, strict=True)):
        indices = torch.tensor([index for index, _ in keys])
        assert batch.num_views == 6 and torch.equal(batch.labels, in_memory.labels[indices])
        for view, box, flip, size in zip(batch.views, batch.boxes, batch.flips, SIZES,
                                         strict=True):
            assert view.shape == (16, 3, size, size) and view.dtype == torch.float32
            assert box.shape == (16, 4) and flip.shape == (16,)
        generator = torch.Generator().manual_seed(_batch_seed(5, 1, offset, 0))
        global_views, global_params = global_augment(in_memory.images[indices], generator)
        local_views, local_params = local_augment(in_memory.images[indices], generator)
        for view, expected in zip(batch.views, global_views + local_views, strict=True):
            assert torch.equal(view, expected)
        assert torch.equal(torch.cat(batch.boxes[:2]), global_params.boxes)
        assert torch.equal(torch.cat(batch.boxes[2:]), local_params.boxes)
        assert torch.equal(torch.cat(batch.flips[2:]), local_params.flip)
        assert same_batches(Batch(batch.views[:2], batch.labels, batch.boxes[:2],
                                  batch.flips[:2]), single_size[offset])
        check_boxes_inside(batch, 32, 32)
        areas.append(torch.stack([box[:, 2] * box[:, 3] for box in batch.boxes]) / 32**2)
    # Local crops cover 5-40% of the image, global ones 40-100% (up to the boxes' rounding).
    areas = torch.cat(areas, dim=1)
    assert 0.4 <= areas[:2].mean() <= 1.0 and 0.05 <= areas[2:].mean() <= 0.4
    assert (areas[:2].amin(1) > 0.3).all() and (areas[2:].amax(1) < 0.5).all()


def test_multi_crop_device_views_are_deterministic_and_resume_exactly(in_memory):
    sampler = EpochBatchSampler(64, 16, seed=0)
    sampler.set_epoch(2)
    straight = list(DeviceViews(in_memory, sampler, MULTI_CROP, device=CPU, seed=1))
    again = list(DeviceViews(in_memory, sampler, MULTI_CROP, device=CPU, seed=1))
    sampler.set_epoch(2, start_batch=2)  # a run resumed after two batches of epoch 2
    resumed = list(DeviceViews(in_memory, sampler, MULTI_CROP, device=CPU, seed=1))
    assert len(resumed) == 2
    assert all(same_batches(a, b) for a, b in zip(straight, again, strict=True))
    assert all(same_batches(a, b) for a, b in zip(straight[2:], resumed, strict=True))
    sampler.set_epoch(3)
    other_epoch = next(iter(DeviceViews(in_memory, sampler, MULTI_CROP, device=CPU, seed=1)))
    assert not torch.equal(other_epoch.views[3], straight[0].views[3])


def test_multi_crop_decoded_views_cut_each_view_at_its_size(files):
    """Files: the workers cut each view's crop at its own size (one uint8 tensor per view),
    the device runs each size's augment_crops in turn; deterministic, worker-count free and
    resumable."""
    sampler = EpochBatchSampler(12, 4, seed=2)
    sampler.set_epoch(1)
    straight = list(DecodedViews(files, sampler, MULTI_CROP, device=CPU, seed=2))
    crops = CropDataset(files, MULTI_CROP, seed=2)
    global_augment, local_augment = (
        BatchedViewAugment(views, mean=files.mean, std=files.std)
        for views in (GLOBAL_VIEWS, LOCAL_VIEWS))
    for offset, (keys, batch) in enumerate(zip(sampler, straight, strict=True)):
        items = [crops[key] for key in keys]
        per_view = [torch.stack([item[0][k] for item in items]) for k in range(6)]
        assert [crop.shape[-1] for crop in per_view] == SIZES
        generator = torch.Generator().manual_seed(_batch_seed(2, 1, offset, 0))
        global_views, _ = global_augment.augment_crops(per_view[:2], generator)
        local_views, local_params = local_augment.augment_crops(per_view[2:], generator)
        for k, (view, expected) in enumerate(zip(batch.views, global_views + local_views,
                                                 strict=True)):
            assert view.shape == (4, 3, SIZES[k], SIZES[k]) and torch.equal(view, expected)
            assert torch.equal(batch.boxes[k], torch.stack([item[2][k] for item in items]))
        assert torch.equal(torch.cat(batch.flips[2:]), local_params.flip)
        check_boxes_inside(batch, 40, 48)
    again = list(DecodedViews(files, sampler, MULTI_CROP, device=CPU, seed=2, num_workers=2))
    sampler.set_epoch(1, start_batch=1)
    resumed = list(DecodedViews(files, sampler, MULTI_CROP, device=CPU, seed=2))
    assert all(same_batches(a, b) for a, b in zip(straight, again, strict=True))
    assert all(same_batches(a, b) for a, b in zip(straight[1:], resumed, strict=True))


def test_multi_crop_host_views_collate_each_view_at_its_size(in_memory):
    """The CPU pipeline needs nothing new: each view is collated on its own."""
    sampler = EpochBatchSampler(64, 16, seed=1)
    sampler.set_epoch(1)
    loader = build_train_loader(in_memory, sampler, MULTI_CROP, pipeline="cpu", device=CPU,
                                seed=3)
    dataset = MultiViewDataset(in_memory, MULTI_CROP, seed=3)
    straight = list(loader)
    for keys, batch in itertools.islice(zip(sampler, straight, strict=True), 2):
        items = [dataset[key] for key in keys]
        assert batch.num_views == 6
        for k, size in enumerate(SIZES):
            assert batch.views[k].shape == (16, 3, size, size)
            assert torch.equal(batch.views[k], torch.stack([item[0][k] for item in items]))
            assert torch.equal(batch.boxes[k], torch.stack([item[2][k] for item in items]))
            assert torch.equal(batch.flips[k], torch.stack([item[3][k] for item in items]))
        check_boxes_inside(batch, 32, 32)
    sampler.set_epoch(1, start_batch=3)
    resumed = list(build_train_loader(in_memory, sampler, MULTI_CROP, pipeline="cpu",
                                      device=CPU, seed=3))
    assert all(same_batches(a, b) for a, b in zip(straight[3:], resumed, strict=True))


@pytest.mark.parametrize("pipeline, on_disk", [("cpu", False), ("device", False),
                                               ("device", True)])
def test_multi_crop_boxes_and_flips_say_where_the_mark_is(tmp_path, pipeline, on_disk):
    """Views of two sizes, interleaved: every view's box and flip, in view order, say which
    part of the image it shows, in all three loaders."""
    marked, rects = marked_image_set(12, on_disk=tmp_path / "marked" if on_disk else None)
    sampler = EpochBatchSampler(12, 4, seed=0)
    views = [geometry_view(24), geometry_view(12), geometry_view(24), geometry_view(12)]
    for epoch in range(2):
        sampler.set_epoch(epoch)
        loader = build_train_loader(marked, sampler, views, pipeline=pipeline, device=CPU,
                                    seed=1)
        batches = list(loader)
        assert [view.shape[-1] for view in batches[0].views] == [24, 12, 24, 12]
        check_marks(batches, rects)
