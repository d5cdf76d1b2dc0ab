"""COCO instances (boxes and instance masks) from the official JSON files.

The official 2017 layout (cocodataset.org/#download)::

    root/annotations/instances_train2017.json    root/train2017/<file_name>
    root/annotations/instances_val2017.json      root/val2017/<file_name>

The JSON is parsed once at construction; images are decoded and masks rasterised per item,
so a dataset of 118k images costs its annotations' memory only.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixmask.data.dense.sample import DenseDataset, DenseTarget
from mixmask.data.files import describe_folder
from mixmask.data.image_set import open_rgb
from mixmask.errors import DatasetError

SPLIT_FOLDERS = {"train": "train2017", "test": "val2017"}
FORMAT_HELP = "see cocodataset.org/#format-data"


@dataclass
class _CocoImage:
    """One image and its kept annotations, segmentations still undecoded."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)
    segmentations: list[Any] = field(default_factory=list)
    annotation_ids: list[Any] = field(default_factory=list)


class CocoDetection(DenseDataset):
    """COCO detection / instance segmentation: ``image_folder`` holds the images that
    ``annotation_file`` (a COCO instances JSON) describes.

    Category ids (COCO's run 1..90 with gaps) become labels 1..K in increasing id order;
    ``thing_classes`` are their names. ``skip_empty=True`` (training) leaves out images
    without a non-crowd object, as torchvision's detection reference does; evaluation keeps
    every image (``skip_empty=False``), since pycocotools scores them all. Masks are None
    when some annotation has no ``segmentation`` (a boxes-only file).
    """

    name = "coco"

    def __init__(self, image_folder: str, annotation_file: str, *, skip_empty: bool) -> None:
        self.image_folder = image_folder
        self.annotation_file = annotation_file
        document = _read_json(annotation_file)
        self.thing_classes, label_of = _categories(document["categories"], annotation_file)
        images = _images(document["images"], annotation_file)
        self.has_masks = True
        for position, entry in enumerate(document["annotations"]):
            try:
                self.has_masks &= _add_annotation(entry, images, label_of, annotation_file)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise DatasetError(_malformed(annotation_file, "annotations", position, error)
                                   ) from None
        ordered = [images[image_id] for image_id in sorted(images)]  # torchvision's order
        if skip_empty:
            ordered = [image for image in ordered if not all(image.crowd)]
        _check_image_files(image_folder, annotation_file, ordered)
        self._images = ordered

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:
        record = self._images[index]
        path = os.path.join(self.image_folder, record.file_name)
        image = open_rgb(path)
        if image.size != (record.width, record.height):
            raise DatasetError(
                f"Image {path!r} is {image.size[0]}x{image.size[1]} pixels but "
                f"{self.annotation_file!r} says {record.width}x{record.height}; the image and "
                "the annotation file do not belong together.")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        target = DenseTarget(
            boxes=torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(record.labels, dtype=torch.int64),
            masks=self._masks(record) if self.has_masks else None,
            crowd=torch.tensor(record.crowd, dtype=torch.bool),
            semantic=None,
            image_id=record.image_id,
        )
        return pixels, target

    def _masks(self, record: _CocoImage) -> Tensor:
        masks = np.zeros((len(record.segmentations), record.height, record.width), np.uint8)
        for row, (segmentation, annotation_id) in enumerate(
                zip(record.segmentations, record.annotation_ids, strict=True)):
            try:
                masks[row] = decode_segmentation(segmentation, record.height, record.width)
            except (TypeError, ValueError, KeyError, IndexError) as error:
                raise DatasetError(
                    f"Annotation {annotation_id} of {self.annotation_file!r} has a segmentation "
                    f"pycocotools cannot decode ({error}); {FORMAT_HELP}.") from None
        return torch.from_numpy(masks)


