"""Tests for mixmask.data: datasets, views, transforms and the CPU loaders.

Fixtures are tiny PNG trees written with PIL whose pixel values encode (class, file), so
order and labels are checked against hand-written expectations, not the loader's code.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

import mixmask.data.files as files_module
import mixmask.data.image_folders as image_folders_module
from mixmask.data import (
    AUGMENTATION_PRESETS,
    DATASET_STATS,
    Batch,
    EpochBatchSampler,
    EvalDataset,
    ImageSet,
    MultiViewDataset,
    ViewConfig,
    build_train_loader,
    eval_transform,
    load_image_set,
    preset_views,
    view_transform,
)
from mixmask.data.loaders import item_seed
from mixmask.errors import DatasetError, MixmaskError

SHARED_DATA = Path(os.environ.get("MIXMASK_DATA", Path(__file__).parents[2] / "shared" / "data"))
CIFAR10_TARBALL = SHARED_DATA / "cifar10_jpeg_q75.tar.gz"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def write_png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> None:
    """A constant image whose red channel is `value` (green/blue fixed), so a decoded
    pixel identifies the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 100, 200)).save(path)


def make_class_tree(root: Path, counts: dict[str, int], size=(8, 8)) -> None:
    """root/<class>/<i>.png with red value 10 * class_rank + i (class_rank in sorted order).
    Classes are written in reverse order so the loader cannot rely on creation order."""
    for rank, name in reversed(list(enumerate(sorted(counts)))):
        for i in range(counts[name]):
            write_png(root / name / f"{i:03d}.png", 10 * rank + i, size)


def red_values(image_set: ImageSet) -> list[int]:
    return [int(np.asarray(image_set.load_pil(i))[0, 0, 0]) for i in range(len(image_set))]


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_class_tree(root / "train", {"bee": 1, "ant": 3, "cat": 2})
    make_class_tree(root / "test", {"ant": 1, "bee": 1, "cat": 1})
    return root


# --- ImageFolder ------------------------------------------------------------------------


def test_imagefolder_labels_and_round_robin_order(tree, cache):
    train = load_image_set("imagefolder", str(tree), "train", cache_dir=cache)
    assert train.classes == ["ant", "bee", "cat"] and train.num_classes == 3
    # Round-robin: ant0 bee0 cat0, ant1 cat1, ant2. Red value = 10 * class_rank + i.
    assert red_values(train) == [0, 10, 20, 1, 21, 2]
    assert train.labels.tolist() == [0, 1, 2, 0, 2, 0]
    assert train.labels.dtype == torch.int64
    assert train.images.dtype == torch.uint8 and train.images.shape == (6, 3, 8, 8)
    assert train.paths is None
    assert train.images[3, :, 0, 0].tolist() == [1, 100, 200]
    assert (train.mean, train.std) == DATASET_STATS["imagefolder"]


def test_subset_keeps_a_class_balanced_prefix(tree, cache):
    small = load_image_set("imagefolder", str(tree), "train", subset=3, cache_dir=cache)
    assert red_values(small) == [0, 10, 20]
    assert small.labels.tolist() == [0, 1, 2]
    everything = load_image_set("imagefolder", str(tree), "train", subset=1000, cache_dir=cache)
    assert len(everything) == 6


def test_split_detection(tmp_path, tree, cache):
    test = load_image_set("imagefolder", str(tree), "test", cache_dir=cache)
    assert red_values(test) == [0, 10, 20]
    assert test.classes == ["ant", "bee", "cat"]

    with_val = tmp_path / "with_val"
    make_class_tree(with_val / "train", {"a": 1, "b": 1})
    make_class_tree(with_val / "val", {"a": 2, "b": 1})
    assert red_values(load_image_set("imagefolder", str(with_val), "test", cache_dir=cache)) == [
        0, 10, 1,
    ]  # fmt: skip

    flat = tmp_path / "flat"
    make_class_tree(flat, {"a": 2, "b": 2})
    assert len(load_image_set("imagefolder", str(flat), "train", cache_dir=cache)) == 4
    with pytest.raises(DatasetError, match="no test split"):
        load_image_set("imagefolder", str(flat), "test", cache_dir=cache)

    train_only = tmp_path / "train_only"
    make_class_tree(train_only / "train", {"a": 1})
    with pytest.raises(DatasetError, match="no test/ or val/"):
        load_image_set("imagefolder", str(train_only), "test", cache_dir=cache)


def test_class_missing_from_one_split_keeps_labels_aligned(tmp_path, cache):
    root = tmp_path / "tree"
    make_class_tree(root / "train", {"a": 1, "b": 1, "c": 1})
    make_class_tree(root / "test", {"a": 1, "c": 1})
    test = load_image_set("imagefolder", str(root), "test", cache_dir=cache)
    assert test.classes == ["a", "b", "c"]
    assert test.labels.tolist() == [0, 2]


