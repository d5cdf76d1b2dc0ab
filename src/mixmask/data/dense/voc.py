"""Pascal VOC detection (VOC2007 / VOC2012 XML) and segmentation (VOC2012 palette PNGs).

The devkit layout (host.robots.ox.ac.uk/pascal/VOC)::

    VOCdevkit/VOC2007/{Annotations/<id>.xml, JPEGImages/<id>.jpg,
                       ImageSets/Main/{trainval,test}.txt}
    VOCdevkit/VOC2012/{Annotations, JPEGImages, ImageSets/Main/trainval.txt,
                       ImageSets/Segmentation/{train,val}.txt, SegmentationClass/<id>.png}
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mixmask.data.dense.reading import read_index_png, read_rgb, stable_image_ids
from mixmask.data.dense.sample import IGNORE_INDEX, DenseDataset, DenseTarget
from mixmask.data.files import describe_folder
from mixmask.errors import DatasetError, did_you_mean

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
YEARS = ("VOC2007", "VOC2012")
_LABEL_OF = {name: label for label, name in enumerate(VOC_CLASSES, start=1)}
_Box = tuple[float, float, float, float]


def read_id_list(path: str) -> list[str]:
    """The image ids of a VOC ImageSets file (first column; one id a line)."""
    if not os.path.isfile(path):
        raise DatasetError(f"VOC image set {path!r} does not exist; "
                           f"{describe_folder(os.path.dirname(path))}.")
    try:
        with open(path, encoding="utf-8") as file:
            ids = [line.split()[0] for line in file if line.strip()]
    except (OSError, ValueError) as error:  # ValueError: not text (UnicodeDecodeError)
        raise DatasetError(f"Cannot read VOC image set {path!r} ({error}).") from None
    if not ids:
        raise DatasetError(f"VOC image set {path!r} lists no images.")
    return ids


def check_files_present(folder: str, names: Sequence[str], listed_in: str) -> None:
    """Every file of ``names`` is in ``folder`` (one listing, not a stat per file)."""
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    missing = [name for name in names if name not in present]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(names)} files that {listed_in!r} needs are missing "
            f"from {folder!r} (the first is {missing[0]!r}); unpack the complete dataset there.")


def find_devkit(root: str) -> str:
    """The VOCdevkit folder: ``root`` itself or its VOCdevkit/ child."""
    if not os.path.isdir(root):
        raise DatasetError(f"VOC root {root!r} does not exist. Point it at the VOCdevkit folder "
                           "(holding VOC2007/ and/or VOC2012/).")
    for candidate in (root, os.path.join(root, "VOCdevkit")):
        if any(os.path.isdir(os.path.join(candidate, year)) for year in YEARS):
            return candidate
    parent_hint = (" Point at its parent folder instead."
                   if os.path.basename(os.path.normpath(root)) in YEARS else "")
    raise DatasetError(f"{root!r} is not a Pascal VOC folder: expected VOCdevkit/ holding "
                       f"VOC2007/ and/or VOC2012/ (or a folder holding VOCdevkit/), but "
                       f"{describe_folder(root)}.{parent_hint}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise DatasetError(f"Unknown split {split!r} for Pascal VOC. Use one of: train, test.")


class VocDetection(DenseDataset):
    """Pascal VOC boxes from ``sources``: (year folder, ImageSets/Main set name) pairs,
    concatenated in order. ``difficult`` objects are ``crowd`` (the VOC metric neither
    requires nor penalises them); there are no masks."""

    name = "voc"
    thing_classes = VOC_CLASSES

    def __init__(self, sources: Sequence[tuple[str, str]]) -> None:
        self._paths: list[str] = []
        self._objects: list[tuple[list[_Box], list[int], list[bool]]] = []
        names = []
        for year_folder, image_set in sources:
            list_file = os.path.join(year_folder, "ImageSets", "Main", f"{image_set}.txt")
            ids = read_id_list(list_file)
            check_files_present(os.path.join(year_folder, "JPEGImages"),
                                [f"{image_id}.jpg" for image_id in ids], list_file)
            for image_id in ids:
                xml_path = os.path.join(year_folder, "Annotations", f"{image_id}.xml")
                self._objects.append(_parse_annotation(xml_path, list_file))
                self._paths.append(os.path.join(year_folder, "JPEGImages", f"{image_id}.jpg"))
            names.extend(ids)
        self.ids = names
        self._image_ids = stable_image_ids(names)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:
        boxes, labels, difficult = self._objects[index]
        target = DenseTarget(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            crowd=torch.tensor(difficult, dtype=torch.bool),
            image_id=self._image_ids[index],
        )
        return read_rgb(self._paths[index]), target


def _parse_annotation(path: str, listed_in: str) -> tuple[list[_Box], list[int], list[bool]]:
    """Boxes (continuous xyxy), labels 1..20 and difficult flags of one VOC XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"Annotation {path!r} is missing, though {listed_in!r} lists its "
                           "image; unpack the complete VOC annotations.") from None
    except (ElementTree.ParseError, OSError) as error:
        raise DatasetError(f"Annotation {path!r} is not valid XML ({error}); "
                           "replace it with the original file.") from None
    boxes, labels, difficult = [], [], []
    for element in root.findall("object"):
        name = (element.findtext("name") or "").strip()
        if name not in _LABEL_OF:
            raise DatasetError(f"Annotation {path!r} has an object named {name!r}, which is not "
                               f"one of the 20 VOC classes.{did_you_mean(name, VOC_CLASSES)}")
        try:
            box = element.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(key))
                                      for key in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"Annotation {path!r} has a {name!r} object without numeric "
                               "bndbox xmin, ymin, xmax and ymax.") from None
        # VOC boxes are 1-based and inclusive (pixels xmin..xmax); as continuous coordinates
        # the box spans [xmin - 1, xmax]. detectron2's pascal_voc loader
        # (detectron2/data/datasets/pascal_voc.py, load_voc_instances) does the same.
        x0, y0 = xmin - 1.0, ymin - 1.0
        if xmax <= x0 or ymax <= y0:
            raise DatasetError(f"Annotation {path!r} has a {name!r} box with xmax < xmin or "
                               "ymax < ymin.")
        boxes.append((x0, y0, xmax, ymax))
        labels.append(_LABEL_OF[name])
        # A few VOC2012 objects have no <difficult> tag; the devkit reads that as 0.
        difficult.append((element.findtext("difficult") or "0").strip() == "1")
    return boxes, labels, difficult


