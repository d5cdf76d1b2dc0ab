"""Robustness test sets in their official layouts: CIFAR-C's .npy files, ImageNet-C's
<corruption>/<severity>/<class> tree and class-shift ImageFolders (ImageNet-A / -R /
-Sketch / -V2), each a tiny fake written here; labels mapped by class name onto the train
split's classes; scores restricted to the classes a set holds; every wrong layout one
RobustnessDataError sentence; a pickled .npy refused without running it."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixmask.data.image_set import ImageSet
from mixmask.data.robustness_sets import (
    RobustnessDataError,
    cifar_c_corruptions,
    cifar_c_set,
    class_shift_set,
    detect_layout,
    imagenet_c_corruptions,
    imagenet_c_set,
    imagenet_c_sets,
    read_cifar_c,
    restrict_scores,
)
from mixmask.errors import DatasetError

# Six fake wnids in sorted order: the classes of a train ImageFolder over them.
TRAIN_CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
                 "n01496331"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_image(path: Path, value: int, side: int = 8, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (value, 0, 0)).save(path, format=fmt)


def write_image_folder(folder: Path, counts: dict[str, int]) -> None:
    """folder/<class>/<k>.png, `count` images per class (the class in file names too)."""
    for name, count in counts.items():
        for k in range(count):
            write_image(folder / name / f"{name}_{k}.png", k)


def write_cifar_c(folder: Path, per_severity: int = 4, corruptions=("fog", "saturate"),
                  labels: np.ndarray | None = None) -> None:
    """labels.npy and <corruption>.npy; pixel (row, 0, 0, channel 0) holds the row index and
    channel 1 the corruption's number, so a slice says which rows it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = 5 * per_severity
    if labels is None:
        labels = np.tile(np.arange(per_severity) % 10, 5).astype(np.uint8)  # as the real file
    np.save(folder / "labels.npy", labels)
    for number, name in enumerate(corruptions):
        images = np.zeros((rows, 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(rows)
        images[:, 0, 0, 1] = number
        np.save(folder / f"{name}.npy", images)


def write_imagenet_c(root: Path, corruptions=("fog", "gaussian_noise"),
                     counts: dict[str, int] | None = None) -> None:
    counts = counts or {TRAIN_CLASSES[1]: 2, TRAIN_CLASSES[4]: 1}
    for corruption in corruptions:
        for severity in range(1, 6):
            write_image_folder(root / corruption / str(severity), counts)


def error_of(call, *args) -> str:
    with pytest.raises(RobustnessDataError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- layouts ------------------------------------------------------------------------------


def test_each_layout_is_detected(tmp_path):
    write_cifar_c(tmp_path / "CIFAR-10-C")
    write_imagenet_c(tmp_path / "Tiny-ImageNet-C")
    write_image_folder(tmp_path / "imagenet-r", {TRAIN_CLASSES[0]: 1, TRAIN_CLASSES[2]: 1})
    assert detect_layout(tmp_path / "CIFAR-10-C") == "cifar_c"
    assert detect_layout(str(tmp_path / "Tiny-ImageNet-C")) == "imagenet_c"
    assert detect_layout(tmp_path / "imagenet-r") == "class_shift"


def test_wrapper_folders_are_looked_into(tmp_path):
    # ImageNet-Sketch unpacks to sketch/<wnid>/; CIFAR-10-C.tar to CIFAR-10-C/.
    write_image_folder(tmp_path / "imagenet-sketch" / "sketch", {TRAIN_CLASSES[0]: 1,
                                                                  TRAIN_CLASSES[3]: 2})
    write_cifar_c(tmp_path / "download" / "CIFAR-10-C")
    assert detect_layout(tmp_path / "imagenet-sketch") == "class_shift"
    via_parent, present = class_shift_set(tmp_path / "imagenet-sketch", TRAIN_CLASSES, MEAN, STD)
    direct, _ = class_shift_set(tmp_path / "imagenet-sketch" / "sketch", TRAIN_CLASSES, MEAN,
                                STD)
    assert via_parent.paths == direct.paths and present == [0, 3]
    assert detect_layout(tmp_path / "download") == "cifar_c"
    assert cifar_c_corruptions(tmp_path / "download") == ["fog", "saturate"]


def test_a_lone_class_folder_is_a_one_class_set_not_a_wrapper(tmp_path):
    write_image_folder(tmp_path / "one", {TRAIN_CLASSES[5]: 2})
    image_set, present = class_shift_set(tmp_path / "one", TRAIN_CLASSES, MEAN, STD)
    assert present == [5] and image_set.labels.tolist() == [5, 5]


def test_imagenet_c_with_one_corruption_is_not_taken_for_a_wrapper(tmp_path):
    write_imagenet_c(tmp_path / "c", corruptions=("fog",))
    assert detect_layout(tmp_path / "c") == "imagenet_c"
    assert imagenet_c_corruptions(tmp_path / "c") == ["fog"]


# --- class shift ------------------------------------------------------------------------


def test_class_shift_labels_map_by_name_onto_the_train_classes(tmp_path):
    # 3 of the 6 train classes, so folder order (0, 1, 2) differs from train order (1, 3, 5).
    counts = {TRAIN_CLASSES[1]: 2, TRAIN_CLASSES[3]: 1, TRAIN_CLASSES[5]: 3}
    write_image_folder(tmp_path / "imagenet-a", counts)
    image_set, present = class_shift_set(tmp_path / "imagenet-a", TRAIN_CLASSES, MEAN, STD)
    assert present == [1, 3, 5]
    assert isinstance(image_set, ImageSet) and image_set.images is None
    assert image_set.classes == TRAIN_CLASSES and image_set.num_classes == 6
    assert (image_set.mean, image_set.std) == (MEAN, STD)
    assert len(image_set) == 6
    for path, label in zip(image_set.paths, image_set.labels.tolist(), strict=True):
        assert Path(path).parent.name == TRAIN_CLASSES[label]
    # Round-robin class order, as the train readers list files: every prefix balanced.
    assert image_set.labels.tolist() == [1, 3, 5, 1, 5, 5]
    image, label = image_set.load_item(0)
    assert image.size == (8, 8) and label == 1


def test_imagenet_v2_numbered_folders_are_train_class_indices(tmp_path):
    write_image_folder(tmp_path / "imagenetv2", {"0": 1, "4": 2})
    image_set, present = class_shift_set(tmp_path / "imagenetv2", TRAIN_CLASSES, MEAN, STD)
    assert present == [0, 4]
    assert sorted(image_set.labels.tolist()) == [0, 4, 4]


def test_restrict_scores_never_picks_a_class_outside_the_set():
    # Class 0 scores highest in both rows but is not in the set: the best of 1, 3, 5 wins.
    scores = torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.0, 3.0],
                           [7.0, 0.5, 6.0, 0.1, 5.0, 0.2]])
    restricted = restrict_scores(scores, [1, 3, 5])
    assert restricted.argmax(dim=1).tolist() == [5, 1]
    assert scores.argmax(dim=1).tolist() == [0, 0]  # the input is left as it was
    assert torch.isinf(restricted[:, [0, 2, 4]]).all() and (restricted[:, [0, 2, 4]] < 0).all()
    assert torch.equal(restricted[:, [1, 3, 5]], scores[:, [1, 3, 5]])
    top2 = restricted.topk(2, dim=1).indices.tolist()
    assert top2 == [[5, 3], [1, 5]]
    # Same choice as Hendrycks' logits[:, indices].argmax mapped back to the full index.
    indices = torch.tensor([1, 3, 5])
    assert torch.equal(indices[scores[:, indices].argmax(dim=1)], restricted.argmax(dim=1))


