"""The ``transfer`` section: ``mixmask detect`` and ``mixmask segment``.

The defaults are the CIFAR-mosaic proxy at CPU size; ``configs/transfer/`` holds the
papers' VOC07+12, COCO and ADE20k settings (as close as torchvision allows) and the proxy
(``--config transfer/mosaic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TransferConfig:
    # mosaic: CIFAR images pasted on canvases (mixmask.data.dense.mosaic), a localisation
    # proxy whose numbers are not comparable to VOC / COCO; coco (instances_*2017.json),
    # voc (VOCdevkit: 07+12 trainval / 07 test for detection, 2012 train / val for
    # segmentation), ade20k (ADEChallengeData2016, segmentation only).
    dataset: Literal["mosaic", "coco", "voc", "ade20k"] = "mosaic"
    # The dataset's folder; "" = the run's data.root (mosaic: the CIFAR tarball or folder).
    root: str = ""
    # Fixed iterations (images per iteration: batch_size over all processes).
    iterations: int = 2000
    batch_size: int = 8
    # Shorter image side (the mosaic's canvas side), longer side at most max_size
    # (0 = image_size x 1333 / 800, detectron2's ratio).
    image_size: int = 128
    max_size: int = 0
    # Images used of each split (0 = all; the mosaic's canvas counts, 0 = one canvas per
    # mosaic_objects[1] images of the split).
    train_images: int = 0
    test_images: int = 0
    flip: bool = True
    # The mosaic: objects per canvas (min, max) and their side in px (min, max).
    mosaic_objects: tuple[int, int] = (1, 4)
    mosaic_object_size: tuple[int, int] = (32, 48)
    # Detection: SGD momentum 0.9, a linear warm-up from warmup_factor x lr over
    # warmup_iterations, then x gamma at each milestone (fractions of iterations):
    # detectron2's WarmupMultiStepLR, MoCo's VOC schedule (lr 0.02 at batch 16, 24k
    # iterations, steps at 18k and 22k; 100 warm-up iterations).
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # The detection optimizer: "sgd" (above: MoCo's detectron2 configs) or "adamw", ViTDet's
    # (Li et al. 2022, arXiv 2203.16527, sec. 4 and its COCO configs: AdamW (0.9, 0.999), lr
    # 1e-4 at batch 64, wd 0.1, no weight decay on biases, norms and position embeddings);
    # the same warm-up and step schedule either way. layer_decay < 1: a ViT backbone's
    # layer-wise lr decay (ViTDet: 0.7 for ViT-B, embeddings x decay^(depth+1), the pyramid
    # and heads at the full lr); drop_path: stochastic depth of a ViT's blocks (0.1 there).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    layer_decay: float = 1.0
    drop_path: float = 0.0
    warmup_iterations: int = 100
    warmup_factor: float = 0.001
    milestones: tuple[float, ...] = (0.75, 0.9167)
    gamma: float = 0.1
    # Channels of the detection pyramid (torchvision's FPN: 256); RoIs sampled per image
    # for the box head's loss (detectron2 and torchvision: 512).
    pyramid_channels: int = 256
    rois_per_image: int = 512
    # Segmentation: SGD momentum 0.9 and the poly schedule (power 0.9 to 0) of
    # mmsegmentation's UperNet recipes (lr 0.01, wd 5e-4); the head's width (512 there);
    # the linear head trains at its own lr on the frozen backbone.
    segment_lr: float = 0.01
    segment_weight_decay: float = 5e-4
    segment_linear_lr: float = 0.01
    segment_power: float = 0.9
    segment_channels: int = 512
    # Save every N iterations (0: only at the end and on a stop signal).
    checkpoint_every: int = 500
    eval_batch_size: int = 8
