"""STL-10 and Tiny-ImageNet in their official on-disk layouts, ImageNet-style train/ + val/
trees, and unreadable image files (skipped, warned about, counted; too many stop).

Every fixture is a tiny fake written here in the dataset's real layout: STL-10's
column-major binary files, Tiny-ImageNet's wnids.txt / train/<wnid>/images / val/images +
val_annotations.txt. Pixel values encode which image a decoded one is, so order, labels
and the binary transposition are checked against hand-written expectations.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import mixmask.data.image_folders as image_folders_module
from mixmask.config import load_config
from mixmask.data import build_train_loader, load_image_set, preset_views
from mixmask.data.datasets import DATASET_STATS
from mixmask.data.image_set import UnreadableImageWarning
from mixmask.data.loaders import EpochBatchSampler, EvalDataset, MultiViewDataset
from mixmask.data.splits import load_eval_data, load_split
from mixmask.errors import DatasetError
from mixmask.train.loop import pretrain

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch) -> Path:
    """Every test caches under tmp_path, never in ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MIXMASK_CACHE", str(folder))
    return folder


def config_for(tmp_path: Path, dataset: str, root: Path, *overrides: str):
    """A CPU-sized pretraining config (as tests/test_engine.py's): width 0.125, 2 steps."""
    return load_config(None, [
        f"data.dataset={dataset}", f"data.root={root}", "data.num_workers=0",
        "data.image_size=32", "model.width=0.125", "method.mocov2.proj_hidden_dim=64",
        "method.mocov2.queue_size=256", "method.mocov2.symmetric=false",
        "method.masking=mixmask", "train.batch_size=32", "train.max_steps=2",
        "train.device=cpu", "train.progress_bar=false", "train.log_every=1",
        "monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
        "eval.linear=false", f"out_dir={tmp_path / 'run'}", *overrides])


# --- STL-10 -----------------------------------------------------------------------------

STL_SIDE = 96
STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
               "truck"]


def stl_bytes(ids: list[int]) -> bytes:
    """Images as STL-10 stores them: per image 3 channels of 96x96 bytes, each channel
    column-major (byte w * 96 + h holds pixel (h, w)). Image k has red (h=0, w=5) = 200 and
    red (h=7, w=0) = its id, so a decoded image says which it is and whether the transpose
    was right; every other byte is 0."""
    images = np.zeros((len(ids), 3 * STL_SIDE * STL_SIDE), dtype=np.uint8)
    for k, image_id in enumerate(ids):
        images[k, 5 * STL_SIDE + 0] = 200  # channel 0, column w=5, row h=0
        images[k, 0 * STL_SIDE + 7] = image_id  # channel 0, column w=0, row h=7
    return images.tobytes()


