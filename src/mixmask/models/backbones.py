"""The backbone registry (``model.backbone``) and its ResNets.

A name maps to a builder ``(model_config) -> (module, feature_dim)`` whose module returns
pooled features [B, D], and to its :class:`BackboneTraits`: what the backbone can do, known
before it is built, so a method validates a config by capability ("a token model", "a
ConvNet with stages"), never by a list of names. :func:`register_backbone` adds one
without any change to the engine or the methods.

Capabilities of the built modules: a ViT (:class:`mixmask.models.vit.ViTBackbone`) has the
visible-token forward and the forward with a mask token; a ResNet
(:class:`ResNetBackbone`) has its last feature map, its stage geometry and the forward with
an edit at a stage's input.

ResNets: torchvision's ResNet with a CIFAR stem option and a width multiplier.

The modules are torchvision ``ResNet`` instances (same parameter names), so a width-1.0
ImageNet-stem backbone loads into ``torchvision.models.resnet50()`` with strict=True once
the classifier is added back (``fc`` is replaced by an identity here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from mixmask.errors import ConfigError, did_you_mean

BackboneBuilder = Callable[..., tuple[nn.Module, int]]


@dataclass(frozen=True)
class BackboneTraits:
    """What a registered backbone can do, known from its name alone."""

    # Patch tokens (a ViT): forward_visible, forward_with_mask_token, patch grid, blocks.
    tokens: bool = False
    # Blocks of a token model (a ViT's depth; its mask-token layers run 0..blocks).
    blocks: int = 0
    # MAE's encoder on visible tokens (forward_visible, patch_size, grid_size,
    # has_cls_token): (model_config, image_size) -> the token stride in px. None: none.
    token_stride: Callable[[Any, int], int] | None = None
    # Four stages of feature maps (a ConvNet: feature_map, pooling_head, stage_geometry,
    # forward_stages):
    # model.stem -> (the stride of each stage's edit point, the stride of the last map), so
    # a config is checked before anything is built. None: no stages.
    stage_strides: Callable[[str], tuple[tuple[int, ...], int]] | None = None
    # The torchvision ResNet depth its weights fit (18, 34, 50), for the exports; 0: none.
    torchvision_resnet_depth: int = 0
    # The timm model its weights load into (model.stem imagenet), for the timm export.
    timm_name: str = ""
    # The torchvision model its weights load into (names mapped where they differ), for the
    # torchvision export; "": none.
    torchvision_name: str = ""
    # Checks of the model.* keys for this backbone (ConfigError), run by the config's
    # validation before anything is built.
    check: Callable[[object], None] | None = None

    @property
    def stages(self) -> bool:
        return self.stage_strides is not None


_BACKBONES: dict[str, tuple[BackboneBuilder, BackboneTraits]] = {}


def register_backbone(name: str, traits: BackboneTraits | None = None):
    """Decorator: register ``builder(model_config, image_size) -> (module, feature_dim)``
    as ``model.backbone: <name>``, with what it can do (``traits``; none by default)."""

    def register(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES and _BACKBONES[name][0] is not builder:
            raise ValueError(f"Backbone {name!r} is already registered.")
        _BACKBONES[name] = (builder, traits or BackboneTraits())
        return builder

    return register


def backbone_names() -> tuple[str, ...]:
    return tuple(_BACKBONES)


def backbone_traits(name: str) -> BackboneTraits:
    """The traits of a registered backbone (none for a name the registry lacks)."""
    return _BACKBONES[name][1] if name in _BACKBONES else BackboneTraits()


class ResNetBackbone(tv_resnet.ResNet):
    """torchvision's ResNet (same modules and parameter names) with the stage-level
    capabilities the masked-image methods use: the last feature map, the stride and width
    of each stage's input, and a forward that edits one stage's input."""

    def feature_map(self, images: Tensor) -> Tensor:
        """The last stage's feature map [B, C, h, w] (before pooling)."""
        return self.forward_stages(images)

    @property
    def pooling_head(self) -> nn.Module:
        """What turns the feature map into the pooled features, beyond averaging: nothing
        for a ResNet (``fc`` is an identity)."""
        return self.fc

    def forward_stages(self, images: Tensor, stage: int = -1,
                       edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Stem, then stages 0..3 (``layer1``..``layer4``), with ``edit`` applied to the
        input of ``stage`` (A2MIM's mask token, ``MIMResNet.forward``); the last map."""
        features = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for index, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if index == stage and edit is not None:
                features = edit(features)
            features = layer(features)
        return features

    def stage_maps(self, images: Tensor) -> list[Tensor]:
        """The output of each stage (``layer1``..``layer4``): the multi-scale maps a
        detector's feature pyramid (FPN, Lin et al. 2017) and UperNet read."""
        features = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            features = layer(features)
            maps.append(features)
        return maps

    def stage_geometry(self) -> tuple[list[int], int, list[int]]:
        """(stride of each stage's input, stride of the last map, channels of each stage's
        input), read from the modules."""
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        stem_stride = _module_stride(self.conv1) * (
            _module_stride(self.maxpool) if isinstance(self.maxpool, nn.MaxPool2d) else 1)
        strides = [_module_stride(stage[0]) for stage in stages]
        input_strides = [stem_stride * math.prod(strides[:i]) for i in range(4)]
        channels = [stage[0].conv1.in_channels for stage in stages]
        return input_strides, stem_stride * math.prod(strides), channels


def resnet_stage_strides(stem: str) -> tuple[tuple[int, ...], int]:
    """ResNet stage inputs' strides and the last map's, by ``model.stem``: the stem (1 for
    the CIFAR stem, 4 for torchvision's conv + max-pool), then x2 per stage after the
    first (each stage downsamples in its first block, so its input is the previous
    stride)."""
    stem_stride = 1 if stem == "cifar" else 4
    return tuple(stem_stride * 2 ** max(stage - 1, 0) for stage in range(4)), stem_stride * 8


def _module_stride(module: nn.Module) -> int:
    stride = getattr(module, "stride", 1)
    return stride[0] if isinstance(stride, tuple) else int(stride)

_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2], 18),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3], 34),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3], 50),
}