def test_restrict_scores_refuses_indices_outside_the_scores():
    with pytest.raises(ValueError):
        restrict_scores(torch.zeros(2, 3), [3])
    with pytest.raises(ValueError):
        restrict_scores(torch.zeros(2, 3), [])


# --- ImageNet-C -------------------------------------------------------------------------


def test_imagenet_c_sets_every_corruption_and_severity(tmp_path):
    write_imagenet_c(tmp_path / "ImageNet-C")
    sets = imagenet_c_sets(tmp_path / "ImageNet-C", TRAIN_CLASSES, MEAN, STD)
    assert list(sets) == ["fog", "gaussian_noise"]
    for corruption, by_severity in sets.items():
        assert list(by_severity) == [1, 2, 3, 4, 5]
        for severity, image_set in by_severity.items():
            assert image_set.classes == TRAIN_CLASSES and (image_set.mean, image_set.std) == (
                MEAN, STD)
            assert image_set.labels.tolist() == [1, 4, 1]
            for path, label in zip(image_set.paths, image_set.labels.tolist(), strict=True):
                parts = Path(path).parts
                assert parts[-4:-1] == (corruption, str(severity), TRAIN_CLASSES[label])
    one = imagenet_c_set(tmp_path / "ImageNet-C", "fog", 3, TRAIN_CLASSES, MEAN, STD)
    assert one.paths == sets["fog"][3].paths


