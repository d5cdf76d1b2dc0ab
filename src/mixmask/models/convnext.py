"""ConvNeXt backbones (Liu et al., arXiv 2201.03545) through timm: ``model.backbone:
convnext_atto | convnext_femto | convnext_pico | convnext_nano | convnext_tiny |
convnext_small | convnext_base``.

The modules are timm's ``ConvNeXt`` (same parameter names), built without a classifier
(``num_classes=0``: pooled, LayerNorm'd features [B, D]), so a ``model.stem: imagenet``
backbone loads into ``timm.create_model(name, num_classes=0)`` with strict=True.

``model.stem: cifar`` is our adaptation for 32-96 px images (not in ConvNeXt's paper or
timm): a 3x3 stride-1 conv in place of the 4x4 stride-4 patchify stem, so a 32 px image
ends on a 4x4 map instead of 1x1 (the stages then run at 32, 16, 8, 4 px), as the CIFAR
ResNet keeps its resolution with a 3x3 stride-1 stem.

Capabilities, as the ResNet's (:class:`mixmask.models.backbones.ResNetBackbone`):
``feature_map``, ``pooling_head``, ``stage_geometry`` and ``forward_stages``, whose edit
point for stage i is after the stage's downsampling layer and before its blocks: A2MIM's
mask token "before the last stage" at stride 32 (openmixup's ConvNeXt configs, stage 3).
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models.convnext import ConvNeXt
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.models.backbones import BackboneTraits, register_backbone

# timm's variants (timm/models/convnext.py): depths, dims, 1x1-conv MLP.
CONVNEXTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
}


class ConvNeXtBackbone(ConvNeXt):
    """timm's ConvNeXt (same modules and parameter names) with the stage-level
    capabilities the masked-image methods use."""

    def feature_map(self, images: Tensor) -> Tensor:
        """The last stage's feature map [B, C, h, w] (before pooling and the head's norm)."""
        return self.forward_stages(images)

    @property
    def pooling_head(self) -> nn.Module:
        """What turns the feature map into the pooled features: timm's head (average
        pooling, then a LayerNorm)."""
        return self.head

    def forward_stages(self, images: Tensor, stage: int = -1,
                       edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Stem, then stages 0..3 with ``edit`` applied after stage ``stage``'s downsampling
        and before its blocks; the last map (``norm_pre`` is the identity in ConvNeXt)."""
        features = self.stem(images)
        for index, block_stage in enumerate(self.stages):
            features = block_stage.downsample(features)
            if index == stage and edit is not None:
                features = edit(features)
            features = block_stage.blocks(features)
        return self.norm_pre(features)

    def stage_maps(self, images: Tensor) -> list[Tensor]:
        """The output of each of the four stages: the multi-scale maps a detector's feature
        pyramid and UperNet read (ConvNeXt's own detection and segmentation transfer,
        arXiv 2201.03545 sec. 3, takes the same four)."""
        features = self.stem(images)
        maps = []
        for block_stage in self.stages:
            features = block_stage(features)
            maps.append(features)
        maps[-1] = self.norm_pre(maps[-1])
        return maps

    def stage_geometry(self) -> tuple[list[int], int, list[int]]:
        """(stride at each stage's edit point, stride of the last map, channels there)."""
        stem_stride = self.stem[0].stride[0]
        strides, stride = [], stem_stride
        for block_stage in self.stages:
            if isinstance(block_stage.downsample, nn.Sequential):
                stride *= block_stage.downsample[-1].stride[0]
            strides.append(stride)
        channels = [stage.blocks[0].conv_dw.in_channels for stage in self.stages]
        return strides, strides[-1], channels


def convnext_stage_strides(stem: str) -> tuple[tuple[int, ...], int]:
    """Strides at the edit points of the four stages and of the last map, by ``model.stem``
    (the stem's, then x2 at each downsampling of stages 1-3)."""
    stem_stride = 1 if stem == "cifar" else 4
    strides = tuple(stem_stride * 2 ** stage for stage in range(4))
    return strides, strides[-1]


def build_convnext(name: str, *, stem: str = "imagenet") -> tuple[ConvNeXtBackbone, int]:
    """``(backbone, feature_dim)``; ``backbone(x)`` gives pooled, LayerNorm'd features."""
    if name not in CONVNEXTS:
        raise ValueError(f"unknown ConvNeXt {name!r}; choose from {sorted(CONVNEXTS)}")
    depths, dims, conv_mlp = CONVNEXTS[name]
    model = ConvNeXtBackbone(depths=depths, dims=dims, conv_mlp=conv_mlp, num_classes=0)
    if stem == "cifar":
        # Our adaptation (module docstring); initialised as timm initialises convolutions.
        model.stem[0] = nn.Conv2d(3, dims[0], kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(model.stem[0].weight, std=0.02)
        nn.init.zeros_(model.stem[0].bias)
    return model, model.num_features


def _check_convnext(model_config) -> None:
    if model_config.width != 1.0:
        raise ConfigError(f"model.width scales ResNets; {model_config.backbone}'s widths are "
                          f"its own (a smaller ConvNeXt: {', '.join(CONVNEXTS)}).")


def _convnext_builder(name: str):
    def build(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
        return build_convnext(name, stem=model_config.stem)

    build.__doc__ = f"timm's {name} (model.stem: cifar is our 32 px adaptation)."
    return build


# torchvision builds the larger ConvNeXts only.
_IN_TORCHVISION = ("convnext_tiny", "convnext_small", "convnext_base")

for _name in CONVNEXTS:
    register_backbone(_name, BackboneTraits(
        stage_strides=convnext_stage_strides, timm_name=_name, check=_check_convnext,
        torchvision_name=_name if _name in _IN_TORCHVISION else ""))(_convnext_builder(_name))
