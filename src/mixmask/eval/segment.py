"""``mixmask segment RUN --head linear|uper``: semantic segmentation from the run's
backbone, scored by mIoU and pixel accuracy (ignore index 255).

- ``linear``: the backbone frozen (eval mode), a BatchNorm + 1x1 conv on its last map,
  logits upsampled to the image: it measures the representation alone (DINOv2's linear
  segmentation protocol, arXiv 2304.07193 sec. 7.4).
- ``uper``: UperNet (PPM + FPN fusion, mmsegmentation's ``UPerHead``) on the backbone's
  four maps, everything trained: the transfer protocol of SiameseIM, BEiT and MAE
  (ADE20k), here with SGD and the poly schedule of mmsegmentation's UperNet recipes.

Training: pixel-wise cross-entropy over the classes, padding and 255 ignored; SGD
momentum 0.9 with the poly schedule (power ``transfer.segment_power``) over a fixed number
of iterations; images resized (shorter side ``transfer.image_size``) and flipped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixmask.data.dense.sample import IGNORE_INDEX
from mixmask.data.dense.transforms import pad_batch
from mixmask.data.progress import image_progress
from mixmask.errors import ConfigError
from mixmask.eval.dense_metrics import confusion_matrix, segmentation_scores
from mixmask.eval.dense_training import DenseRun, HeldBatch
from mixmask.methods.protocol import StepOutput
from mixmask.models.dense.segmentation import (
    SEGMENTATION_HEADS,
    LinearSegmenter,
    UperNetSegmenter,
)
from mixmask.train.schedule import poly_lr

DESCRIPTION = ("semantic segmentation, {head} on the {init} backbone{frozen}: SGD lr {lr} m0.9 "
               "wd {wd}, poly {power} over {iterations} iterations of {batch} images; mIoU "
               "and pixel accuracy on {test} test images of {dataset}{proxy}")
PROXY_NOTE = (" (a localisation proxy: CIFAR images pasted on canvases, not comparable to "
              "ADE20k / VOC)")


class SegmentationTask(nn.Module):
    """A segmenter as a training step: cross-entropy per pixel, IGNORE_INDEX left out."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, batch: HeldBatch, generator=None, progress: float = 0.0) -> StepOutput:
        images, labels = pad_batch(batch.images, batch.targets)
        device = next(p for p in self.segmenter.parameters() if p.requires_grad).device
        logits = self.segmenter(images.to(device))
        loss = F.cross_entropy(logits.float(), labels.to(device), ignore_index=IGNORE_INDEX)
        return StepOutput(loss, {"loss": loss.detach()})


@torch.no_grad()
def segmentation_results(segmenter: nn.Module, test_set, num_classes: int, *,
                         device: torch.device, batch_size: int, autocast=None,
                         progress=None) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of ``segmenter`` on ``test_set``."""
    was_training = segmenter.training
    segmenter.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    try:
        for start in range(0, len(test_set), batch_size):
            items = [test_set[index] for index in range(start, min(start + batch_size,
                                                                     len(test_set)))]
            images, labels = pad_batch([image for image, _ in items],
                                       [target for _, target in items])
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                logits = segmenter(images.to(device))
            confusion += confusion_matrix(logits.float().argmax(1).cpu(), labels, num_classes)
            if progress is not None:
                progress(len(items))
    finally:
        segmenter.train(was_training)
    return segmentation_scores(confusion)


def segment_name(head: str, from_scratch: bool) -> str:
    return f"segment_{head}" + ("_scratch" if from_scratch else "")


def run_segment(run, overrides: list[str], *, head: str, from_scratch: bool = False,
                checkpoint: str | None = None, protocol_file: str | None = None,
                console=None, stop=None) -> tuple[Any, dict[str, Any]]:
    """Train and score a segmenter; ``RUN/eval/segment_<head>.json``."""
    if head not in SEGMENTATION_HEADS:
        raise ConfigError(f"--head must be one of {', '.join(SEGMENTATION_HEADS)}, got "
                          f"{head!r}.")
    dense = DenseRun(run, overrides, kind="segmentation",
                     name=segment_name(head, from_scratch), from_scratch=from_scratch,
                     checkpoint=checkpoint, protocol_file=protocol_file, console=console)
    transfer = dense.config.transfer
    num_classes = len(dense.segment_classes)
    if head == "linear":
        segmenter = LinearSegmenter(dense.backbone, num_classes,
                                    probe_size=dense.config.data.image_size)
        lr, weight_decay = transfer.segment_linear_lr, 0.0
    else:
        if dense.images_per_bn_statistics < 2:
            raise ConfigError(
                "UperNet's pyramid pooling normalises 1x1 maps with BatchNorm in train mode, "
                f"which needs at least 2 images per process; set transfer.batch_size to at "
                f"least {2 * dense.fabric.world_size}.")
        segmenter = UperNetSegmenter(dense.backbone, num_classes,
                                     channels=transfer.segment_channels,
                                     probe_size=dense.config.data.image_size)
        lr, weight_decay = transfer.segment_lr, transfer.segment_weight_decay
    optimizer = torch.optim.SGD([p for p in segmenter.parameters() if p.requires_grad], lr=lr,
                                momentum=0.9, weight_decay=weight_decay)

    def lr_at(base: float, iteration: int) -> float:
        return poly_lr(base, iteration, iterations=transfer.iterations,
                       power=transfer.segment_power)

    settings = dense.settings(head=head, optimizer="sgd momentum 0.9", lr=lr,
                              weight_decay=weight_decay, schedule="poly",
                              power=transfer.segment_power, classes=num_classes,
                              backbone_trained=head != "linear",
                              **({"channels": transfer.segment_channels} if head == "uper"
                                 else {}))
    training = dense.train(SegmentationTask(segmenter), optimizer, lr_at, settings, stop)
    model = training.model.module.segmenter

    def score() -> dict[str, Any]:
        with image_progress(f"{dense.name} test", len(dense.test_set),
                            enabled=dense.progress_bar, console=console) as advance:
            return segmentation_results(model, dense.test_set, num_classes,
                                        device=dense.fabric.device,
                                        batch_size=transfer.eval_batch_size,
                                        autocast=getattr(dense.fabric, "autocast", None),
                                        progress=advance)

    scores = dense.scores(score)
    scores["class_names"] = list(dense.segment_classes)
    description = DESCRIPTION.format(
        head="a linear head" if head == "linear" else "an UperNet head", init=dense.init,
        frozen=" (frozen)" if head == "linear" else ", all layers trained", lr=lr,
        wd=weight_decay, power=transfer.segment_power, iterations=transfer.iterations,
        batch=transfer.batch_size, test=len(dense.test_set), dataset=transfer.dataset,
        proxy=PROXY_NOTE if transfer.dataset == "mosaic" else "")
    return dense.write(description, settings, scores, training)