def test_unlabeled_folder(tmp_path, cache):
    folder = tmp_path / "unlabeled"
    for i, name in enumerate(["b.PNG", "a.png", "c.bmp"]):
        write_png(folder / name, 50 + i)
    (folder / "notes.txt").write_text("not an image")
    image_set = load_image_set("imagefolder", str(folder), "train", cache_dir=cache)
    assert image_set.labels is None and image_set.classes == [] and image_set.num_classes == 0
    assert red_values(image_set) == [51, 50, 52]  # sorted names: a.png, b.PNG, c.bmp
    dataset = MultiViewDataset(image_set, preset_views("cifar", 8), seed=0)
    assert dataset[(0, 0)][1] == -1
    assert EvalDataset(image_set, eval_transform(8, (0.5,) * 3, (0.5,) * 3, False))[1][1] == -1


def test_no_images_and_missing_root(tmp_path, cache):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="No images"):
        load_image_set("imagefolder", str(tmp_path / "empty"), "train", cache_dir=cache)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_set("imagefolder", str(tmp_path / "nowhere"), "train", cache_dir=cache)


def test_large_images_stay_on_disk(tmp_path, cache):
    make_class_tree(tmp_path / "big", {"a": 2, "b": 1}, size=(40, 30))
    image_set = load_image_set(
        "imagefolder", str(tmp_path / "big"), "train", in_memory_max_side=32, cache_dir=cache
    )
    assert image_set.images is None and len(image_set.paths) == 3
    assert all(os.path.isfile(p) for p in image_set.paths)
    image = image_set.load_pil(1)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert red_values(image_set) == [0, 10, 1]


def test_mixed_sizes_fall_back_to_paths(tmp_path, cache):
    write_png(tmp_path / "mixed" / "a" / "0.png", 1, (8, 8))
    write_png(tmp_path / "mixed" / "b" / "0.png", 2, (9, 8))
    image_set = load_image_set("imagefolder", str(tmp_path / "mixed"), "train", cache_dir=cache)
    assert image_set.images is None and red_values(image_set) == [1, 2]


