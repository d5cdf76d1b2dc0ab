"""Scores of dense predictions: COCO average precision (boxes and masks) and semantic
segmentation's mIoU and pixel accuracy.

AP is pycocotools' ``COCOeval`` (the COCO protocol: 101-point interpolated precision,
IoU thresholds 0.50:0.05:0.95, at most 100 detections per image, crowd / difficult
objects as ignore regions), reported in percent: AP (mean over the thresholds), AP50 and
AP75, all object sizes. The ground truth and detections are built in memory, never read
from files.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mixmask.data.dense.sample import IGNORE_INDEX, DenseTarget


def _rle(mask: Tensor) -> dict:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.to(torch.uint8).numpy()))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def coco_ground_truth(targets: Sequence[DenseTarget], sizes: Sequence[tuple[int, int]],
                      num_classes: int, *, masks: bool) -> dict:
    """A COCO ``instances`` dict of ``targets`` (image ``i`` of height, width ``sizes[i]``;
    ids ``target.image_id``), categories 1..``num_classes``."""
    images, annotations = [], []
    for target, (height, width) in zip(targets, sizes, strict=True):
        images.append({"id": int(target.image_id), "height": int(height), "width": int(width)})
        for row in range(len(target.labels)):
            x0, y0, x1, y1 = (float(value) for value in target.boxes[row])
            annotation = {"id": len(annotations) + 1, "image_id": int(target.image_id),
                          "category_id": int(target.labels[row]),
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                          "iscrowd": int(bool(target.crowd[row]))}
            if masks:
                annotation["segmentation"] = _rle(target.masks[row])
                annotation["area"] = float(target.masks[row].sum())
            annotations.append(annotation)
    categories = [{"id": index, "name": str(index)} for index in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(predictions: Sequence[dict], image_ids: Sequence[int], *,
                    masks: bool) -> list[dict]:
    """torchvision detector outputs (``boxes`` xyxy, ``labels``, ``scores``, ``masks``
    [N, 1, H, W] probabilities, thresholded at 0.5 as torchvision's COCO evaluation does)
    as COCO result entries."""
    entries = []
    for output, image_id in zip(predictions, image_ids, strict=True):
        boxes = output["boxes"].float().cpu()
        for row in range(len(boxes)):
            x0, y0, x1, y1 = (float(value) for value in boxes[row])
            entry = {"image_id": int(image_id), "category_id": int(output["labels"][row]),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(output["scores"][row])}
            if masks:
                entry["segmentation"] = _rle(output["masks"][row, 0].cpu() > 0.5)
            entries.append(entry)
    return entries


def coco_average_precision(ground_truth: dict, detections: list[dict],
                           iou_type: str) -> dict[str, float]:
    """``{"ap", "ap50", "ap75"}`` in percent, by COCOeval with ``iou_type`` ``"bbox"`` or
    ``"segm"``. No detection at all scores 0 (pycocotools refuses an empty result list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        results = truth.loadRes(detections)
        evaluation = COCOeval(truth, results, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # stats: AP, AP50, AP75, ...; -1 where no ground truth exists at all.
    ap, ap50, ap75 = (max(float(value), 0.0) * 100 for value in evaluation.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 [S, S]: entry (true s, predicted p) counts the pixels; pixels labelled
    IGNORE_INDEX are left out."""
    kept = labels != IGNORE_INDEX
    pairs = labels[kept].long() * num_classes + predicted[kept].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """mIoU (mean over the classes that occur in the labels or the predictions, as
    mmsegmentation's nan-mean) and pixel accuracy, in percent; per-class IoU too (None
    for a class absent from both)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp(min=1), torch.nan)
    total = confusion.sum()
    return {"miou": float(iou[present].mean() * 100) if bool(present.any()) else 0.0,
            "pixel_accuracy": float(true_positive.sum() / total * 100) if total else 0.0,
            "class_iou": [None if not bool(ok) else float(value * 100)
                          for value, ok in zip(iou, present, strict=True)]}
