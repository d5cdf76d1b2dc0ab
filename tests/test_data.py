"""Tests for mixmask.data: datasets, transforms and loaders.

Fixtures are tiny PNG trees written with PIL whose pixel values encode (class, file), so
order and labels are checked against hand-written expectations, not the loader's code.
"""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import mixmask.data.datasets as datasets_module
from mixmask.data import (
    DATASET_STATS,
    EvalDataset,
    ImageSet,
    TwoViewDataset,
    eval_transform,
    load_image_set,
    two_view_transform,
)
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
    dataset = TwoViewDataset(image_set, two_view_transform("cifar", 8, (0.5,) * 3, (0.5,) * 3))
    assert dataset[0][2] == -1
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

    monkeypatch.setattr(datasets_module, "_extract_archive", refuse)
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
    real_extract = datasets_module._extract_archive

    def half_then_crash(path, destination):
        with tarfile.open(path) as tar:
            tar.extract(tar.getmembers()[0], destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets_module, "_extract_archive", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_image_set("imagefolder", str(archive), "train", cache_dir=cache)
    assert list(Path(cache).iterdir()) == []  # the partial extraction was removed

    # A leftover staging folder from a killed process is ignored, too.
    (Path(cache) / ".tmp-unpack-dead" / "mydata").mkdir(parents=True)
    monkeypatch.setattr(datasets_module, "_extract_archive", real_extract)
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

    monkeypatch.setattr(datasets_module, "_decode_all", refuse)
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


# --- transforms and loaders -------------------------------------------------------------


def noise_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("preset, size", [("cifar", 32), ("mocov2", 64)])
def test_two_view_shapes_and_independence(preset, size):
    torch.manual_seed(0)
    transform = two_view_transform(preset, size, *DATASET_STATS["cifar10"])
    first, second = transform(noise_image(size + 8))
    assert first.shape == second.shape == (3, size, size)
    assert first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_two_view_presets_match_the_recipes():
    mocov2 = repr(two_view_transform("mocov2", 224, (0.5,) * 3, (0.5,) * 3))
    assert "GaussianBlur(kernel_size=(23, 23), sigma=(0.1, 2.0))" in mocov2
    assert "scale=(0.2, 1.0)" in mocov2 and "p=0.2" in mocov2
    cifar = repr(two_view_transform("cifar", 32, (0.5,) * 3, (0.5,) * 3))
    assert "GaussianBlur" not in cifar and "RandomHorizontalFlip" in cifar
    with pytest.raises(ValueError, match="mocov2, cifar"):
        two_view_transform("simclr", 32, (0.5,) * 3, (0.5,) * 3)


def steps_of(compose) -> dict[str, object]:
    """Each op of a view pipeline by class name; RandomApply as (p, op) under the op's."""
    steps = {}
    for step in compose.transforms:
        if isinstance(step, T.RandomApply):
            (inner,) = step.transforms
            steps[type(inner).__name__] = (step.p, inner)
        else:
            steps[type(step).__name__] = step
    return steps


@pytest.mark.parametrize("preset, size, blur_p", [("byol", 224, (1.0, 0.1)),
                                                  ("byol_cifar", 32, None)])
def test_byol_presets_are_table_6_of_the_paper(preset, size, blur_p):
    """BYOL (Grill et al. 2020, Table 6): both views crop (0.08, 1), jitter (0.4, 0.4, 0.2,
    0.1) with p 0.8, grayscale 0.2, flip 0.5; blur 1.0 / 0.1 (none for CIFAR), solarize
    0.0 / 0.2 at 128; in solo-learn's order."""
    transform = two_view_transform(preset, size, (0.5,) * 3, (0.5,) * 3)
    views = [steps_of(transform.first), steps_of(transform.second)]
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
    transform = two_view_transform("byol_cifar", 8, (0.0,) * 3, (1.0,) * 3)
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    draws = 1000
    levels = torch.stack([torch.stack(transform(white)).mean(dim=(1, 2, 3))
                          for _ in range(draws)])
    assert ((levels < 0.41) | (levels > 0.59)).all()
    solarized = (levels < 0.5).double().mean(0)
    assert solarized[0] == 0
    assert abs(solarized[1] - 0.2) < 5 * (0.2 * 0.8 / draws) ** 0.5


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
    transform = two_view_transform("cifar", 16, mean, std)
    for _ in range(5):
        for view in transform(image):
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

    loader = torch.utils.data.DataLoader(
        TwoViewDataset(in_memory, two_view_transform("cifar", 16, (0.5,) * 3, (0.5,) * 3)),
        batch_size=2,
    )
    first, second, labels = next(iter(loader))
    assert first.shape == second.shape == (2, 3, 16, 16)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1]


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