def test_grey_and_rgba_images_become_rgb(tmp_path, cache):
    Path(tmp_path / "modes" / "a").mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(tmp_path / "modes" / "a" / "0.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "modes" / "a" / "1.png")
    image_set = load_image_set("imagefolder", str(tmp_path / "modes"), "train", cache_dir=cache)
    assert image_set.images[:, :, 0, 0].tolist() == [[77, 77, 77], [1, 2, 3]]


def test_corrupt_image_names_the_file(tmp_path, cache):
    root = tmp_path / "bad"
    make_class_tree(root, {"a": 2})
    (root / "a" / "001.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match="001.png"):
        load_image_set("imagefolder", str(root), "train", cache_dir=cache)
    # On disk, the error comes when the image is read.
    on_disk = load_image_set(
        "imagefolder", str(root), "train", in_memory_max_side=4, cache_dir=cache
    )
    on_disk.load_pil(0)
    with pytest.raises(DatasetError, match="001.png"):
        on_disk.load_pil(1)


# --- archives ---------------------------------------------------------------------------


def make_archive(source: Path, archive: Path, wrapper: str | None = "mydata") -> Path:
    mode = "w" if archive.name.endswith(".tar") else "w:gz"
    with tarfile.open(archive, mode) as tar:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            tar.add(path, arcname=f"{wrapper}/{rel}" if wrapper else rel, recursive=False)
    return archive


@pytest.mark.parametrize("name", ["data.tar.gz", "data.tgz", "data.tar"])
def test_archive_unpacked_once(tmp_path, tree, cache, monkeypatch, name):
    archive = make_archive(tree, tmp_path / name)
    first = load_image_set("imagefolder", str(archive), "train", cache_dir=cache)
    assert red_values(first) == [0, 10, 20, 1, 21, 2]
    unpacked = [p for p in Path(cache).iterdir() if p.name.startswith("data-")]
    assert len(unpacked) == 1
    marker_mtime = (unpacked[0] / "mydata" / "train" / "ant" / "000.png").stat().st_mtime_ns

    def refuse(*args):
        raise AssertionError("archive unpacked a second time")

    monkeypatch.setattr(files_module, "_extract_archive", refuse)
    test = load_image_set("imagefolder", str(archive), "test", cache_dir=cache)
    assert red_values(test) == [0, 10, 20]
    assert (unpacked[0] / "mydata" / "train" / "ant" / "000.png").stat().st_mtime_ns == (
        marker_mtime
    )
    assert not [p for p in Path(cache).iterdir() if p.name.startswith(".tmp")]


def test_archive_cache_from_env(tmp_path, tree, monkeypatch):
    archive = make_archive(tree, tmp_path / "data.tar.gz", wrapper=None)
    monkeypatch.setenv("MIXMASK_CACHE", str(tmp_path / "env_cache"))
    assert len(load_image_set("imagefolder", str(archive), "train")) == 6
    assert any(p.name.startswith("data-") for p in (tmp_path / "env_cache").iterdir())


def test_changed_archive_is_unpacked_again(tmp_path, tree, cache):
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    assert len(load_image_set("imagefolder", str(archive), "train", cache_dir=cache)) == 6
    write_png(tree / "train" / "ant" / "003.png", 3)
    make_archive(tree, archive)
    os.utime(archive, ns=(1, 10**18))  # a surely different mtime
    assert len(load_image_set("imagefolder", str(archive), "train", cache_dir=cache)) == 7


def test_interrupted_extraction_is_never_used(tmp_path, tree, cache, monkeypatch):
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    real_extract = files_module._extract_archive

    def half_then_crash(path, destination, progress=False):
        with tarfile.open(path) as tar:
            tar.extract(tar.getmembers()[0], destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(files_module, "_extract_archive", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_image_set("imagefolder", str(archive), "train", cache_dir=cache)
    assert list(Path(cache).iterdir()) == []  # the partial extraction was removed

    # A leftover staging folder from a killed process is ignored, too.
    (Path(cache) / ".tmp-unpack-dead" / "mydata").mkdir(parents=True)
    monkeypatch.setattr(files_module, "_extract_archive", real_extract)
    assert len(load_image_set("imagefolder", str(archive), "train", cache_dir=cache)) == 6


def test_corrupt_archive_names_the_file(tmp_path, tree, cache):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(DatasetError, match="garbage.tar.gz"):
        load_image_set("imagefolder", str(garbage), "train", cache_dir=cache)

    good = make_archive(tree, tmp_path / "good.tar.gz").read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="truncated.tar.gz"):
        load_image_set("imagefolder", str(truncated), "train", cache_dir=cache)
    assert not [p for p in Path(cache).iterdir() if not p.name.startswith("good")]

    (tmp_path / "notes.zip").write_bytes(b"PK")
    with pytest.raises(DatasetError, match="not a"):
        load_image_set("imagefolder", str(tmp_path / "notes.zip"), "train", cache_dir=cache)


def test_archive_escaping_its_folder_is_refused(tmp_path, cache):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escaped.png")
        info.size = len(buffer.getvalue())
        tar.addfile(info, io.BytesIO(buffer.getvalue()))
    with pytest.raises(DatasetError, match="evil.tar"):
        load_image_set("imagefolder", str(archive), "train", cache_dir=cache)
    assert not (Path(cache).parent / "escaped.png").exists()


# --- decoded-image cache ----------------------------------------------------------------


def decoded_entries(cache: str) -> list[Path]:
    return sorted(Path(cache).glob("decoded-*"))


def test_decoded_tensor_is_cached_and_sliced(tree, cache, monkeypatch):
    # A subset decodes only what it needs and writes no cache.
    load_image_set("imagefolder", str(tree), "train", subset=2, cache_dir=cache)
    assert decoded_entries(cache) == []

    full = load_image_set("imagefolder", str(tree), "train", cache_dir=cache)
    entries = decoded_entries(cache)
    assert len(entries) == 1
    on_disk = np.load(entries[0] / "images.npy")
    assert np.array_equal(on_disk, full.images.numpy())
    assert np.load(entries[0] / "labels.npy").tolist() == [0, 1, 2, 0, 2, 0]

    def refuse(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folders_module, "_decode_all", refuse)
    again = load_image_set("imagefolder", str(tree), "train", cache_dir=cache)
    assert torch.equal(again.images, full.images) and torch.equal(again.labels, full.labels)
    part = load_image_set("imagefolder", str(tree), "train", subset=4, cache_dir=cache)
    assert torch.equal(part.images, full.images[:4]) and part.labels.tolist() == [0, 1, 2, 0]


def test_decoded_cache_follows_file_changes(tree, cache):
    assert (
        load_image_set("imagefolder", str(tree), "train", cache_dir=cache).images[0, 0, 0, 0] == 0
    )
    path = tree / "train" / "ant" / "000.png"
    write_png(path, 99)
    os.utime(path, ns=(1, 10**18))
    reloaded = load_image_set("imagefolder", str(tree), "train", cache_dir=cache)
    assert reloaded.images[0, 0, 0, 0] == 99
    assert len(decoded_entries(cache)) == 2


# --- argument checks and CIFAR ----------------------------------------------------------


def test_unknown_name_split_and_negative_subset(tmp_path, cache):
    with pytest.raises(DatasetError, match="cifar10, cifar100, imagefolder, synthetic"):
        load_image_set("imagenet", str(tmp_path), "train")
    with pytest.raises(DatasetError, match="train, test"):
        load_image_set("synthetic", "", "val")
    with pytest.raises(DatasetError, match="subset"):
        load_image_set("synthetic", "", "train", subset=-1)
    assert issubclass(DatasetError, MixmaskError)


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_without_download(tmp_path, name, folder):
    with pytest.raises(DatasetError) as info:
        load_image_set(name, str(tmp_path), "train", download=False)
    message = str(info.value)
    for hint in ("data.root", "data.download=true", folder, "data.dataset=imagefolder"):
        assert hint in message


def test_cifar_download_without_internet(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetError, match="Downloading CIFAR-10 .* failed.*data.root"):
        load_image_set("cifar10", str(tmp_path), "test", download=True)


def test_cifar_from_torchvision_folder(tmp_path):
    # A minimal, format-faithful copy of torchvision's pickles: 5 train batches + test.
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    batch_pixels = {}
    for file_name, _ in tv_cifar.CIFAR10.train_list + tv_cifar.CIFAR10.test_list:
        pixels = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batch_pixels[file_name] = pixels
        with open(base / file_name, "wb") as f:
            pickle.dump({"data": pixels, "labels": [3, 1, 4, 1]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    # torchvision verifies md5 sums; these files are ours, so skip that check.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
        patch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
        train = load_image_set("cifar10", str(tmp_path), "train", subset=6)
        test = load_image_set("cifar10", str(tmp_path), "test")
    first = batch_pixels["data_batch_1"]
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
    assert train.labels.tolist() == [3, 1, 4, 1, 3, 1]
    assert train.classes == CIFAR10_CLASSES and len(test) == 4
    assert (train.mean, train.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    pixel = np.asarray(train.load_pil(0))[5, 7]
    assert pixel.tolist() == first[0].reshape(3, 32, 32)[:, 5, 7].tolist()


# --- synthetic --------------------------------------------------------------------------


def test_synthetic_is_deterministic_balanced_and_learnable():
    train = load_image_set("synthetic", "", "train")
    again = load_image_set("synthetic", "", "train")
    test = load_image_set("synthetic", "", "test")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.images.shape == (512, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 256 and not torch.equal(test.images[:8], train.images[:8])
    assert len(load_image_set("synthetic", "", "train", subset=30)) == 30
    assert torch.bincount(train.labels).tolist() == [52] * 2 + [51] * 8
    assert train.num_classes == 10
    # Nearest class mean on raw pixels separates the classes.
    x_train = train.images.flatten(1).float()
    centroids = torch.stack([x_train[train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test.images.flatten(1).float(), centroids).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


# --- views, transforms and loaders ------------------------------------------------------


def noise_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def preset_transforms(preset: str, size: int, mean, std, num_views: int = 2):
    return [view_transform(view, mean, std) for view in preset_views(preset, size, num_views)]


def draw_views(transforms, image) -> list[torch.Tensor]:
    """Each view's tensor, drawn in view order from torch's global RNG."""
    return [transform(image)[0] for transform in transforms]


def test_preset_views_names_counts_and_cycling():
    assert AUGMENTATION_PRESETS == ("mocov2", "cifar", "byol", "byol_cifar", "simclr",
                                    "conservative", "mae", "a2mim_vit", "a2mim_resnet", "siameseim",
                                    "siameseim_cifar")
    for preset in AUGMENTATION_PRESETS:
        for num_views in (1, 2, 3, 5):
            views = preset_views(preset, 48, num_views)
            assert len(views) == num_views
            assert all(isinstance(view, ViewConfig) and view.image_size == 48 for view in views)
        # Beyond the preset's own views they cycle: view k is view k mod (its count).
        one, two = preset_views(preset, 48)
        assert preset_views(preset, 48, 5) == [one, two, one, two, one]
        assert preset_views(preset, 48, 1) == [one]
    assert preset_views("cifar", 32) == [ViewConfig(32), ViewConfig(32)]
    first, second = preset_views("byol", 224)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0, 0.1, 0.2)
    # SiameseIM (DataAugmentationForSIM): BYOL's colour ops, crop_min 0.08, resampled
    # bicubic (interpolation=3); at 32 px 0.2, no blur.
    assert preset_views("siameseim", 224) == [
        dataclasses.replace(view, interpolation="bicubic") for view in (first, second)]
    first, second = preset_views("siameseim_cifar", 32)
    assert (first.scale, first.blur_p, second.blur_p, second.solarize_p) == (
        (0.2, 1.0), 0, 0, 0.2)
    assert (first.interpolation, second.interpolation) == ("bicubic", "bicubic")
    # MAE (main_pretrain.py) resamples bicubic; A2MIM (openmixup) and the Siamese recipes
    # keep torchvision's bilinear default.
    assert [preset_views(name, 32)[0].interpolation for name in
            ("mae", "a2mim_vit", "a2mim_resnet", "cifar", "byol")] == [
        "bicubic", "bilinear", "bilinear", "bilinear", "bilinear"]
    with pytest.raises(ValueError, match="Unknown augmentation preset 'autoaug'.*mocov2, cifar"):
        preset_views("autoaug", 32)
    with pytest.raises(ValueError, match="num_views must be at least 1"):
        preset_views("cifar", 32, 0)


@pytest.mark.parametrize("preset, size", [("cifar", 32), ("mocov2", 64)])
def test_two_view_shapes_and_independence(preset, size):
    torch.manual_seed(0)
    transforms = preset_transforms(preset, size, *DATASET_STATS["cifar10"])
    first, second = draw_views(transforms, noise_image(size + 8))
    assert first.shape == second.shape == (3, size, size)
    assert first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_two_view_presets_match_the_recipes():
    mocov2 = repr(view_transform(preset_views("mocov2", 224)[0], (0.5,) * 3, (0.5,) * 3))
    assert "GaussianBlur(kernel_size=(23, 23), sigma=(0.1, 2.0))" in mocov2
    assert "scale=(0.2, 1.0)" in mocov2 and "p=0.2" in mocov2
    cifar = repr(view_transform(preset_views("cifar", 32)[0], (0.5,) * 3, (0.5,) * 3))
    assert "GaussianBlur" not in cifar and "RandomHorizontalFlip" in cifar
    with pytest.raises(ValueError, match="mocov2, cifar"):
        preset_views("autoaug", 32)


def steps_of(transform) -> dict[str, object]:
    """Each op of a view pipeline by its torchvision class name (the crop and the flip
    record their draws in subclasses); RandomApply as (p, op) under the op's."""
    steps = {}
    for step in transform.transforms:
        if isinstance(step, T.RandomApply):
            (inner,) = step.transforms
            steps[type(inner).__name__] = (step.p, inner)
        else:
            name = next(kind.__name__ for kind in type(step).__mro__
                        if kind.__module__.startswith("torchvision."))
            steps[name] = step
    return steps


@pytest.mark.parametrize("preset, size, blur_p", [("byol", 224, (1.0, 0.1)),
                                                  ("byol_cifar", 32, None)])
def test_byol_presets_are_table_6_of_the_paper(preset, size, blur_p):
    """BYOL (Grill et al. 2020, Table 6): both views crop (0.08, 1), jitter (0.4, 0.4, 0.2,
    0.1) with p 0.8, grayscale 0.2, flip 0.5; blur 1.0 / 0.1 (none for CIFAR), solarize
    0.0 / 0.2 at 128; in solo-learn's order."""
    views = [steps_of(transform)
             for transform in preset_transforms(preset, size, (0.5,) * 3, (0.5,) * 3)]
    for index, steps in enumerate(views):
        order = ["RandomResizedCrop", "ColorJitter", "RandomGrayscale", "GaussianBlur",
                 "RandomSolarize", "RandomHorizontalFlip", "ToTensor", "Normalize"]
        assert list(steps) == [name for name in order if name in steps]
        assert steps["RandomResizedCrop"].scale == (0.08, 1.0)
        assert steps["RandomResizedCrop"].size == (size, size)
        jitter_p, jitter = steps["ColorJitter"]
        assert jitter_p == 0.8
        expected_ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
        ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
        assert ranges == [pytest.approx(r) for r in expected_ranges]
        assert steps["RandomGrayscale"].p == 0.2
        assert steps["RandomHorizontalFlip"].p == 0.5
        if blur_p is None:
            assert "GaussianBlur" not in steps
        else:
            p, blur = steps["GaussianBlur"]
            assert p == blur_p[index]
            assert blur.kernel_size == (23, 23) and blur.sigma == (0.1, 2.0)
    assert "RandomSolarize" not in views[0]
    solarize = views[1]["RandomSolarize"]
    assert (solarize.p, solarize.threshold) == (0.2, 128)


def test_byol_solarizes_only_view_2_about_a_fifth_of_the_time():
    # A white image stays at a grey level >= 0.6 * 255 through every op but solarization,
    # which takes it to <= 0.4 * 255.
    torch.manual_seed(0)
    transforms = preset_transforms("byol_cifar", 8, (0.0,) * 3, (1.0,) * 3)
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    draws = 1000
    levels = torch.stack([torch.stack(draw_views(transforms, white)).mean(dim=(1, 2, 3))
                          for _ in range(draws)])
    assert ((levels < 0.41) | (levels > 0.59)).all()
    solarized = (levels < 0.5).double().mean(0)
    assert solarized[0] == 0
    assert abs(solarized[1] - 0.2) < 5 * (0.2 * 0.8 / draws) ** 0.5


# The presets as the papers write them (independent of mixmask.data.views): crop scale,
# ColorJitter strengths, blur p per view, solarize p per view.
RECIPES = {
    "mocov2": ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), (0.5, 0.5), (0.0, 0.0)),
    "cifar": ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), (0.0, 0.0), (0.0, 0.0)),
    "byol": ((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), (1.0, 0.1), (0.0, 0.2)),
    "byol_cifar": ((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), (0.0, 0.0), (0.0, 0.2)),
    # solo-learn's scripts/pretrain/cifar/augmentations/symmetric.yaml (SimCLR, MoCo v3).
    "simclr": ((0.08, 1.0), (0.8, 0.8, 0.8, 0.2), (0.5, 0.5), (0.0, 0.0)),
}


def torchvision_compose(preset: str, view: int, size: int, mean, std) -> T.Compose:
    """A plain torchvision pipeline of the recipe: MoCo v2's / solo-learn's order."""
    scale, jitter, blur_p, solarize_p = RECIPES[preset]
    steps = [T.RandomResizedCrop(size, scale=scale),
             T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur_p[view] > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        if preset == "simclr":  # solo-learn's PIL blur reaches +-3 sigma: 2 x ceil(3 x 2) + 1
            kernel = max(kernel, 13)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p[view]))
    if solarize_p[view] > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p[view]))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


@pytest.mark.parametrize("preset", ["mocov2", "cifar", "byol", "byol_cifar", "simclr"])
@pytest.mark.parametrize("size, source", [(32, (32, 32)), (24, (40, 52)), (96, (120, 104))])
def test_view_transform_is_torchvisions_compose_to_the_bit(preset, size, source):
    """view_transform draws from torch's global RNG exactly as torchvision's own
    RandomResizedCrop and RandomHorizontalFlip do: under the same seed, every view of a
    preset is the plain Compose's, bit for bit, and its box is get_params' draw."""
    mean, std = DATASET_STATS["cifar10"]
    height, width = source
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    for view, config in enumerate(preset_views(preset, size)):
        ours, reference = view_transform(config, mean, std), torchvision_compose(
            preset, view, size, mean, std)
        for seed in range(6):
            torch.manual_seed(seed)
            tensor, box, flipped = ours(image)
            torch.manual_seed(seed)
            assert torch.equal(tensor, reference(image)), (view, seed)
            torch.manual_seed(seed)
            assert box == T.RandomResizedCrop.get_params(image, list(RECIPES[preset][0]),
                                                         [3 / 4, 4 / 3])
            assert isinstance(flipped, bool)


def test_normalisation_of_a_constant_grey_image():
    grey = 128
    mean, std = DATASET_STATS["cifar10"]
    expected = [(grey / 255 - m) / s for m, s in zip(mean, std, strict=True)]
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    for resize_from_larger in (False, True):
        out = eval_transform(32, mean, std, resize_from_larger)(image)
        assert out.shape == (3, 32, 32)
        assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    # Augmented views of a grey image stay grey (jitter may change the level), so undoing
    # the normalisation must give equal channels if, and only if, it used these stats.
    torch.manual_seed(0)
    transforms = preset_transforms("cifar", 16, mean, std)
    for _ in range(5):
        for view in draw_views(transforms, image):
            pixels = view * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
            assert torch.allclose(pixels, pixels[0:1].expand_as(pixels), atol=1e-5)


def test_eval_transform_sizes_and_identity():
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.5)
    imagenet_style = eval_transform(224, mean, std, resize_from_larger=True)
    assert imagenet_style(noise_image(300).resize((300, 200))).shape == (3, 224, 224)
    assert "Resize(size=256" in repr(imagenet_style)
    image = noise_image(32)
    out = eval_transform(32, mean, std, resize_from_larger=False)(image)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    expected = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(out, expected, atol=1e-6)


