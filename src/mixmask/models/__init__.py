from mixmask.models.backbones import (
    backbone_names,
    build_backbone,
    build_resnet,
    register_backbone,
)
from mixmask.models.heads import MLPHead

__all__ = ["MLPHead", "backbone_names", "build_backbone", "build_resnet", "register_backbone"]
