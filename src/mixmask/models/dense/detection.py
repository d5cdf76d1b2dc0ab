"""torchvision's Faster R-CNN (boxes) and Mask R-CNN (instances) on a
:class:`~mixmask.models.dense.pyramid.DetectionPyramid` over any backbone.

torchvision's defaults are Detectron's FPN settings (RPN 256 anchors per image at IoU
0.7 / 0.3, 512 RoIs per image with a quarter positive, box NMS 0.5, 100 detections per
image, RoIAlign 7x7 / 14x14 on the levels "0".."3"); what we set:

- the anchors: one size per level, 8 x the level's stride (torchvision's 32..512 on
  strides 4..64), with aspect ratios 0.5, 1, 2. A CIFAR-stem backbone's pyramid runs at
  strides 1..16, so its anchors (8..128 px) fit the 32 px objects the proxy pastes;
- the resize: ``min_size`` / ``max_size`` are the data's own sizes (the data transforms
  resize already, so the detector's transform only normalises and batches);
- the normalisation: the run's pixel mean and std, so the backbone sees what it
  pretrained on.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from mixmask.models.dense.pyramid import DetectionPyramid

DETECTION_TASKS = ("boxes", "instances")


def build_detector(backbone: nn.Module, task: str, num_classes: int, *, image_size: int,
                   max_size: int, mean: Sequence[float], std: Sequence[float],
                   pyramid_channels: int = 256, probe_size: int = 64,
                   rois_per_image: int = 512) -> nn.Module:
    """Faster R-CNN (``task="boxes"``) or Mask R-CNN (``"instances"``) for ``num_classes``
    object classes (torchvision adds the background) on ``backbone``.

    ``probe_size``: an input size the backbone accepts (its pretraining size), to read the
    strides and channels of its maps. ``rois_per_image``: the RoIs sampled per image for the
    box head's loss (detectron2's and torchvision's 512, a quarter positive)."""
    if task not in DETECTION_TASKS:
        raise ValueError(f"task must be one of {DETECTION_TASKS}, got {task!r}.")
    pyramid = DetectionPyramid(backbone, pyramid_channels, probe_size)
    anchors = AnchorGenerator(sizes=tuple((8 * stride,) for stride in pyramid.strides),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(pyramid.strides))
    detector = MaskRCNN if task == "instances" else FasterRCNN
    return detector(pyramid, num_classes=num_classes + 1, min_size=image_size,
                    max_size=max_size, image_mean=list(mean), image_std=list(std),
                    rpn_anchor_generator=anchors, box_batch_size_per_image=rois_per_image)
