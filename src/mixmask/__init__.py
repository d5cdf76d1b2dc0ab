"""mixmask: self-supervised pretraining of vision backbones (MixMask and friends)."""

__version__ = "0.1.0"
