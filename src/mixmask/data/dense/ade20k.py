"""ADE20k semantic segmentation, the SceneParsing benchmark's release (ADEChallengeData2016).

The layout of ADEChallengeData2016.zip (sceneparsing.csail.mit.edu)::

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   (same stems)

An annotation PNG is greyscale: 0 is "other" (no label), 1..150 the classes below.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from mixmask.data.dense.reading import read_index_png, read_rgb, stable_image_ids
from mixmask.data.dense.sample import IGNORE_INDEX, DenseDataset, DenseTarget
from mixmask.data.files import describe_folder
from mixmask.errors import DatasetError

# The 150 SceneParsing classes in label order (1..150 on disk, 0..149 here): the first name
# of each row of the benchmark's objectInfo150 table, as mmsegmentation's ADE20KDataset
# lists them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
SPLIT_FOLDERS = {"train": "training", "test": "validation"}
RELEASE_FOLDER = "ADEChallengeData2016"

# The benchmark scores 150 classes and not "other": reduce the zero label as its toolkit
# and mmsegmentation's reduce_zero_label do, 0 -> ignored and v -> v - 1. A stray 255
# stays ignored (as in mmsegmentation); any other value is no ADE20k label (-1 marks it).
_REDUCE_ZERO = np.full(256, -1, dtype=np.int64)
_REDUCE_ZERO[0] = IGNORE_INDEX
_REDUCE_ZERO[1:len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES))
_REDUCE_ZERO[255] = IGNORE_INDEX


class Ade20kSegmentation(DenseDataset):
    """ADE20k images of ``image_folder`` (*.jpg) with the same-stem label PNGs of
    ``annotation_folder``; ``semantic`` holds 0..149 and IGNORE_INDEX ("other")."""

    name = "ade20k"
    segment_classes = ADE20K_CLASSES

    def __init__(self, image_folder: str, annotation_folder: str) -> None:
        images = _stems(image_folder, ".jpg")
        labels = _stems(annotation_folder, ".png")
        for folder, stems, other_folder, other_stems in (
                (image_folder, images, annotation_folder, labels),
                (annotation_folder, labels, image_folder, images)):
            unmatched = sorted(set(stems) - set(other_stems))
            if unmatched:
                raise DatasetError(
                    f"{len(unmatched)} files of {folder!r} have no same-named partner in "
                    f"{other_folder!r} (the first is {unmatched[0]!r}); every image needs its "
                    "label PNG and every label PNG its image.")
        self.image_folder, self.annotation_folder = image_folder, annotation_folder
        self.ids = images
        self._image_ids = stable_image_ids(images)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, DenseTarget]:
        stem = self.ids[index]
        image = read_rgb(os.path.join(self.image_folder, f"{stem}.jpg"))
        png_path = os.path.join(self.annotation_folder, f"{stem}.png")
        semantic = _REDUCE_ZERO[read_index_png(png_path, (image.shape[2], image.shape[1]))]
        if (semantic < 0).any():
            raise DatasetError(f"Label PNG {png_path!r} holds values above 150, so it is not an "
                               "ADE20k SceneParsing annotation (0..150).")
        return image, DenseTarget(semantic=torch.from_numpy(semantic),
                                  image_id=self._image_ids[index])


def _stems(folder: str, extension: str) -> list[str]:
    """Sorted stems of the visible ``extension`` files in ``folder``."""
    if not os.path.isdir(folder):
        raise DatasetError(f"ADE20k folder {folder!r} does not exist; "
                           f"{describe_folder(os.path.dirname(folder))}.")
    stems = sorted(name[: -len(extension)] for name in os.listdir(folder)
                   if name.endswith(extension) and not name.startswith("."))
    if not stems:
        raise DatasetError(f"ADE20k folder {folder!r} holds no {extension} files; "
                           f"{describe_folder(folder)}.")
    return stems


def ade20k_segmentation(root: str, split: str) -> Ade20kSegmentation:
    """ADE20k SceneParsing (150 classes): split "train" is training/ (20,210 images),
    "test" is validation/ (2,000), the split papers report mIoU on. ``root`` is
    ADEChallengeData2016 or a folder holding it."""
    if split not in SPLIT_FOLDERS:
        raise DatasetError(f"Unknown split {split!r} for ADE20k. Use one of: train, test.")
    if not os.path.isdir(root):
        raise DatasetError(f"ADE20k root {root!r} does not exist. Point it at the unpacked "
                           f"{RELEASE_FOLDER} folder.")
    release = next((candidate for candidate in (root, os.path.join(root, RELEASE_FOLDER))
                    if os.path.isdir(os.path.join(candidate, "images"))
                    and os.path.isdir(os.path.join(candidate, "annotations"))), None)
    if release is None:
        raise DatasetError(f"{root!r} is not an ADE20k folder: expected {RELEASE_FOLDER}/ with "
                           "images/ and annotations/ in it (or a folder holding it), but "
                           f"{describe_folder(root)}.")
    folder = SPLIT_FOLDERS[split]
    return Ade20kSegmentation(os.path.join(release, "images", folder),
                              os.path.join(release, "annotations", folder))