def write_stl10(root: Path, train_labels: list[int], num_test: int, num_unlabeled: int,
                skip: tuple[str, ...] = ()) -> Path:
    """root/stl10_binary with train ids 1.., test ids 101.., unlabeled ids 151..; labels
    are written 1-based, as in the real files."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    test_labels = [(i % 10) + 1 for i in range(num_test)]
    files = {
        "train_X.bin": stl_bytes([1 + i for i in range(len(train_labels))]),
        "train_y.bin": bytes(train_labels),
        "test_X.bin": stl_bytes([101 + i for i in range(num_test)]),
        "test_y.bin": bytes(test_labels),
        "unlabeled_X.bin": stl_bytes([151 + i for i in range(num_unlabeled)]),
        "class_names.txt": "\n".join(STL_CLASSES).encode() + b"\n",
    }
    for name, content in files.items():
        if name not in skip:
            (folder / name).write_bytes(content)
    return root


def image_ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 7, 0].tolist()


def test_stl10_binary_is_read_column_major_with_labels_shifted(tmp_path):
    # 1-based labels 3, 1, 2, 1, 3, 2: classes 2, 0, 1, 0, 2, 1.
    root = write_stl10(tmp_path / "stl", [3, 1, 2, 1, 3, 2], num_test=4, num_unlabeled=8)
    train = load_image_set("stl10", str(root), "train")
    assert train.images.shape == (6, 3, 96, 96) and train.images.dtype == torch.uint8
    # The hand-placed pixel (h=0, w=5) is there, not at its transpose (h=5, w=0).
    assert (train.images[:, 0, 0, 5] == 200).all() and (train.images[:, 0, 5, 0] == 0).all()
    assert int(train.images.sum()) == 6 * 200 + sum(range(1, 7))  # nothing else is set
    # Round-robin over classes, file order within a class: files 2, 3, 1, 4, 6, 5.
    assert image_ids(train.images) == [2, 3, 1, 4, 6, 5]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.classes == STL_CLASSES and train.num_classes == 10
    assert (train.mean, train.std) == DATASET_STATS["stl10"]

    test = load_image_set("stl10", str(root), "test")
    assert len(test) == 4 and sorted(image_ids(test.images)) == [101, 102, 103, 104]
    assert test.labels.tolist() == [0, 1, 2, 3]
    # data.root may also be the stl10_binary folder itself.
    assert len(load_image_set("stl10", str(root / "stl10_binary"), "test")) == 4
    # A class-balanced prefix.
    assert load_image_set("stl10", str(root), "train", subset=3).labels.tolist() == [0, 1, 2]


def test_stl10_pretrain_split_is_unlabeled_plus_train_spread_evenly(tmp_path):
    root = write_stl10(tmp_path / "stl", [3, 1, 2, 1, 3, 2], num_test=4, num_unlabeled=8)
    pretrain_set = load_image_set("stl10", str(root), "pretrain")
    assert len(pretrain_set) == 6 + 8
    # Labelled item i sits at (i + 0.5) / 6 and unlabeled item j at (j + 0.5) / 8, merged:
    # u t u t u t u u t u t u t u.
    assert pretrain_set.labels.tolist() == [-1, 0, -1, 1, -1, 2, -1, -1, 0, -1, 1, -1, 2, -1]
    assert image_ids(pretrain_set.images) == [151, 2, 152, 3, 153, 1, 154, 155, 4, 156, 6,
                                              157, 5, 158]
    assert (pretrain_set.images[:, 0, 0, 5] == 200).all()
    assert load_image_set("stl10", str(root), "pretrain", subset=4).labels.tolist() == [
        -1, 0, -1, 1]
    # The other datasets pretrain on their train split.
    assert torch.equal(load_image_set("synthetic", "", "pretrain").images,
                       load_image_set("synthetic", "", "train").images)

    config = config_for(tmp_path, "stl10", root, "data.subset=0")
    assert len(load_split(config, "pretrain", 0)) == 14
    eval_data, reason = load_eval_data(config)
    assert reason == "" and eval_data.num_classes == 10
    assert len(eval_data.train) == 6 and len(eval_data.test) == 4
    assert all(eval_data.train[i][1] >= 0 for i in range(6))


def test_stl10_missing_or_corrupt_files_say_what_is_expected(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        load_image_set("stl10", str(tmp_path / "empty"), "pretrain")
    message = str(info.value)
    for expected in ("train_X.bin", "train_y.bin", "unlabeled_X.bin", "stl10_binary",
                     "data.download=true", "is empty"):
        assert expected in message, expected

    root = write_stl10(tmp_path / "partial", [1, 2], 2, 2, skip=("unlabeled_X.bin",))
    assert len(load_image_set("stl10", str(root), "train")) == 2  # what is there still reads
    with pytest.raises(DatasetError, match=r"missing: unlabeled_X.bin .*train_X.bin"):
        load_image_set("stl10", str(root), "pretrain")

    bad = write_stl10(tmp_path / "bad", [1, 2], 2, 2)
    (bad / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DatasetError, match="not a whole number of 3x96x96 images"):
        load_image_set("stl10", str(bad), "test")
    (bad / "stl10_binary" / "train_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(DatasetError, match="labels outside 1..10"):
        load_image_set("stl10", str(bad), "train")

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    with pytest.raises(DatasetError, match="Downloading STL-10 .* failed"):
        load_image_set("stl10", str(tmp_path / "empty"), "train", download=True)


def test_stl10_pretraining_with_unlabelled_batches_trains_the_probe_on_labels_only(tmp_path):
    """One labelled image among 63 unlabeled: most batches hold no label, and the online
    probe skips them instead of taking a NaN step."""
    root = write_stl10(tmp_path / "stl", [4], num_test=10, num_unlabeled=63)
    config = config_for(tmp_path, "stl10", root, "monitor.online_probe=true",
                        "train.max_steps=0", "train.epochs=2", "train.checkpoint_every=0")
    summary = pretrain(config)
    assert summary["steps"] == 4 and summary["bad_images"] == 0
    assert summary["bad_image_files"] == []
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row["loss"]]
    assert len(rows) == 4 and all(np.isfinite(float(row["loss"])) for row in rows)
    # Per epoch, one of the two batches holds the labelled image: the probe trains on it.
    probe = [float(row["probe_loss"]) for row in rows if row["probe_loss"]]
    assert len(probe) == 2 and all(np.isfinite(probe))


# --- Tiny-ImageNet ------------------------------------------------------------------------

# Written in an order that is not sorted, so the loader cannot rely on wnids.txt's order.
TINY_WNIDS = ["n03444034", "n01443537", "n02099601"]
SORTED_WNIDS = sorted(TINY_WNIDS)


def write_jpeg(path: Path, value: int, size: int = 64) -> None:
    """A constant 64x64 JPEG whose red channel is 10 * value (JPEG keeps a flat colour
    within 1 or 2 levels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (10 * value, 100, 50)).save(path, quality=95)