def test_in_memory_and_on_disk_sets_give_the_same_items(tmp_path, cache):
    root = tmp_path / "noise"
    for label, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        noise_image(16, seed=label).save(root / name / "0.png")
    in_memory = load_image_set("imagefolder", str(root), "train", cache_dir=cache)
    on_disk = load_image_set(
        "imagefolder", str(root), "train", in_memory_max_side=8, cache_dir=cache
    )
    assert in_memory.images is not None and on_disk.paths is not None
    transform = eval_transform(16, (0.5,) * 3, (0.5,) * 3, False)
    for index in range(2):
        image_a, label_a = EvalDataset(in_memory, transform)[index]
        image_b, label_b = EvalDataset(on_disk, transform)[index]
        assert torch.equal(image_a, image_b) and label_a == label_b == index

    views = preset_views("cifar", 16)
    loader = torch.utils.data.DataLoader(
        MultiViewDataset(in_memory, views, seed=0), batch_sampler=[[(0, 0), (1, 0)]]
    )
    (first, second), labels, boxes, flips = next(iter(loader))
    assert first.shape == second.shape == (2, 3, 16, 16)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1]
    assert boxes.shape == (2, 2, 4) and flips.shape == (2, 2)
    for key in [(0, 0), (1, 3)]:
        a = MultiViewDataset(in_memory, views, seed=0)[key]
        b = MultiViewDataset(on_disk, views, seed=0)[key]
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
        assert a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


