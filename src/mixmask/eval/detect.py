"""``mixmask detect RUN --task boxes|instances``: object detection (Faster R-CNN) or
instance segmentation (Mask R-CNN) with an FPN over the run's backbone
(:mod:`mixmask.models.dense`), every layer trained, scored by COCO AP.

The recipe follows MoCo's detection transfer (detectron2 configs, arXiv 1911.05722 sec.
4.2) as far as torchvision allows: SGD momentum 0.9, weight decay 1e-4, a linear
warm-up then x0.1 steps at fixed fractions of a fixed number of iterations, every stage
trained, and BatchNorm in **train mode** (batch statistics; MoCo uses SyncBN, which is
what several processes get here too), not frozen. What differs: torchvision's FPN
Faster / Mask R-CNN instead of detectron2's R50-C4 (torchvision has no C4 head), and the
images are resized by the data transforms, with AP computed at that resolution.

ViTs train better with ViTDet's recipe (Li et al. 2022, arXiv 2203.16527, sec. 4):
``transfer.optimizer=adamw`` with ``transfer.layer_decay`` and ``transfer.drop_path``
(``--config transfer/coco_vitdet``; ``transfer/mosaic_vitdet`` for the proxy), the same
warm-up and step schedule; its large-scale jitter augmentation is not reproduced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixmask.data.dense.sample import DenseTarget
from mixmask.data.progress import image_progress
from mixmask.errors import ConfigError
from mixmask.eval.dense_metrics import coco_average_precision, coco_detections, coco_ground_truth
from mixmask.eval.dense_training import DenseRun, HeldBatch
from mixmask.methods.protocol import StepOutput
from mixmask.models.dense.detection import DETECTION_TASKS, build_detector
from mixmask.ops.optim import (
    layer_decay_lr_scale,
    no_decay_bias_norm_and_tokens,
    parameter_groups,
)
from mixmask.train.schedule import warmup_step_lr

DESCRIPTION = ("{model} with an FPN over the {init} backbone, all layers trained (BN in train "
               "mode), {optimizer}, lr {lr} wd {wd}, {iterations} iterations of {batch} "
               "images, warm-up {warmup} then x{gamma} at {milestones}; COCO AP on {test} "
               "test images of {dataset}{proxy}")
PROXY_NOTE = (" (a localisation proxy: CIFAR images pasted on canvases, not comparable to "
              "VOC / COCO)")


def _torchvision_target(target: DenseTarget, device: torch.device, masks: bool) -> dict:
    # Crowd / difficult objects are not training targets (detectron2 drops crowd boxes).
    kept = ~target.crowd
    out = {"boxes": target.boxes[kept].to(device), "labels": target.labels[kept].to(device)}
    if masks:
        out["masks"] = target.masks[kept].to(device)
    return out


class DetectionTask(nn.Module):
    """A torchvision detector as a training step: the sum of its losses."""

    def __init__(self, detector: nn.Module, masks: bool):
        super().__init__()
        self.detector, self.masks = detector, masks

    def forward(self, batch: HeldBatch, generator=None, progress: float = 0.0) -> StepOutput:
        images, targets = batch.images, batch.targets
        device = next(self.detector.parameters()).device
        losses = self.detector([image.to(device) for image in images],
                               [_torchvision_target(target, device, self.masks)
                                for target in targets])
        loss = sum(losses.values())
        return StepOutput(loss, {name: value.detach() for name, value in losses.items()})


@torch.no_grad()
def detection_scores(detector: nn.Module, test_set, num_classes: int, *, masks: bool,
                     device: torch.device, batch_size: int, autocast=None,
                     progress=None) -> dict[str, float]:
    """COCO box AP (and mask AP) of ``detector`` on ``test_set`` (eval mode, then back)."""
    was_training = detector.training
    detector.eval()
    targets, sizes, outputs = [], [], []
    try:
        for start in range(0, len(test_set), batch_size):
            items = [test_set[index] for index in range(start, min(start + batch_size,
                                                                     len(test_set)))]
            images = [image.to(device) for image, _ in items]
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                predicted = detector(images)
            outputs.extend({key: value.float().cpu() for key, value in item.items()}
                           for item in predicted)
            targets.extend(target for _, target in items)
            sizes.extend(tuple(image.shape[-2:]) for image in images)
            if progress is not None:
                progress(len(items))
    finally:
        detector.train(was_training)
    ids = [target.image_id for target in targets]
    scores = {}
    for kind, iou_type in (("box", "bbox"), *((("mask", "segm"),) if masks else ())):
        truth = coco_ground_truth(targets, sizes, num_classes, masks=kind == "mask")
        found = coco_detections(outputs, ids, masks=kind == "mask")
        for name, value in coco_average_precision(truth, found, iou_type).items():
            scores[f"{kind}_{name}"] = value
    return scores


def detection_optimizer(detector: nn.Module, backbone: nn.Module, transfer
                        ) -> torch.optim.Optimizer:
    """SGD over every trainable parameter (MoCo's detectron2 configs), or ViTDet's AdamW
    (no weight decay on biases, norms, tokens and position embeddings); either with a ViT
    backbone's layer-wise lr decay when ``transfer.layer_decay < 1`` (each group's ``lr``
    is its peak: the schedule scales it)."""
    scale = None
    if transfer.layer_decay != 1.0:
        depth = getattr(backbone, "depth", None)
        if depth is None:
            raise ConfigError("transfer.layer_decay < 1 needs a ViT backbone (its blocks); set "
                              "transfer.layer_decay=1 for this run's backbone.")
        scale = layer_decay_lr_scale(depth, transfer.layer_decay)
    if transfer.drop_path > 0:
        if not callable(getattr(backbone, "set_drop_path", None)):
            raise ConfigError("transfer.drop_path > 0 needs a ViT backbone (its blocks); set "
                              "transfer.drop_path=0 for this run's backbone.")
        backbone.set_drop_path(transfer.drop_path)
    adamw = transfer.optimizer == "adamw"
    groups = parameter_groups(detector.named_parameters(), lr_scale=scale,
                              exclude_from_decay=no_decay_bias_norm_and_tokens if adamw else None)
    for group in groups:
        group.pop("param_names")
        group["lr"] = transfer.lr * group.pop("lr_scale")
    if adamw:
        return torch.optim.AdamW(groups, lr=transfer.lr, betas=(0.9, 0.999),
                                 weight_decay=transfer.weight_decay)
    return torch.optim.SGD(groups, lr=transfer.lr, momentum=transfer.momentum,
                           weight_decay=transfer.weight_decay)


def detect_name(task: str, from_scratch: bool) -> str:
    """``detect_boxes`` / ``detect_instances``, ``_scratch`` appended for the floor."""
    return f"detect_{task}" + ("_scratch" if from_scratch else "")


def run_detect(run, overrides: list[str], *, task: str, from_scratch: bool = False,
               checkpoint: str | None = None, protocol_file: str | None = None,
               console=None, stop=None) -> tuple[Any, dict[str, Any]]:
    """Train and score a detector from the run's backbone; ``RUN/eval/detect_<task>.json``."""
    if task not in DETECTION_TASKS:
        raise ConfigError(f"--task must be one of {', '.join(DETECTION_TASKS)}, got {task!r}.")
    dense = DenseRun(run, overrides, kind="detection", name=detect_name(task, from_scratch),
                     from_scratch=from_scratch, checkpoint=checkpoint,
                     protocol_file=protocol_file, console=console)
    transfer, masks = dense.config.transfer, task == "instances"
    if masks:
        dense.require_masks()
    detector = build_detector(dense.backbone, task, dense.num_thing_classes,
                              image_size=transfer.image_size, max_size=dense.max_size,
                              mean=dense.mean, std=dense.std,
                              pyramid_channels=transfer.pyramid_channels,
                              probe_size=dense.config.data.image_size,
                              rois_per_image=transfer.rois_per_image)
    optimizer = detection_optimizer(detector, dense.backbone, transfer)

    def lr_at(base: float, iteration: int) -> float:
        return warmup_step_lr(base, iteration, iterations=transfer.iterations,
                              warmup_iterations=transfer.warmup_iterations,
                              warmup_factor=transfer.warmup_factor,
                              milestones=transfer.milestones, gamma=transfer.gamma)

    settings = dense.settings(optimizer=transfer.optimizer, lr=transfer.lr,
                              momentum=transfer.momentum if transfer.optimizer == "sgd" else None,
                              betas=[0.9, 0.999] if transfer.optimizer == "adamw" else None,
                              layer_decay=transfer.layer_decay, drop_path=transfer.drop_path,
                              weight_decay=transfer.weight_decay,
                              warmup_iterations=transfer.warmup_iterations,
                              warmup_factor=transfer.warmup_factor,
                              milestones=list(transfer.milestones), gamma=transfer.gamma,
                              pyramid_channels=transfer.pyramid_channels,
                              rois_per_image=transfer.rois_per_image,
                              model="Mask R-CNN" if masks else "Faster R-CNN",
                              bn=dense.bn_description)
    training = dense.train(DetectionTask(detector, masks), optimizer, lr_at, settings, stop)
    model = training.model.module.detector

    def score() -> dict[str, float]:
        with image_progress(f"{dense.name} test", len(dense.test_set),
                            enabled=dense.progress_bar, console=console) as advance:
            return detection_scores(model, dense.test_set, dense.num_thing_classes,
                                    masks=masks, device=dense.fabric.device,
                                    batch_size=transfer.eval_batch_size,
                                    autocast=getattr(dense.fabric, "autocast", None),
                                    progress=advance)

    scores = dense.scores(score)
    description = DESCRIPTION.format(
        model=settings["model"], init=dense.init, lr=transfer.lr,
        optimizer=(f"SGD m{transfer.momentum}" if transfer.optimizer == "sgd" else
                   "AdamW (0.9, 0.999)") + (f", layer decay {transfer.layer_decay}"
                                            if transfer.layer_decay != 1.0 else ""),
        wd=transfer.weight_decay, iterations=transfer.iterations, batch=transfer.batch_size,
        warmup=transfer.warmup_iterations, gamma=transfer.gamma,
        milestones=list(transfer.milestones), test=len(dense.test_set),
        dataset=transfer.dataset, proxy=PROXY_NOTE if transfer.dataset == "mosaic" else "")
    return dense.write(description, settings, scores, training)

