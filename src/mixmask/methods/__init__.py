"""Method registry: ``method.name`` in a config maps to a class here."""

from __future__ import annotations

from mixmask.config import Config
from mixmask.methods.barlow_twins import BarlowTwins
from mixmask.methods.base import SiameseMethod, StepOutput
from mixmask.methods.byol import BYOL
from mixmask.methods.mocov2 import MoCoV2
from mixmask.methods.simsiam import SimSiam
from mixmask.methods.vicreg import VICReg
from mixmask.models import build_backbone

METHODS: dict[str, type[SiameseMethod]] = {
    "mocov2": MoCoV2,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
}


def build_method(config: Config) -> SiameseMethod:
    backbone, feature_dim = build_backbone(config.model)
    return METHODS[config.method.name](backbone, feature_dim, config.method)


__all__ = ["METHODS", "SiameseMethod", "StepOutput", "build_method"]