# --- N views: MultiViewDataset and the CPU training loader --------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_multi_view_items_are_seeded_per_key_and_draw_views_in_order(num_views):
    image_set = load_image_set("synthetic", "", "train", subset=8)
    views = preset_views("byol_cifar", 24, num_views)
    dataset = MultiViewDataset(image_set, views, seed=3)
    assert len(dataset) == 8
    tensors, label, boxes, flips = dataset[(5, 2)]
    assert isinstance(tensors, tuple) and len(tensors) == num_views
    assert all(t.shape == (3, 24, 24) and t.dtype == torch.float32 for t in tensors)
    assert label == int(image_set.labels[5])
    assert boxes.dtype == torch.int64 and boxes.shape == (num_views, 4)
    assert flips.dtype == torch.bool and flips.shape == (num_views,)
    # A pure function of (seed, epoch, index), whatever was drawn before.
    torch.manual_seed(123)
    again = dataset[(5, 2)]
    assert all(torch.equal(a, b) for a, b in zip(tensors, again[0], strict=True))
    assert torch.equal(boxes, again[2]) and torch.equal(flips, again[3])
    assert not torch.equal(dataset[(5, 3)][0][0], tensors[0])
    assert not torch.equal(MultiViewDataset(image_set, views, seed=4)[(5, 2)][0][0], tensors[0])
    # Views draw in order from one seeded stream: item_seed, then view 1, view 2, ...
    image = image_set.load_pil(5)
    torch.manual_seed(item_seed(3, 2, 5))
    for k, config in enumerate(views):
        tensor, box, flipped = view_transform(config, image_set.mean, image_set.std)(image)
        assert torch.equal(tensor, tensors[k])
        assert box == tuple(boxes[k].tolist()) and flipped == bool(flips[k])
    # So fewer views are a prefix of more.
    three = MultiViewDataset(image_set, preset_views("byol_cifar", 24, 3), seed=3)[(5, 2)]
    assert all(torch.equal(a, b) for a, b in zip(tensors, three[0][:num_views], strict=True))


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_cpu_loader_yields_batches_of_n_views_in_the_sampler_order(num_views):
    image_set = load_image_set("synthetic", "", "train", subset=24)
    sampler = EpochBatchSampler(24, 8, seed=1)
    sampler.set_epoch(2)
    views = preset_views("cifar", 16, num_views)
    loader = build_train_loader(image_set, sampler, views, pipeline="cpu", device=CPU, seed=5)
    dataset = MultiViewDataset(image_set, views, seed=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    for keys, batch in zip(sampler, batches, strict=True):
        indices = [index for index, _ in keys]
        assert isinstance(batch, Batch) and batch.num_views == num_views and batch.size == 8
        assert torch.equal(batch.labels, image_set.labels[indices])
        items = [dataset[key] for key in keys]
        for k in range(num_views):
            assert batch.views[k].shape == (8, 3, 16, 16) and batch.views[k].dtype == torch.float32
            assert torch.equal(batch.views[k], torch.stack([item[0][k] for item in items]))
            assert batch.boxes[k].shape == (8, 4) and batch.boxes[k].dtype == torch.int64
            assert batch.boxes[k].is_contiguous() and batch.flips[k].dtype == torch.bool
            assert torch.equal(batch.boxes[k], torch.stack([item[2][k] for item in items]))
            assert torch.equal(batch.flips[k], torch.stack([item[3][k] for item in items]))


def test_cpu_loader_resumes_mid_epoch_with_workers_and_channels_last():
    image_set = load_image_set("synthetic", "", "train", subset=24)
    views = preset_views("cifar", 16)
    sampler = EpochBatchSampler(24, 6, seed=0)
    sampler.set_epoch(1)
    straight = list(build_train_loader(image_set, sampler, views, pipeline="cpu", device=CPU,
                                       seed=2))
    sampler.set_epoch(1, start_batch=2)
    loader = build_train_loader(image_set, sampler, views, pipeline="cpu", device=CPU, seed=2,
                                num_workers=2, channels_last=True)
    assert len(loader) == 2
    resumed = list(loader)
    for a, b in zip(straight[2:], resumed, strict=True):
        assert all(view.is_contiguous(memory_format=torch.channels_last) for view in b.views)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
        assert torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="Unknown pipeline 'gpu'"):
        build_train_loader(image_set, sampler, views, pipeline="gpu", device=CPU, seed=0)