def build_resnet(name: str, *, stem: str = "cifar", width: float = 1.0) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``; ``backbone(x)`` gives pooled features [B, D].

    stem="cifar": 3x3 stride-1 conv, no max-pool (the small-image ResNet of the MoCo/Un-Mix
    CIFAR scripts), so a 32 px input ends on a 4x4 map. stem="imagenet": torchvision's.
    width scales every stage's channels (64, 128, 256, 512) for CPU-sized runs.
    """
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(_RESNETS)}")
    block, layers, _ = _RESNETS[name]
    model = ResNetBackbone(block, layers)
    if width != 1.0 or stem == "cifar":
        channels = [max(8, int(round(base * width))) for base in (64, 128, 256, 512)]
        # Rebuild with torchvision's own layer builder so parameter names stay identical.
        model.inplanes = channels[0]
        if stem == "cifar":
            model.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        else:
            model.conv1 = nn.Conv2d(3, channels[0], kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(channels[0])
        model.layer1 = model._make_layer(block, channels[0], layers[0])
        model.layer2 = model._make_layer(block, channels[1], layers[1], stride=2)
        model.layer3 = model._make_layer(block, channels[2], layers[2], stride=2)
        model.layer4 = model._make_layer(block, channels[3], layers[3], stride=2)
        _init_like_torchvision(model)
    feature_dim = model.fc.in_features if width == 1.0 and stem == "imagenet" else model.inplanes
    model.fc = nn.Identity()
    return model, feature_dim


def _init_like_torchvision(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _resnet_builder(name: str) -> BackboneBuilder:
    def build(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
        return build_resnet(name, stem=model_config.stem, width=model_config.width)

    build.__doc__ = f"torchvision's {name} (model.stem, model.width)."
    return build


for _name, (_, _, _depth) in _RESNETS.items():
    register_backbone(_name, BackboneTraits(stage_strides=resnet_stage_strides,
                                            torchvision_resnet_depth=_depth, timm_name=_name,
                                            torchvision_name=_name))(
        _resnet_builder(_name))


def validate_backbone(model_config) -> None:
    """A clear error for a name the registry does not hold."""

    if model_config.backbone not in _BACKBONES:
        hint = did_you_mean(model_config.backbone, _BACKBONES)
        raise ConfigError(f"'model.backbone' must be one of {', '.join(_BACKBONES)}; got "
                          f"{model_config.backbone!r}.{hint}")
    check = _BACKBONES[model_config.backbone][1].check
    if check is not None:
        check(model_config)


def build_backbone(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for a :class:`mixmask.config.ModelConfig` and the input
    size (``data.image_size``; a ViT's patch grid depends on it), from the registry."""
    validate_backbone(model_config)
    return _BACKBONES[model_config.backbone][0](model_config, image_size=image_size)