def voc_detection(root: str, split: str) -> VocDetection:
    """Pascal VOC detection as the papers use it (Faster R-CNN onwards): split "train" is
    "07+12", VOC2007 trainval + VOC2012 trainval (whichever of the two ``root`` holds, at
    least one); split "test" is VOC2007 test. ``root`` is a VOCdevkit folder or holds one."""
    _check_split(split)
    devkit = find_devkit(root)
    image_set = "test" if split == "test" else "trainval"
    years = ("VOC2007",) if split == "test" else YEARS
    sources = [(os.path.join(devkit, year), image_set) for year in years
               if os.path.isfile(os.path.join(devkit, year, "ImageSets", "Main",
                                              f"{image_set}.txt"))]
    if not sources:
        wanted = " or ".join(f"{year}/ImageSets/Main/{image_set}.txt" for year in years)
        archive = "VOCtest_06-Nov-2007.tar" if split == "test" else "the trainval archives"
        raise DatasetError(f"{devkit!r} has no VOC {split} split: expected {wanted} in it (from "
                           f"{archive}), but {describe_folder(devkit)}.")
    return VocDetection(sources)


class VocSegmentation(DenseDataset):
    """VOC2012 semantic segmentation: ``semantic`` holds 0 (background), 1..20 (the VOC
    classes) and IGNORE_INDEX (255), the outline VOC draws around every object, which its
    benchmark does not score. No boxes."""

    name = "voc"
    segment_classes = ("background", *VOC_CLASSES)

    def __init__(self, year_folder: str, image_set: str) -> None:
        list_file = os.path.join(year_folder, "ImageSets", "Segmentation", f"{image_set}.txt")
        self.ids = read_id_list(list_file)
        check_files_present(os.path.join(year_folder, "JPEGImages"),
                            [f"{image_id}.jpg" for image_id in self.ids], list_file)
        check_files_present(os.path.join(year_folder, "SegmentationClass"),
                            [f"{image_id}.png" for image_id in self.ids], list_file)
        self.year_folder = year_folder
        self._image_ids = stable_image_ids(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:
        image_id = self.ids[index]
        image = read_rgb(os.path.join(self.year_folder, "JPEGImages", f"{image_id}.jpg"))
        png_path = os.path.join(self.year_folder, "SegmentationClass", f"{image_id}.png")
        indices = read_index_png(png_path, (image.shape[2], image.shape[1]))
        invalid = (indices >= len(self.segment_classes)) & (indices != IGNORE_INDEX)
        if invalid.any():
            raise DatasetError(f"Label PNG {png_path!r} holds value {int(indices[invalid][0])}, "
                               f"which is neither a VOC class (0..20) nor {IGNORE_INDEX}.")
        semantic = torch.from_numpy(indices.astype(np.int64))
        return image, DenseTarget(semantic=semantic, image_id=self._image_ids[index])


def voc_segmentation(root: str, split: str) -> VocSegmentation:
    """VOC2012 segmentation: split "train" is ImageSets/Segmentation/train.txt (1464
    images), "test" is val.txt (1449), the split the VOC2012 results are reported on."""
    _check_split(split)
    year_folder = os.path.join(find_devkit(root), "VOC2012")
    image_set = "val" if split == "test" else "train"
    list_file = os.path.join(year_folder, "ImageSets", "Segmentation", f"{image_set}.txt")
    if not os.path.isfile(list_file):
        raise DatasetError(f"VOC segmentation needs VOC2012/ImageSets/Segmentation/{image_set}"
                           f".txt, but {list_file!r} is missing and "
                           f"{describe_folder(os.path.dirname(list_file))}.")
    return VocSegmentation(year_folder, image_set)