# --- where the mark lands: boxes and flips say what was applied --------------------------

MARK_LEVEL, BACKGROUND = 235, 20


def marked_image_set(count: int, height: int = 48, width: int = 64, *,
                     on_disk: Path | None = None) -> tuple[ImageSet, list[tuple[int, ...]]]:
    """Dark images, each with one bright rectangle (top, left, height, width) at its own,
    off-centre position; labels are the image indices. Mean 0, std 1: the views come out
    in [0, 1]."""
    rects, images = [], torch.full((count, 3, height, width), BACKGROUND, dtype=torch.uint8)
    for index in range(count):
        rect = ((3 + 7 * index) % (height - 22), (2 + 11 * index) % (width - 28), 18, 22)
        top, left, rect_height, rect_width = rect
        images[index, :, top:top + rect_height, left:left + rect_width] = MARK_LEVEL
        rects.append(rect)
    labels = torch.arange(count)
    stats = ((0.0,) * 3, (1.0,) * 3)
    if on_disk is None:
        return ImageSet(images, None, labels, [], *stats), rects
    on_disk.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(str(on_disk / f"{index:03d}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return ImageSet(None, paths, labels, [], *stats), rects


def geometry_view(image_size: int) -> ViewConfig:
    """Only the crop and the flip: no colour op, blur or solarize."""
    return ViewConfig(image_size, scale=(0.25, 0.8), jitter_p=0.0, grayscale_p=0.0)


def mark_pixels(view: torch.Tensor, rect, box, flipped: bool) -> int:
    """Checks that ``view`` [3, S, S] in [0, 1] is the crop ``box`` (top, left, height,
    width, source pixels) of the marked image, mirrored if ``flipped``: output pixel
    (i, j) samples around source point (top + (i + 0.5) h / S, left + (j' + 0.5) w / S),
    j' = S - 1 - j when flipped. Pixels whose sample lies clearly inside the rectangle
    must be bright, those clearly outside dark; "clearly" leaves the resampling's reach
    (one pixel, or the downscale factor) plus half a pixel. Returns the number of bright
    pixels checked."""
    size = view.shape[-1]
    top, left, height, width = (float(v) for v in box)
    rows = top + (torch.arange(size) + 0.5) * height / size
    columns = left + (torch.arange(size) + 0.5) * width / size
    if flipped:
        columns = columns.flip(0)
    rect_top, rect_left, rect_height, rect_width = rect

    def classify(samples, start, length, reach):
        inside = (samples > start + reach) & (samples < start + length - reach)
        outside = (samples < start - reach) | (samples > start + length + reach)
        return inside, outside

    in_rows, out_rows = classify(rows, rect_top, rect_height, max(1.0, height / size) + 0.5)
    in_columns, out_columns = classify(columns, rect_left, rect_width,
                                       max(1.0, width / size) + 0.5)
    inside = in_rows[:, None] & in_columns[None, :]
    outside = out_rows[:, None] | out_columns[None, :]
    level = view.mean(dim=0)
    assert (level[inside] > (MARK_LEVEL - 10) / 255).all(), "the mark is not where box says"
    assert (level[outside] < (BACKGROUND + 10) / 255).all(), "bright pixels off the mark"
    return int(inside.sum())


def check_marks(batches, rects) -> None:
    """mark_pixels for every view of every sample of Batch objects (labels = image
    indices), and that the draws included both flips and marks fully in view."""
    checked, flips = [], set()
    for batch in batches:
        for k in range(batch.num_views):
            for row, index in enumerate(batch.labels.tolist()):
                box, flipped = batch.boxes[k][row].tolist(), bool(batch.flips[k][row])
                checked.append(mark_pixels(batch.views[k][row], rects[index], box, flipped))
                flips.add(flipped)
    assert flips == {False, True}
    assert sum(count > 0 for count in checked) > len(checked) // 2


def test_a_wrong_box_or_flip_fails_the_mark_check():
    image_set, rects = marked_image_set(1)
    image = image_set.images[0].float() / 255
    box = (4, 10, 30, 40)
    view = TF.resized_crop(image, *box, [24, 24], antialias=True)
    assert mark_pixels(view, rects[0], box, False) > 0
    with pytest.raises(AssertionError):
        mark_pixels(view, rects[0], box, True)
    with pytest.raises(AssertionError):
        mark_pixels(view, rects[0], (4, 10, 40, 30), False)
    with pytest.raises(AssertionError):
        mark_pixels(view, rects[0], (10, 4, 30, 40), False)


@pytest.mark.parametrize("num_views", [1, 3])
def test_cpu_pipeline_boxes_and_flips_say_where_the_mark_is(num_views):
    image_set, rects = marked_image_set(12)
    sampler = EpochBatchSampler(12, 4, seed=0)
    views = [geometry_view(24)] * num_views
    for epoch in range(3):
        sampler.set_epoch(epoch)
        check_marks(build_train_loader(image_set, sampler, views, pipeline="cpu", device=CPU,
                                       seed=1), rects)


# --- real data --------------------------------------------------------------------------


@pytest.mark.skipif(
    not CIFAR10_TARBALL.is_file(),
    reason=f"real CIFAR-10 tarball not found at {CIFAR10_TARBALL} (set MIXMASK_DATA)",
)
def test_real_cifar10_tarball_subset(tmp_path_factory):
    # Unpacking the 60k-file tarball takes ~13 s; reuse $MIXMASK_CACHE when it is set.
    cache = os.environ.get("MIXMASK_CACHE") or str(tmp_path_factory.mktemp("cifar_cache"))
    train = load_image_set(
        "imagefolder", str(CIFAR10_TARBALL), "train", subset=200, cache_dir=cache
    )
    assert len(train) == 200
    assert train.images.dtype == torch.uint8 and train.images.shape == (200, 3, 32, 32)
    assert train.classes == sorted(CIFAR10_CLASSES)
    assert torch.bincount(train.labels, minlength=10).tolist() == [20] * 10
    assert train.labels[:10].tolist() == list(range(10))
    # Independent check: the 11th image is the second file of class 0 (airplane/0001.jpg).
    with tarfile.open(CIFAR10_TARBALL) as tar:
        member = next(m for m in tar if m.name == "train/airplane/0001.jpg")
        expected = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
    assert np.array_equal(train.images[10].permute(1, 2, 0).numpy(), expected)