# --- CIFAR-C ----------------------------------------------------------------------------


def test_cifar_c_severity_is_exactly_its_rows(tmp_path):
    per_severity = 4
    write_cifar_c(tmp_path, per_severity=per_severity)
    assert cifar_c_corruptions(tmp_path) == ["fog", "saturate"]
    all_labels = np.load(tmp_path / "labels.npy")
    for severity in range(1, 6):
        images, labels = read_cifar_c(tmp_path, "saturate", severity)
        assert images.dtype == np.uint8 and images.shape == (per_severity, 32, 32, 3)
        assert labels.dtype == np.int64
        rows = list(range((severity - 1) * per_severity, severity * per_severity))
        assert images[:, 0, 0, 0].tolist() == rows
        assert (images[:, 0, 0, 1] == 1).all()  # saturate, not fog
        assert labels.tolist() == all_labels[rows].tolist()


def test_cifar_c_set_is_an_in_memory_image_set(tmp_path):
    write_cifar_c(tmp_path, per_severity=3)
    classes = [f"class{k}" for k in range(10)]
    image_set = cifar_c_set(tmp_path, "fog", 2, classes, MEAN, STD)
    assert image_set.images.shape == (3, 3, 32, 32) and image_set.paths is None
    assert image_set.images[:, 0, 0, 0].tolist() == [3, 4, 5]
    assert image_set.labels.tolist() == [0, 1, 2] and image_set.classes == classes
    message = error_of(cifar_c_set, tmp_path, "fog", 2, classes[:2], MEAN, STD)
    assert "label 2" in message and "2 classes" in message


# --- wrong layouts ----------------------------------------------------------------------


def test_class_folders_outside_the_train_classes_are_named(tmp_path):
    unknown = [f"n0999999{k}" for k in range(7)]
    write_image_folder(tmp_path, {TRAIN_CLASSES[0]: 1, **{name: 1 for name in unknown}})
    message = error_of(class_shift_set, tmp_path, TRAIN_CLASSES, MEAN, STD)
    assert "7 of the 8 class folders" in message
    assert all(name in message for name in unknown[:5]) and unknown[5] not in message
    assert "and 2 more" in message and "by name" in message


def test_empty_class_folder_is_an_error(tmp_path):
    write_image_folder(tmp_path, {TRAIN_CLASSES[0]: 1})
    (tmp_path / TRAIN_CLASSES[2]).mkdir()
    (tmp_path / TRAIN_CLASSES[2] / "notes.txt").write_text("not an image")
    message = error_of(class_shift_set, tmp_path, TRAIN_CLASSES, MEAN, STD)
    assert "hold no images" in message and TRAIN_CLASSES[2] in message


def test_missing_severity_folder_is_named(tmp_path):
    write_imagenet_c(tmp_path)
    for path in sorted((tmp_path / "fog" / "3").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "fog" / "3").rmdir()
    message = error_of(imagenet_c_sets, tmp_path, TRAIN_CLASSES, MEAN, STD)
    assert "no severity folder 3" in message and "fog" in message


def test_imagenet_c_classes_outside_the_train_classes_are_named(tmp_path):
    write_imagenet_c(tmp_path, counts={TRAIN_CLASSES[0]: 1, "n09999999": 1})
    message = error_of(imagenet_c_sets, tmp_path, TRAIN_CLASSES, MEAN, STD)
    assert "n09999999" in message and "not classes of the run's train split" in message


