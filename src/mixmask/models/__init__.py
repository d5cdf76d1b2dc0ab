from mixmask.models.backbones import (
    backbone_names,
    build_backbone,
    build_resnet,
    register_backbone,
)
from mixmask.models.heads import MLPHead

# Registers vit_tiny / vit_small / vit_base (timm is imported only when one is built).
from mixmask.models.vit import ViTBackbone, build_vit

__all__ = ["MLPHead", "ViTBackbone", "backbone_names", "build_backbone", "build_resnet",
           "build_vit", "register_backbone"]