def coco_dataset(root: str, split: str, *, skip_empty: bool) -> CocoDetection:
    """COCO 2017 from its official layout: split "train" is train2017, "test" is val2017
    (COCO's test-dev has no public annotations, so val2017 is what papers report)."""
    if split not in SPLIT_FOLDERS:
        raise DatasetError(f"Unknown split {split!r} for COCO. Use one of: train, test.")
    if not os.path.isdir(root):
        raise DatasetError(f"COCO root {root!r} does not exist. Point it at the folder that "
                           "holds annotations/, train2017/ and val2017/.")
    folder = SPLIT_FOLDERS[split]
    annotation_file = os.path.join(root, "annotations", f"instances_{folder}.json")
    image_folder = os.path.join(root, folder)
    for needed in (annotation_file, image_folder):
        if not os.path.exists(needed):
            raise DatasetError(
                f"{root!r} is not a COCO 2017 folder: expected annotations/instances_{folder}"
                f".json and {folder}/ (the official layout), but {needed!r} is missing and "
                f"{describe_folder(root)}.")
    return CocoDetection(image_folder, annotation_file, skip_empty=skip_empty)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) as a uint8
    [height, width] 0/1 mask, the way pycocotools' ``COCO.annToRLE`` reads it."""
    coco_mask = _pycocotools_mask()
    if isinstance(segmentation, list):
        # frPyObjects reads a 4-number list as a box, and a polygon needs three points:
        # shorter ones (a few exist in COCO) cover no pixels.
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (COCO's crowds)
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:  # compressed RLE: counts is already the LEB128-like string pycocotools decodes
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools (2.0.x) under numpy 2 warns on every decode that its RLE object's
        # __array__ takes no `copy` argument; the mask it returns is right, the noise is not ours.
        warnings.filterwarnings("ignore", message="__array__ implementation",
                                category=DeprecationWarning)
        mask = coco_mask.decode(rle)
    return np.ascontiguousarray(mask, dtype=np.uint8)


def _pycocotools_mask() -> Any:
    # Imported on first use: only COCO masks need it, not the rest of the package.
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise DatasetError("Reading COCO masks needs pycocotools; install it with "
                           "`pip install pycocotools`.") from None
    return coco_mask


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DatasetError(f"COCO annotation file {path!r} does not exist; "
                           f"{describe_folder(os.path.dirname(path) or '.')}.")
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DatasetError(f"COCO annotation file {path!r} is not valid JSON ({error}); "
                           "download it again.") from None
    except OSError as error:
        raise DatasetError(f"Cannot read COCO annotation file {path!r} "
                           f"({error.strerror or error}).") from None
    sections = ("images", "annotations", "categories")
    if not isinstance(document, dict) or not all(
            isinstance(document.get(section), list) for section in sections):
        raise DatasetError(f"{path!r} is not a COCO instances file: it needs 'images', "
                           f"'annotations' and 'categories' lists ({FORMAT_HELP}).")
    return document


def _malformed(path: str, section: str, position: int, error: Exception) -> str:
    return (f"Entry {position} of '{section}' in {path!r} is malformed ({error!r}), so this "
            f"is not a COCO instances file ({FORMAT_HELP}).")


def _categories(entries: list[Any], path: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """Names in increasing category id, and category id -> label 1..K."""
    pairs = []
    for position, entry in enumerate(entries):
        try:
            pairs.append((int(entry["id"]), str(entry["name"])))
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(_malformed(path, "categories", position, error)) from None
    pairs.sort()
    ids = [category_id for category_id, _ in pairs]
    if not ids:
        raise DatasetError(f"{path!r} lists no categories, so there is nothing to detect.")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path!r} lists a category id twice; each category needs its own.")
    label_of = {category_id: label for label, category_id in enumerate(ids, start=1)}
    return tuple(name for _, name in pairs), label_of


def _images(entries: list[Any], path: str) -> dict[int, _CocoImage]:
    images: dict[int, _CocoImage] = {}
    for position, entry in enumerate(entries):
        try:
            image = _CocoImage(int(entry["id"]), str(entry["file_name"]),
                               int(entry["height"]), int(entry["width"]))
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(_malformed(path, "images", position, error)) from None
        if image.image_id in images:
            raise DatasetError(f"{path!r} lists image id {image.image_id} twice; "
                               "each image needs its own id.")
        images[image.image_id] = image
    return images


def _add_annotation(entry: dict[str, Any], images: dict[int, _CocoImage],
                    label_of: dict[int, int], path: str) -> bool:
    """Append one annotation to its image unless its box is under a pixel; False when a
    kept annotation has no segmentation (a boxes-only file)."""
    image_id, category_id = int(entry["image_id"]), int(entry["category_id"])
    if image_id not in images:
        raise DatasetError(f"Annotation {entry.get('id')} in {path!r} names image_id "
                           f"{image_id}, which 'images' does not list.")
    if category_id not in label_of:
        raise DatasetError(f"Annotation {entry.get('id')} in {path!r} names category_id "
                           f"{category_id}, which 'categories' does not list.")
    image = images[image_id]
    x, y, w, h = (float(value) for value in entry["bbox"])
    # COCO boxes are [x, y, width, height] in continuous pixels. Clipped to the image (as
    # torchvision's detection reference clamps them); a box under one pixel wide or high
    # is dropped: torchvision's reference counts w or h <= 1 as empty
    # (coco_utils._has_only_empty_bbox), and such slivers break IoU matching.
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return True
    segmentation = entry.get("segmentation")
    if segmentation is not None:
        _check_segmentation(segmentation, image, entry.get("id"), path)
    image.boxes.append((x0, y0, x1, y1))
    image.labels.append(label_of[category_id])
    image.crowd.append(bool(entry.get("iscrowd", 0)))
    image.segmentations.append(segmentation)
    image.annotation_ids.append(entry.get("id"))
    return segmentation is not None


def _check_segmentation(segmentation: Any, image: _CocoImage, annotation_id: Any,
                        path: str) -> None:
    """Shape checks only (decoding waits for the item): polygons are lists of numbers, an
    RLE is {"counts", "size"} with the image's [height, width]."""
    if isinstance(segmentation, list):
        if all(isinstance(polygon, list) for polygon in segmentation):
            return
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"),
                                                       (list, str)):
        size = segmentation.get("size")
        if size == [image.height, image.width]:
            return
        raise DatasetError(f"Annotation {annotation_id} in {path!r} has an RLE of size {size} "
                           f"but its image is [{image.height}, {image.width}] (height, width).")
    raise DatasetError(f"Annotation {annotation_id} in {path!r} has a segmentation that is "
                       f"neither polygons nor RLE ({FORMAT_HELP}).")


def _check_image_files(folder: str, annotation_file: str, images: list[_CocoImage]) -> None:
    if not os.path.isdir(folder):
        raise DatasetError(f"COCO image folder {folder!r} does not exist; "
                           f"{describe_folder(os.path.dirname(folder) or '.')}.")
    present = set(os.listdir(folder))  # one listing, not a stat per image
    missing = [image.file_name for image in images if image.file_name not in present
               and not os.path.isfile(os.path.join(folder, image.file_name))]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(images)} images that {annotation_file!r} lists are "
            f"missing from {folder!r} (the first is {missing[0]!r}); unpack the image archive "
            "that goes with this annotation file there.")
