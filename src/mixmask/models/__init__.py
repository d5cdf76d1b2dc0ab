from mixmask.models.backbones import build_backbone, build_resnet
from mixmask.models.heads import MLPHead

__all__ = ["MLPHead", "build_backbone", "build_resnet"]
