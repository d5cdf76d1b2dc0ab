from mixmask.models.backbones import (
    backbone_names,
    build_backbone,
    build_resnet,
    register_backbone,
)

# Register the ConvNeXts and vit_tiny / vit_small / vit_base.
from mixmask.models.convnext import ConvNeXtBackbone, build_convnext
from mixmask.models.convvit import ConvViT, build_convvit
from mixmask.models.heads import MLPHead
from mixmask.models.vit import ViTBackbone, build_vit

__all__ = ["ConvNeXtBackbone", "ConvViT", "MLPHead", "ViTBackbone", "backbone_names",
           "build_backbone", "build_convnext", "build_convvit", "build_resnet", "build_vit",
           "register_backbone"]