def test_unknown_layouts_say_what_each_expects(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    message = error_of(detect_layout, tmp_path)
    assert "labels.npy" in message and "<corruption>/<severity 1..5>" in message
    assert "<class>/<image>" in message
    (tmp_path / "empty").mkdir()
    assert "is empty" in error_of(detect_layout, tmp_path / "empty")
    assert "does not exist" in error_of(detect_layout, tmp_path / "missing")
    assert "is a file" in error_of(detect_layout, tmp_path / "notes.txt")


def test_asking_for_the_wrong_layout_says_which_was_found(tmp_path):
    write_image_folder(tmp_path, {TRAIN_CLASSES[0]: 1})
    message = error_of(read_cifar_c, tmp_path, "fog", 1)
    assert "class_shift" in message and "labels.npy" in message


def test_cifar_c_without_labels(tmp_path):
    write_cifar_c(tmp_path)
    os.remove(tmp_path / "labels.npy")
    assert "has no labels.npy" in error_of(cifar_c_corruptions, tmp_path)


@pytest.mark.parametrize("bad, expected", [
    (np.zeros((20, 32, 32), dtype=np.uint8), "expected uint8 [rows, height, width, 3]"),
    (np.zeros((20, 32, 32, 3), dtype=np.float32), "expected uint8 [rows, height, width, 3]"),
    (np.zeros((15, 32, 32, 3), dtype=np.uint8), "has 15 rows but labels.npy has 20 labels"),
])
def test_cifar_c_file_of_wrong_shape_dtype_or_rows(tmp_path, bad, expected):
    write_cifar_c(tmp_path, per_severity=4)
    np.save(tmp_path / "snow.npy", bad)
    assert expected in error_of(cifar_c_corruptions, tmp_path)
    assert expected in error_of(read_cifar_c, tmp_path, "snow", 1)


@pytest.mark.parametrize("labels, expected", [
    (np.zeros(18, dtype=np.int64), "positive multiple of 5"),
    (np.zeros((20, 1), dtype=np.int64), "one integer label per row"),
    (np.zeros(20, dtype=np.float32), "one integer label per row"),
    (np.full(20, -1, dtype=np.int64), "negative label -1"),
])
def test_cifar_c_bad_labels(tmp_path, labels, expected):
    write_cifar_c(tmp_path, per_severity=4, labels=labels)
    assert expected in error_of(read_cifar_c, tmp_path, "fog", 1)


def test_cifar_c_unknown_corruption_and_severity(tmp_path):
    write_cifar_c(tmp_path)
    message = error_of(read_cifar_c, tmp_path, "fogg", 1)
    assert "no fogg.npy" in message and "Did you mean 'fog'?" in message
    assert "not one of 1..5" in error_of(read_cifar_c, tmp_path, "fog", 6)


def test_errors_are_dataset_errors():
    assert issubclass(RobustnessDataError, DatasetError)


class _Payload:
    """Unpickling this makes a folder: proof that a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["object_npy", "raw_pickle"])
def test_a_pickled_npy_is_refused_without_running_it(tmp_path, kind):
    write_cifar_c(tmp_path / "set")
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "set" / "contrast.npy"
    if kind == "object_npy":  # a .npy whose dtype is object: its data is a pickle
        np.save(path, np.array([_Payload(marker)] * 20, dtype=object), allow_pickle=True)
    else:  # a bare pickle under a .npy name
        path.write_bytes(pickle.dumps(_Payload(marker)))
    for call, args in ((cifar_c_corruptions, ()), (read_cifar_c, ("contrast", 1))):
        message = error_of(call, tmp_path / "set", *args)
        assert "contrast.npy" in message and "pickled" in message
    assert not marker.exists()
    # The payload is live: a loader that unpickles does run it.
    np.load(path, allow_pickle=True)
    assert marker.is_dir()


def test_a_pickled_labels_file_is_refused(tmp_path):
    write_cifar_c(tmp_path)
    marker = tmp_path / "pickle-ran"
    np.save(tmp_path / "labels.npy", np.array([_Payload(marker)] * 20, dtype=object),
            allow_pickle=True)
    assert "labels.npy" in error_of(read_cifar_c, tmp_path, "fog", 1)
    assert not marker.exists()


def test_symlinked_class_folders_are_followed_as_the_train_readers_do(tmp_path):
    write_image_folder(tmp_path / "elsewhere", {TRAIN_CLASSES[2]: 2})
    (tmp_path / "set").mkdir()
    os.symlink(tmp_path / "elsewhere" / TRAIN_CLASSES[2], tmp_path / "set" / TRAIN_CLASSES[2])
    write_image_folder(tmp_path / "set", {TRAIN_CLASSES[0]: 1})
    image_set, present = class_shift_set(tmp_path / "set", TRAIN_CLASSES, MEAN, STD)
    assert present == [0, 2] and len(image_set) == 3
