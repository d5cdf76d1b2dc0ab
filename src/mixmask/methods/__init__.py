"""Methods: each module registers its class and config under its ``method.name``.

:func:`build_method` builds the registered class of a config's ``method.name``; a method
defined elsewhere (a user's file, a test) registers itself with
:func:`~mixmask.methods.registry.register_method` and is built the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from mixmask.methods.protocol import MaskedViews, Method, PixelStats, StepOutput
from mixmask.methods.registry import method_class, method_names, register_method
from mixmask.methods.siamese.base import SiameseMethod

# Two families: the Siamese bases (with the masking axis) and masked image modelling. The
# Siamese bases register first, in this order (the order of method_names()); then every
# other module of each family, so a new method file registers itself with no edit here.
BUILTIN_METHODS = ("mocov2", "byol", "simsiam", "barlow_twins", "vicreg")
_SHARED_MODULES = {"base", "masking_axis", "targets"}


def _register_family(family: str, first: tuple[str, ...] = ()) -> None:
    package = importlib.import_module(f"mixmask.methods.{family}")
    rest = sorted(info.name for info in pkgutil.iter_modules(package.__path__)
                  if info.name not in _SHARED_MODULES and info.name not in first)
    for name in (*first, *rest):
        importlib.import_module(f"mixmask.methods.{family}.{name}")


_register_family("siamese", BUILTIN_METHODS)
_register_family("mim")


def build_method(config, pixel_stats: PixelStats | None = None) -> Method:
    """The method of ``config.method.name``, with its backbone (``model.*``)."""
    return method_class(config.method.name)(config, pixel_stats)


__all__ = ["BUILTIN_METHODS", "MaskedViews", "Method", "PixelStats", "SiameseMethod",
           "StepOutput", "build_method", "method_class", "method_names", "register_method"]
