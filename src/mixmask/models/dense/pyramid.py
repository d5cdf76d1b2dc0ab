"""Four maps at strides (s, 2s, 4s, 8s) from any backbone, and the feature pyramids the
detectors read.

- A hierarchical backbone (ResNet, ConvNeXt: it has ``stage_maps``) gives its four stage
  outputs; the detection pyramid over them is FPN (Lin et al., arXiv 1612.03144):
  lateral 1x1 convs, the top-down sum, a 3x3 conv per level, and a stride-2 max-pool of
  the top level (torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``, the
  ``p6`` of Mask R-CNN's FPN).
- A single-scale backbone (ViT, ConvViT: ``feature_map`` only) gives its last map at
  stride t; ViTDet's simple feature pyramid (Li et al., arXiv 2203.16527, sec. 3 and
  fig. 2c) rescales it to t/4, t/2, t and 2t: two stride-2 transposed convs (with a
  LayerNorm and GELU between), one, the identity and a stride-2 max-pool; then on each
  level a 1x1 conv and a 3x3 conv, each followed by a LayerNorm, and no top-down path (the
  paper's finding: it is not needed). The same max-pooled top level follows.

Strides and channels are read by one forward of a probe image at construction, so any
backbone that gives the maps works, whatever its stem.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

PYRAMID_LEVELS = ("0", "1", "2", "3")


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (ViTDet's ``LayerNorm`` of conv
    features)."""

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def is_hierarchical(backbone: nn.Module) -> bool:
    """Whether the backbone gives maps at several strides itself (``stage_maps``)."""
    return callable(getattr(backbone, "stage_maps", None))


def train_for_dense(backbone: nn.Module) -> nn.Module:
    """Every parameter trainable (parts a method froze to pretrain too, such as
    SiameseIM's random patch embedding), except the pooling head, which no dense head
    reads (ConvNeXt's head norm, a ViT's ``fc_norm``)."""
    backbone.requires_grad_(True)
    backbone.pooling_head.requires_grad_(False)
    return backbone


class MultiScaleMaps(nn.Module):
    """The backbone's four maps at strides (s, 2s, 4s, 8s): its stage outputs, or ViTDet's
    rescaling of its last map (see the module docstring). ``strides`` and ``channels``
    list them; ``probe_size`` is an input size the backbone accepts."""

    def __init__(self, backbone: nn.Module, probe_size: int):
        super().__init__()
        self.backbone = backbone
        self.hierarchical = is_hierarchical(backbone)
        if not self.hierarchical and not callable(getattr(backbone, "feature_map", None)):
            raise TypeError(f"{type(backbone).__name__} gives no feature map (feature_map or "
                            "stage_maps) for dense transfer.")
        shapes = probe_maps(backbone, probe_size, hierarchical=self.hierarchical)
        if self.hierarchical:
            self.channels = [channels for channels, _ in shapes]
            self.strides = [probe_size // side for _, side in shapes]
            return
        (dim, side), = shapes
        stride = probe_size // side
        if stride % 4:
            raise ValueError(f"the simple feature pyramid needs a map stride divisible by 4 "
                             f"(two 2x upsamplings); this backbone's is {stride}.")
        # ViTDet's widths: dim/4 at 4x, dim/2 at 2x, dim at 1x and 1/2x.
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                                 ChannelNorm(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)
        self.channels = [dim // 4, dim // 2, dim, dim]
        self.strides = [stride // 4, stride // 2, stride, stride * 2]

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.hierarchical:
            return list(self.backbone.stage_maps(images))
        last = self.backbone.feature_map(images)
        return [self.up4(last), self.up2(last), last, self.down2(last)]


@torch.no_grad()
def probe_maps(backbone: nn.Module, size: int, *, hierarchical: bool) -> list[tuple[int, int]]:
    """(channels, side) of each map of one probe image, in eval mode (BatchNorm's
    statistics untouched), the mode restored after."""
    was_training = backbone.training
    backbone.eval()
    parameter = next(backbone.parameters())
    probe = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
    try:
        maps = backbone.stage_maps(probe) if hierarchical else [backbone.feature_map(probe)]
    finally:
        backbone.train(was_training)
    return [(item.shape[1], item.shape[-1]) for item in maps]


class DetectionPyramid(nn.Module):
    """What torchvision's detectors take as ``backbone``: ``out_channels`` and a forward
    giving an ordered dict of maps ``"0"``..``"3"`` (strides s..8s) and ``"pool"`` (16s)."""

    def __init__(self, backbone: nn.Module, out_channels: int, probe_size: int):
        super().__init__()
        self.body = MultiScaleMaps(backbone, probe_size)
        self.out_channels = out_channels
        self.strides = [*self.body.strides, self.body.strides[-1] * 2]
        if self.body.hierarchical:
            self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels,
                                             extra_blocks=LastLevelMaxPool())
        else:
            self.levels = nn.ModuleList(
                nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False),
                              ChannelNorm(out_channels),
                              nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                              ChannelNorm(out_channels))
                for channels in self.body.channels)
            self.top = LastLevelMaxPool()

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)
        if self.body.hierarchical:
            return self.fpn(OrderedDict(zip(PYRAMID_LEVELS, maps, strict=True)))
        levels = [level(item) for level, item in zip(self.levels, maps, strict=True)]
        levels, names = self.top(levels, [], list(PYRAMID_LEVELS))
        return OrderedDict(zip(names, levels, strict=True))
