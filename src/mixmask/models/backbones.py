"""The backbone registry (``model.backbone``) and its ResNets.

A name maps to a builder ``(model_config) -> (module, feature_dim)`` whose module returns
pooled features [B, D]; :func:`register_backbone` adds one (timm ViTs next) without any
change to the engine or the methods.

ResNets: torchvision's ResNet with a CIFAR stem option and a width multiplier.

The modules are torchvision ``ResNet`` instances (same parameter names), so a width-1.0
ImageNet-stem backbone loads into ``torchvision.models.resnet50()`` with strict=True once
the classifier is added back (``fc`` is replaced by an identity here).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet as tv_resnet

BackboneBuilder = Callable[..., tuple[nn.Module, int]]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str):
    """Decorator: register ``builder(model_config, image_size) -> (module, feature_dim)``
    as ``model.backbone: <name>``."""

    def register(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES and _BACKBONES[name] is not builder:
            raise ValueError(f"Backbone {name!r} is already registered.")
        _BACKBONES[name] = builder
        return builder

    return register


def backbone_names() -> tuple[str, ...]:
    return tuple(_BACKBONES)

_RESNETS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}


def build_resnet(name: str, *, stem: str = "cifar", width: float = 1.0) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``; ``backbone(x)`` gives pooled features [B, D].

    stem="cifar": 3x3 stride-1 conv, no max-pool (the small-image ResNet of the MoCo/Un-Mix
    CIFAR scripts), so a 32 px input ends on a 4x4 map. stem="imagenet": torchvision's.
    width scales every stage's channels (64, 128, 256, 512) for CPU-sized runs.
    """
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(_RESNETS)}")
    block, layers = _RESNETS[name]
    model = tv_resnet.ResNet(block, layers)
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


for _name in _RESNETS:
    register_backbone(_name)(_resnet_builder(_name))


def validate_backbone(model_config) -> None:
    """A clear error for a name the registry does not hold."""
    from mixmask.errors import ConfigError, did_you_mean

    if model_config.backbone not in _BACKBONES:
        hint = did_you_mean(model_config.backbone, _BACKBONES)
        raise ConfigError(f"'model.backbone' must be one of {', '.join(_BACKBONES)}; got "
                          f"{model_config.backbone!r}.{hint}")


def build_backbone(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)`` for a :class:`mixmask.config.ModelConfig` and the input
    size (``data.image_size``; a ViT's patch grid depends on it), from the registry."""
    validate_backbone(model_config)
    return _BACKBONES[model_config.backbone](model_config, image_size=image_size)
