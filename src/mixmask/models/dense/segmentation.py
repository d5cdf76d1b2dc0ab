"""Semantic segmentation heads over any backbone.

- :class:`LinearSegmenter`: the frozen backbone's last map, a BatchNorm and a 1x1 conv to
  the classes, the logits upsampled bilinearly to the image (the linear protocol of
  DINOv2, arXiv 2304.07193 sec. 7.4 "linear": it measures the representation alone).
- :class:`UperNetSegmenter`: UperNet (Xiao et al., arXiv 1807.10221) in mmsegmentation's
  ``UPerHead`` form, the head of the SiameseIM, BEiT and MAE segmentation transfer: a
  pyramid pooling module (bins 1, 2, 3, 6) on the top map, lateral 1x1 convs and the
  top-down sum on the others, a 3x3 conv per level, all levels upsampled to the finest
  and fused by a 3x3 conv, then a 1x1 classifier (dropout 0.1 before it); conv + BN +
  ReLU throughout. It reads :class:`~mixmask.models.dense.pyramid.MultiScaleMaps` (a
  ViT's last map rescaled to four strides, as BEiT's and MAE's UperNet necks do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmask.models.dense.pyramid import MultiScaleMaps, probe_maps

SEGMENTATION_HEADS = ("linear", "uper")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(features: Tensor, size) -> Tensor:
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


class LinearSegmenter(nn.Module):
    """BatchNorm + 1x1 conv on the frozen backbone's last map (``feature_map``). The
    backbone stays in eval mode and outside the gradient whatever ``train()`` says."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, probe_size: int = 64):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        (feature_dim, _), = probe_maps(backbone, probe_size, hierarchical=False)
        self.norm = nn.BatchNorm2d(feature_dim)
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1)

    def train(self, mode: bool = True) -> LinearSegmenter:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone.feature_map(images)
        return _resize(self.classifier(self.norm(features.float())), images.shape[-2:])


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling (Zhao et al., arXiv 1612.01105): the map average-pooled to
    each bin size, a conv + BN + ReLU, upsampled back and concatenated with the map."""

    def __init__(self, in_channels: int, channels: int, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = bins
        self.stages = nn.ModuleList(_conv_bn_relu(in_channels, channels, 1) for _ in bins)
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * channels, channels, 3)

    def forward(self, features: Tensor) -> Tensor:
        pooled = [_resize(stage(F.adaptive_avg_pool2d(features, bin_size)),
                          features.shape[-2:])
                  for bin_size, stage in zip(self.bins, self.stages, strict=True)]
        return self.bottleneck(torch.cat([features, *pooled], dim=1))


class UperNetSegmenter(nn.Module):
    """UperNet head (``channels`` wide) on the backbone's four maps; the whole network
    trains."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, channels: int = 512,
                 probe_size: int = 64, dropout: float = 0.1):
        super().__init__()
        self.maps = MultiScaleMaps(backbone, probe_size)
        widths = self.maps.channels
        self.pyramid_pooling = PyramidPooling(widths[-1], channels)
        self.laterals = nn.ModuleList(_conv_bn_relu(width, channels, 1) for width in widths[:-1])
        self.outputs = nn.ModuleList(_conv_bn_relu(channels, channels, 3)
                                     for _ in widths[:-1])
        self.fuse = _conv_bn_relu(len(widths) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @property
    def backbone(self) -> nn.Module:
        return self.maps.backbone

    def forward(self, images: Tensor) -> Tensor:
        maps = self.maps(images)
        levels = [lateral(item) for lateral, item in zip(self.laterals, maps, strict=False)]
        levels.append(self.pyramid_pooling(maps[-1]))
        for index in range(len(levels) - 1, 0, -1):  # top-down: coarse into fine
            levels[index - 1] = levels[index - 1] + _resize(levels[index],
                                                            levels[index - 1].shape[-2:])
        outputs = [conv(item) for conv, item in zip(self.outputs, levels, strict=False)]
        outputs.append(levels[-1])
        finest = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([outputs[0], *(_resize(item, finest)
                                                   for item in outputs[1:])], dim=1))
        return _resize(self.classifier(self.dropout(fused)), images.shape[-2:])