def value_of(image_set, index: int) -> int:
    if image_set.images is not None:
        red = int(image_set.images[index, 0, 0, 0])
    else:
        red = int(np.asarray(image_set.load_pil(index))[0, 0, 0])
    return round(red / 10)


# val image -> wnid, as val_annotations.txt gives it (not in class order).
VAL_WNIDS = {"val_0.JPEG": "n03444034", "val_1.JPEG": "n01443537", "val_2.JPEG": "n01443537",
             "val_3.JPEG": "n02099601", "val_4.JPEG": "n03444034"}


def write_tinyimagenet(top: Path, train_per_class: int = 2) -> Path:
    """top/tiny-imagenet-200 in the official layout. Train image i of class rank r (sorted
    wnids) has value 3 * i + r; val image k has value 20 + k; test images are unlabelled."""
    root = top / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (root / "words.txt").write_text("\n".join(f"{w}\tsomething" for w in TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        rank = SORTED_WNIDS.index(wnid)
        boxes = []
        for i in range(train_per_class):
            write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 3 * i + rank)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for k, (name, wnid) in enumerate(VAL_WNIDS.items()):
        write_jpeg(root / "val" / "images" / name, 20 + k)
        lines.append(f"{name}\t{wnid}\t{k}\t{k + 1}\t{k + 30}\t{k + 40}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_jpeg(root / "test" / "images" / "test_0.JPEG", 24)
    return top


def test_tinyimagenet_train_split_classes_and_order(tmp_path, cache):
    top = write_tinyimagenet(tmp_path / "data", train_per_class=2)
    train = load_image_set("tinyimagenet", str(top), "train")
    assert train.classes == SORTED_WNIDS
    # The same class indices as torchvision's ImageFolder over train/.
    folder = torchvision.datasets.ImageFolder(str(top / "tiny-imagenet-200" / "train"))
    assert folder.class_to_idx == {wnid: i for i, wnid in enumerate(train.classes)}
    # In memory like CIFAR (64 px), round-robin over classes.
    assert train.images.shape == (6, 3, 64, 64)
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert [value_of(train, i) for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert (train.mean, train.std) == DATASET_STATS["tinyimagenet"]
    assert len(list(cache.glob("decoded-*"))) == 1  # through the decoded cache
    assert load_image_set("tinyimagenet", str(top), "train", subset=4).labels.tolist() == [
        0, 1, 2, 0]
    # data.root may be the tiny-imagenet-200 folder itself.
    inner = load_image_set("tinyimagenet", str(top / "tiny-imagenet-200"), "train")
    assert torch.equal(inner.images, train.images)


def test_tinyimagenet_val_is_the_test_split_labelled_by_the_annotations(tmp_path):
    top = write_tinyimagenet(tmp_path / "data")
    test = load_image_set("tinyimagenet", str(top), "test")
    assert len(test) == len(VAL_WNIDS)  # test/images (unlabelled) is not read
    names = list(VAL_WNIDS)
    for index in range(len(test)):
        name = names[value_of(test, index) - 20]
        assert test.classes[int(test.labels[index])] == VAL_WNIDS[name], name
    assert test.labels.tolist() == [0, 1, 2, 0, 2]  # round-robin over classes

    config = config_for(tmp_path, "tinyimagenet", top)
    eval_data, reason = load_eval_data(config)
    assert reason == "" and eval_data.num_classes == 3
    assert len(eval_data.train) == 6 and len(eval_data.test) == 5


def test_tinyimagenet_wrong_layouts_say_what_was_expected(tmp_path):
    # A plain ImageFolder tree given as tinyimagenet.
    plain = tmp_path / "plain"
    write_jpeg(plain / "train" / "cat" / "0.jpg", 1)
    write_jpeg(plain / "val" / "cat" / "0.jpg", 1)
    with pytest.raises(DatasetError) as info:
        load_image_set("tinyimagenet", str(plain), "train")
    message = str(info.value)
    assert "wnids.txt" in message and "train/<wnid>/images" in message
    assert "holds train/, val/" in message and "data.dataset=imagefolder" in message

    no_annotations = write_tinyimagenet(tmp_path / "a")
    (no_annotations / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    assert len(load_image_set("tinyimagenet", str(no_annotations), "train")) == 6
    with pytest.raises(DatasetError, match=r"val_annotations.txt \(found: .* holds images/\)"):
        load_image_set("tinyimagenet", str(no_annotations), "test")

    unannotated = write_tinyimagenet(tmp_path / "b")
    write_jpeg(unannotated / "tiny-imagenet-200" / "val" / "images" / "val_9.JPEG", 1)
    with pytest.raises(DatasetError, match="1 images of .* have no line .*'val_9.JPEG'"):
        load_image_set("tinyimagenet", str(unannotated), "test")

    missing_class = write_tinyimagenet(tmp_path / "c")
    with (missing_class / "tiny-imagenet-200" / "wnids.txt").open("a") as f:
        f.write("n09999999\n")
    with pytest.raises(DatasetError, match="train/<wnid>/images/ is missing for 1 of the 4 "
                                           "wnids of wnids.txt: n09999999"):
        load_image_set("tinyimagenet", str(missing_class), "train")

    unknown_wnid = write_tinyimagenet(tmp_path / "d")
    annotations = unknown_wnid / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("n02099601", "n00000001"))
    with pytest.raises(DatasetError, match="'n00000001', which wnids.txt does not list"):
        load_image_set("tinyimagenet", str(unknown_wnid), "test")


# --- ImageNet-style trees -----------------------------------------------------------------


def test_imagenet_style_train_and_val_tree_stays_on_disk(tmp_path):
    root = tmp_path / "imagenet"
    for split, count in (("train", 2), ("val", 1)):
        for rank, wnid in enumerate(["n01440764", "n01443537"]):
            for i in range(count):
                write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", 3 * i + rank, size=128)
    train = load_image_set("imagefolder", str(root), "train")
    assert train.images is None and len(train.paths) == 4  # over 96 px: decoded per item
    assert train.labels.tolist() == [0, 1, 0, 1] and train.classes == ["n01440764", "n01443537"]
    assert [value_of(train, i) for i in range(4)] == [0, 1, 3, 4]
    val = load_image_set("imagefolder", str(root), "test")
    assert all("/val/" in path for path in val.paths) and val.labels.tolist() == [0, 1]
    image, label = val.load_item(1)
    assert image.size == (128, 128) and label == 1


# --- unreadable image files ---------------------------------------------------------------


def write_png(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 100, 200)).save(path)


def folder_with_bad_files(root: Path, count: int, bad: list[int], size: int = 32,
                          fmt: str = "jpg") -> tuple[Path, list[str]]:
    """root/train/{a,b}/NNN.<fmt>, file i in class a or b by parity, red = i (JPEG: 2i);
    the files numbered in `bad` are corrupt: the first half of a real JPEG, or garbage."""
    paths = []
    for i in range(count):
        path = root / "train" / "ab"[i % 2] / f"{i:03d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (2 * i, 100, 200)).save(path, quality=95)
        paths.append(path)
    for n, i in enumerate(bad):
        if n % 2 == 0:  # truncated: a real header, half the data
            paths[i].write_bytes(paths[i].read_bytes()[: paths[i].stat().st_size // 2])
        else:
            paths[i].write_bytes(b"this is not an image")
    return root, [str(paths[i]) for i in bad]


def test_one_percent_of_bad_files_is_skipped_counted_and_cached(tmp_path, monkeypatch):
    root, bad = folder_with_bad_files(tmp_path / "tree", 100, [37])
    with pytest.warns(UnreadableImageWarning, match=r"Skipped 1 unreadable .*037.jpg"):
        image_set = load_image_set("imagefolder", str(root), "train")
    assert len(image_set) == 99 and image_set.bad_files == bad
    assert image_set.read_failures is None  # in memory: nothing left to fail
    # Labels stay aligned with their images: file i (round-robin order: 0, 1, 2, ...) has
    # red 2i (within JPEG's error) and class i % 2.
    kept = torch.tensor([i for i in range(100) if i != 37])
    reds = image_set.images[:, 0, 0, 0].long()
    assert (reds - 2 * kept).abs().max() <= 3 and torch.equal(image_set.labels, kept % 2)

    # The decoded cache brings the bad list back without decoding again.
    def refuse(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folders_module, "_decode_all", refuse)
    with pytest.warns(UnreadableImageWarning):
        cached = load_image_set("imagefolder", str(root), "train")
    assert cached.bad_files == bad and torch.equal(cached.images, image_set.images)
    assert torch.equal(cached.labels, image_set.labels)
    with warnings.catch_warnings():  # a prefix before the bad file has none
        warnings.simplefilter("error")
        prefix = load_image_set("imagefolder", str(root), "train", subset=30)
    assert len(prefix) == 30 and prefix.bad_files == []
    assert torch.equal(prefix.images, image_set.images[:30])
    # The share is of the files read: 1 bad file in a subset of 40 is 2.5%.
    with pytest.raises(DatasetError, match="1 of 40 files"):
        load_image_set("imagefolder", str(root), "train", subset=40)
    with pytest.warns(UnreadableImageWarning):
        assert len(load_image_set("imagefolder", str(root), "train", subset=40,
                                  max_bad_fraction=0.05)) == 39


def test_pretraining_over_a_folder_with_a_bad_file_reports_it(tmp_path, capsys):
    root, bad = folder_with_bad_files(tmp_path / "tree", 100, [37])
    with pytest.warns(UnreadableImageWarning):
        summary = pretrain(config_for(tmp_path, "imagefolder", root, "data.subset=0"))
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["bad_images"] == 1 and saved["bad_image_files"] == bad
    assert "Warning: 1 unreadable image files were skipped" in capsys.readouterr().out


def test_more_bad_files_than_allowed_stops_with_their_list(tmp_path):
    root, bad = folder_with_bad_files(tmp_path / "two", 100, [10, 60])
    with pytest.raises(DatasetError) as info:
        load_image_set("imagefolder", str(root), "train")
    message = str(info.value)
    assert "2 images could not be read (2 of 100 files" in message
    assert all(path in message for path in bad) and "data.max_bad_fraction" in message
    # Allowed when the limit allows them.
    with pytest.warns(UnreadableImageWarning, match="Skipped 2"):
        allowed = load_image_set("imagefolder", str(root), "train", max_bad_fraction=0.02)
    assert len(allowed) == 98

    root, bad = folder_with_bad_files(tmp_path / "many", 40, list(range(3, 15)))
    with pytest.raises(DatasetError) as info:
        load_split(config_for(tmp_path, "imagefolder", root), "pretrain", 0)
    message = str(info.value)
    assert message.startswith("12 images could not be read")
    assert all(path in message for path in bad[:10]) and bad[10] not in message
    assert "and 2 more" in message


def test_on_disk_bad_file_is_replaced_by_its_readable_neighbour(tmp_path):
    root, bad = folder_with_bad_files(tmp_path / "big", 100, [41], size=100, fmt="png")
    image_set = load_image_set("imagefolder", str(root), "train")
    assert image_set.paths is not None and image_set.bad_files == []
    index = image_set.paths.index(bad[0])
    with pytest.warns(UnreadableImageWarning, match="041.png"):
        image, label = image_set.load_item(index)
    neighbour = image_set.load_pil(index + 1)
    assert np.array_equal(np.asarray(image), np.asarray(neighbour))
    assert label == int(image_set.labels[index + 1])
    assert image_set.skipped_files() == bad
    with warnings.catch_warnings():  # known bad: the same substitute, no second warning
        warnings.simplefilter("error")
        again, _ = image_set.load_item(index)
        EvalDataset(image_set, lambda image: image)[index]
    assert np.array_equal(np.asarray(again), np.asarray(neighbour))
    with pytest.raises(DatasetError, match="041.png"):  # load_pil itself stays strict
        image_set.load_pil(index)


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_an_epoch_over_files_with_a_bad_one_completes_and_counts_it(tmp_path, pipeline):
    """DataLoader workers meet the bad file; the main process sees the count."""
    root, bad = folder_with_bad_files(tmp_path / "big", 100, [41], size=100, fmt="png")
    image_set = load_image_set("imagefolder", str(root), "train")
    sampler = EpochBatchSampler(len(image_set), 20, seed=0)
    loader = build_train_loader(image_set, sampler, preset_views("cifar", 16), pipeline=pipeline,
                                device=CPU, seed=0, num_workers=2)
    batches = list(loader)
    assert len(batches) == 5 and all(batch.views[0].shape == (20, 3, 16, 16)
                                      for batch in batches)
    assert image_set.skipped_files() == bad

    # Two bad files of 100 are over the limit: the epoch stops with both named.
    root, bad = folder_with_bad_files(tmp_path / "worse", 100, [5, 90], size=100, fmt="png")
    image_set = load_image_set("imagefolder", str(root), "train")
    dataset = MultiViewDataset(image_set, preset_views("cifar", 16), seed=0)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DatasetError) as info:
        for index in range(len(image_set)):
            dataset[(index, 0)]
    message = str(info.value)
    assert "Could not read image" in message and "2 images could not be read" in message
    assert all(path in message for path in bad)


def test_pretraining_over_files_with_a_bad_one_reports_it(tmp_path):
    root, bad = folder_with_bad_files(tmp_path / "big", 100, [41], size=100, fmt="png")
    # Batch 50, 2 steps: the first epoch reads every file, in a DataLoader worker.
    config = config_for(tmp_path, "imagefolder", root, "data.num_workers=1",
                        "train.batch_size=50")
    summary = pretrain(config)
    assert summary["steps"] == 2 and summary["bad_images"] == 1
    assert summary["bad_image_files"] == bad
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["bad_images"] == 1
