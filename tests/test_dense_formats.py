"""The dense-transfer readers on tiny trees written in each dataset's official layout: a
COCO instances JSON (polygon, uncompressed RLE, compressed RLE, crowd, sub-pixel box, an
image without objects), a VOCdevkit with VOC2007 + VOC2012 (a difficult object, palette
PNGs with 255 outlines) and an ADEChallengeData2016 tree (a 0 label).

Objects are axis-aligned rectangles, so every box, label and mask area below is written
by hand from the drawing, never computed by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from mixmask.data.dense.ade20k import ade20k_segmentation
from mixmask.data.dense.coco import CocoDetection, coco_dataset
from mixmask.data.dense.sample import IGNORE_INDEX
from mixmask.data.dense.voc import voc_detection, voc_segmentation
from mixmask.errors import DatasetError


def write_image(path: Path, width: int, height: int, mode: str = "RGB",
                color: object = (200, 40, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), color).save(path)


def check_image(image: torch.Tensor, width: int, height: int) -> None:
    assert image.dtype == torch.uint8
    assert image.shape == (3, height, width)


# --- COCO ------------------------------------------------------------------------------

# Image 7 is 16 wide, 12 high. Column-major (Fortran) RLE of rows 1..3 x columns 5..8:
# 5 columns x 12 + 1 row of zeros = 61, then per column 3 ones and 12 - 3 = 9 zeros to the
# next column's row 1, and after column 8's ones: 8 rows + 7 columns x 12 = 92 zeros.
UNCOMPRESSED_COUNTS = [61, 3, 9, 3, 9, 3, 9, 3, 92]


def coco_document() -> dict:
    compressed_region = np.zeros((12, 16), dtype=np.uint8, order="F")
    compressed_region[6:10, 10:15] = 1  # rows 6..9, columns 10..14: 4 x 5 = 20 pixels
    compressed = coco_mask.encode(compressed_region)
    compressed["counts"] = compressed["counts"].decode("ascii")  # as COCO's JSON stores it
    return {
        "images": [
            {"id": 9, "file_name": "c.jpg", "height": 6, "width": 8},
            {"id": 7, "file_name": "a.jpg", "height": 12, "width": 16},
            {"id": 8, "file_name": "b.png", "height": 5, "width": 4},  # no objects
        ],
        # Unsorted, with gaps, as COCO's 1..90: labels follow the id order 1, 3, 18.
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
                       {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 101, "image_id": 7, "category_id": 18, "iscrowd": 0, "bbox": [2, 3, 6, 4],
             "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},  # rows 3..6 x columns 2..7: 24
            {"id": 102, "image_id": 7, "category_id": 3, "iscrowd": 0, "bbox": [5, 1, 4, 3],
             "segmentation": {"size": [12, 16], "counts": UNCOMPRESSED_COUNTS}},  # 12 pixels
            {"id": 103, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "bbox": [10, 6, 5, 4], "segmentation": compressed},
            {"id": 104, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "bbox": [1, 1, 0.5, 3], "segmentation": [[1, 1, 1.5, 1, 1.5, 4, 1, 4]]},
            # Image 9's only object is a crowd: columns 0..1, all 6 rows = 12 pixels.
            {"id": 105, "image_id": 9, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 2, 6],
             "segmentation": {"size": [6, 8], "counts": [0, 12, 36]}},
        ],
    }


def write_coco(root: Path, document: dict | None = None, folder: str = "train2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    file_name = f"instances_{folder}.json"
    (root / "annotations" / file_name).write_text(json.dumps(document or coco_document()))
    write_image(root / folder / "a.jpg", 16, 12)
    write_image(root / folder / "b.png", 4, 5, mode="RGBA", color=(0, 0, 255, 128))
    write_image(root / folder / "c.jpg", 8, 6, mode="L", color=90)
    return root


def test_coco_boxes_labels_masks_and_crowds(tmp_path: Path) -> None:
    dataset = coco_dataset(str(write_coco(tmp_path)), "train", skip_empty=True)
    assert dataset.name == "coco"
    assert dataset.thing_classes == ("person", "car", "dog")
    assert len(dataset) == 1  # image 8 has no objects, image 9 only a crowd
    image, target = dataset[0]
    check_image(image, 16, 12)
    assert target.image_id == 7
    # [x, y, w, h] -> [x, y, x + w, y + h]; annotation 104 (0.5 wide) is dropped.
    assert target.boxes.dtype == torch.float32
    assert target.boxes.tolist() == [[2, 3, 8, 7], [5, 1, 9, 4], [10, 6, 15, 10]]
    assert target.labels.tolist() == [3, 2, 1]  # dog = id 18 -> 3, car = 3 -> 2, person -> 1
    assert target.crowd.tolist() == [False, False, False]
    assert target.masks.dtype == torch.uint8 and target.masks.shape == (3, 12, 16)
    assert target.masks.sum(dim=(1, 2)).tolist() == [24, 12, 20]
    assert target.masks[0, 3:7, 2:8].all() and target.masks[1, 1:4, 5:9].all()
    assert target.masks[2, 6:10, 10:15].all()
    assert target.semantic is None


def test_coco_keeps_empty_and_crowd_only_images_for_evaluation(tmp_path: Path) -> None:
    write_coco(tmp_path, folder="val2017")
    dataset = coco_dataset(str(tmp_path), "test", skip_empty=False)
    assert len(dataset) == 3
    ids = [dataset[index][1].image_id for index in range(3)]
    assert ids == [7, 8, 9]  # increasing image id
    image, empty = dataset[1]
    check_image(image, 4, 5)  # RGBA PNG -> RGB
    assert empty.boxes.shape == (0, 4) and empty.labels.tolist() == []
    assert empty.masks.shape == (0, 5, 4)
    image, crowd = dataset[2]
    check_image(image, 8, 6)  # greyscale JPEG -> RGB
    assert crowd.boxes.tolist() == [[0, 0, 2, 6]]
    assert crowd.labels.tolist() == [2] and crowd.crowd.tolist() == [True]
    assert crowd.masks.sum().item() == 12 and crowd.masks[0, :, :2].all()


def test_coco_class_reads_any_folder_and_boxes_only_files(tmp_path: Path) -> None:
    document = coco_document()
    for annotation in document["annotations"]:
        del annotation["segmentation"]
    root = write_coco(tmp_path, document)
    dataset = CocoDetection(str(root / "train2017"),
                            str(root / "annotations" / "instances_train2017.json"),
                            skip_empty=True)
    _, target = dataset[0]
    assert target.masks is None and len(target.boxes) == 3


def malformed(document: dict) -> dict:
    del document["annotations"][0]["bbox"]
    return document


def unknown_image(document: dict) -> dict:
    document["annotations"][0]["image_id"] = 42
    return document


@pytest.mark.parametrize("change, message", [
    (malformed, r"Entry 0 of 'annotations' .* malformed .*'bbox'"),
    (unknown_image, r"names image_id 42, which 'images' does not list"),
    (lambda document: {"images": []}, r"not a COCO instances file: it needs 'images'"),
])
def test_coco_malformed_json_is_one_sentence(tmp_path: Path, change, message) -> None:
    write_coco(tmp_path, change(coco_document()))
    with pytest.raises(DatasetError, match=message):
        coco_dataset(str(tmp_path), "train", skip_empty=True)


def test_coco_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"instances_train2017\.json and train2017/ .*holds "
                                           r"images/"):
        coco_dataset(str(tmp_path), "train", skip_empty=True)
    with pytest.raises(DatasetError, match="Unknown split 'val'"):
        coco_dataset(str(tmp_path), "val", skip_empty=True)
    write_coco(tmp_path)
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        coco_dataset(str(tmp_path), "train", skip_empty=True)


def test_coco_missing_unreadable_and_mismatched_images(tmp_path: Path) -> None:
    write_coco(tmp_path)
    (tmp_path / "train2017" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 1 images .* first is 'a\.jpg'"):
        coco_dataset(str(tmp_path), "train", skip_empty=True)
    (tmp_path / "train2017" / "a.jpg").write_bytes(b"not a jpeg")
    dataset = coco_dataset(str(tmp_path), "train", skip_empty=True)
    with pytest.raises(DatasetError, match=r"Could not read image .*a\.jpg"):
        dataset[0]
    write_image(tmp_path / "train2017" / "a.jpg", 15, 12)
    with pytest.raises(DatasetError, match=r"is 15x12 pixels but .* says 16x12"):
        dataset[0]


# --- Pascal VOC ------------------------------------------------------------------------

def voc_xml(*objects: tuple[str, str | None, tuple[int, int, int, int]]) -> str:
    parts = []
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        difficult_tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(f"<object><name>{name}</name><pose>Left</pose>{difficult_tag}"
                     f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                     f"<ymax>{ymax}</ymax></bndbox></object>")
    return f"<annotation><folder>VOC</folder>{''.join(parts)}</annotation>"


def write_voc_year(devkit: Path, year: str, annotations: dict[str, str],
                   image_sets: dict[str, list[str]]) -> None:
    folder = devkit / year
    for image_id, xml in annotations.items():
        write_image(folder / "JPEGImages" / f"{image_id}.jpg", 20, 10,
                    mode="L" if image_id == "000007" else "RGB", color=120)
        (folder / "Annotations").mkdir(parents=True, exist_ok=True)
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml)
    for set_path, ids in image_sets.items():
        (folder / "ImageSets" / set_path).parent.mkdir(parents=True, exist_ok=True)
        (folder / "ImageSets" / set_path).write_text("".join(f"{i}\n" for i in ids))


def segmentation_png(path: Path, size: tuple[int, int] = (20, 10)) -> None:
    """A VOC palette PNG: a person (15) at rows 2..5 x columns 4..9 (24 pixels), its 255
    outline one pixel around it (rows 1 and 6 x columns 3..10, and columns 3 and 10 x rows
    2..5: 8 + 8 + 4 + 4 = 24 pixels), background 0 elsewhere (200 - 48 = 152 pixels)."""
    indices = np.zeros((size[1], size[0]), dtype=np.uint8)
    indices[1:7, 3:11] = 255
    indices[2:6, 4:10] = 15
    png = Image.fromarray(indices, mode="P")
    png.putpalette([value for index in range(256) for value in (index, 0, 255 - index)])
    path.parent.mkdir(parents=True, exist_ok=True)
    png.save(path)


def write_voc(root: Path) -> Path:
    devkit = root / "VOCdevkit"
    write_voc_year(devkit, "VOC2007", {
        "000005": voc_xml(("chair", "0", (3, 2, 10, 8)), ("dog", "1", (1, 1, 5, 4))),
        "000007": voc_xml(("person", None, (2, 3, 20, 10))),
        "000009": voc_xml(("cat", "0", (5, 5, 6, 6))),
    }, {"Main/trainval.txt": ["000005", "000007"], "Main/test.txt": ["000009"]})
    write_voc_year(devkit, "VOC2012", {
        "2008_000008": voc_xml(("aeroplane", "0", (1, 1, 20, 10)),
                               ("tvmonitor", "0", (4, 2, 8, 9))),
        "2007_000033": voc_xml(("bus", "0", (1, 1, 2, 2))),
    }, {"Main/trainval.txt": ["2008_000008"], "Segmentation/train.txt": ["2008_000008"],
        "Segmentation/val.txt": ["2007_000033"]})
    for image_id in ("2008_000008", "2007_000033"):
        segmentation_png(devkit / "VOC2012" / "SegmentationClass" / f"{image_id}.png")
    return devkit


def test_voc_detection_07_plus_12(tmp_path: Path) -> None:
    write_voc(tmp_path)
    dataset = voc_detection(str(tmp_path), "train")  # a folder holding VOCdevkit/
    assert dataset.name == "voc" and len(dataset.thing_classes) == 20
    assert len(dataset) == 3  # 2 (VOC2007 trainval) + 1 (VOC2012 trainval)
    image, target = dataset[0]
    check_image(image, 20, 10)
    # 1-based inclusive (xmin, ymin, xmax, ymax) -> (xmin - 1, ymin - 1, xmax, ymax).
    assert target.boxes.tolist() == [[2, 1, 10, 8], [0, 0, 5, 4]]
    assert target.labels.tolist() == [9, 12]  # chair, dog in the standard order
    assert target.crowd.tolist() == [False, True]  # the dog is difficult
    assert target.masks is None and target.image_id == 5
    image, target = dataset[1]
    check_image(image, 20, 10)  # greyscale JPEG -> RGB
    assert target.labels.tolist() == [15] and target.crowd.tolist() == [False]  # no tag
    _, target = dataset[2]
    assert target.labels.tolist() == [1, 20] and target.image_id == 2008000008
    assert target.boxes.tolist() == [[0, 0, 20, 10], [3, 1, 8, 9]]


def test_voc_detection_test_split_and_single_year(tmp_path: Path) -> None:
    devkit = write_voc(tmp_path)
    test = voc_detection(str(devkit), "test")  # the VOCdevkit folder itself
    assert len(test) == 1 and test[0][1].labels.tolist() == [8]  # cat
    (devkit / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").unlink()
    assert len(voc_detection(str(devkit), "train")) == 1  # VOC2012 alone
    (devkit / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(DatasetError, match=r"no VOC train split: expected VOC2007/ImageSets"):
        voc_detection(str(devkit), "train")


def test_voc_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match=r"not a Pascal VOC folder: expected VOCdevkit/.*stuff/"):
        voc_detection(str(tmp_path), "train")
    devkit = write_voc(tmp_path)
    with pytest.raises(DatasetError, match="Point at its parent folder instead"):
        voc_detection(str(devkit / "VOC2007"), "train")
    with pytest.raises(DatasetError, match="Unknown split 'val'"):
        voc_detection(str(devkit), "val")
    annotation = devkit / "VOC2007" / "Annotations" / "000007.xml"
    annotation.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"000007\.xml' is not valid XML"):
        voc_detection(str(devkit), "train")
    annotation.write_text(voc_xml(("persn", "0", (1, 1, 2, 2))))
    with pytest.raises(DatasetError, match="not one of the 20 VOC classes. Did you mean 'person'"):
        voc_detection(str(devkit), "train")
    annotation.unlink()
    with pytest.raises(DatasetError, match=r"000007\.xml' is missing, though .*trainval\.txt"):
        voc_detection(str(devkit), "train")
    (devkit / "VOC2007" / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"first is '000005\.jpg'"):
        voc_detection(str(devkit), "train")


def test_voc_segmentation_keeps_outlines_ignored(tmp_path: Path) -> None:
    devkit = write_voc(tmp_path)
    dataset = voc_segmentation(str(devkit), "train")
    assert len(dataset) == 1 and len(dataset.segment_classes) == 21
    assert dataset.segment_classes[0] == "background"
    assert dataset.segment_classes[15] == "person"
    image, target = dataset[0]
    check_image(image, 20, 10)
    assert target.semantic.dtype == torch.int64 and target.semantic.shape == (10, 20)
    values, counts = torch.unique(target.semantic, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {
        0: 152, 15: 24, IGNORE_INDEX: 24}
    assert target.boxes.shape == (0, 4) and target.labels.tolist() == []
    assert target.masks is None and target.image_id == 2008000008
    assert len(voc_segmentation(str(devkit), "test")) == 1  # val.txt


def test_voc_segmentation_errors(tmp_path: Path) -> None:
    devkit = write_voc(tmp_path)
    png = devkit / "VOC2012" / "SegmentationClass" / "2008_000008.png"
    segmentation_png(png, size=(19, 10))
    with pytest.raises(DatasetError, match=r"is 19x10 pixels but its image is 20x10"):
        voc_segmentation(str(devkit), "train")[0]
    Image.new("RGB", (20, 10), (128, 0, 0)).save(png)  # colours, not indices
    with pytest.raises(DatasetError, match=r"is a RGB image, not class indices"):
        voc_segmentation(str(devkit), "train")[0]
    png.unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass' .*first is '2008_000008\.png'"):
        voc_segmentation(str(devkit), "train")
    (devkit / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"needs VOC2012/ImageSets/Segmentation/val\.txt"):
        voc_segmentation(str(devkit), "test")


# --- ADE20k ----------------------------------------------------------------------------

def write_ade20k(root: Path) -> Path:
    """One training and one validation image, 6 wide and 4 high; label rows 0, 1, 150
    and 13 (one value per row)."""
    release = root / "ADEChallengeData2016"
    for folder, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000002")):
        write_image(release / "images" / folder / f"{stem}.jpg", 6, 4)
        labels = np.array([[0] * 6, [1] * 6, [150] * 6, [13] * 6], dtype=np.uint8)
        (release / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels, mode="L").save(release / "annotations" / folder / f"{stem}.png")
    return release


def test_ade20k_reduces_the_zero_label(tmp_path: Path) -> None:
    release = write_ade20k(tmp_path)
    dataset = ade20k_segmentation(str(tmp_path), "train")  # a folder holding the release
    assert dataset.name == "ade20k" and len(dataset) == 1
    assert len(dataset.segment_classes) == 150
    assert dataset.segment_classes[0] == "wall" and dataset.segment_classes[12] == "person"
    assert dataset.segment_classes[149] == "flag"
    image, target = dataset[0]
    check_image(image, 6, 4)
    # 0 ("other") -> 255, v -> v - 1.
    assert target.semantic.dtype == torch.int64
    assert target.semantic.tolist() == [[255] * 6, [0] * 6, [149] * 6, [12] * 6]
    assert target.boxes.shape == (0, 4) and target.image_id == 1
    test = ade20k_segmentation(str(release), "test")  # the release folder itself
    assert len(test) == 1 and test[0][1].image_id == 2


def test_ade20k_errors(tmp_path: Path) -> None:
    (tmp_path / "ADE20K_2021_17_01").mkdir()
    with pytest.raises(DatasetError, match=r"not an ADE20k folder: expected ADEChallengeData2016/"):
        ade20k_segmentation(str(tmp_path), "train")
    release = write_ade20k(tmp_path)
    with pytest.raises(DatasetError, match="Unknown split 'validation'"):
        ade20k_segmentation(str(release), "validation")
    label = release / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(np.full((4, 6), 200, dtype=np.uint8), mode="L").save(label)
    with pytest.raises(DatasetError, match="holds values above 150"):
        ade20k_segmentation(str(release), "train")[0]
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8), mode="L").save(label)
    with pytest.raises(DatasetError, match=r"is 6x5 pixels but its image is 6x4"):
        ade20k_segmentation(str(release), "train")[0]
    write_image(release / "images" / "training" / "ADE_train_00000002.jpg", 6, 4)
    with pytest.raises(DatasetError, match=r"no same-named partner .*'ADE_train_00000002'"):
        ade20k_segmentation(str(release), "train")
