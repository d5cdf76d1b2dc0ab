"""Methods: each module registers its class and config under its ``method.name``.

:func:`build_method` builds the registered class of a config's ``method.name``; a method
defined elsewhere (a user's file, a test) registers itself with
:func:`~mixmask.methods.registry.register_method` and is built the same way.
"""

from __future__ import annotations

import importlib

from mixmask.methods.base import SiameseMethod
from mixmask.methods.protocol import Method, PixelStats, StepOutput
from mixmask.methods.registry import method_class, method_names, register_method

# The built-in methods, registered in this order (the order of method_names()).
BUILTIN_METHODS = ("mocov2", "byol", "simsiam", "barlow_twins", "vicreg")
for _module in BUILTIN_METHODS:
    importlib.import_module(f"mixmask.methods.{_module}")


def build_method(config, pixel_stats: PixelStats | None = None) -> Method:
    """The method of ``config.method.name``, with its backbone (``model.*``)."""
    return method_class(config.method.name)(config, pixel_stats)


__all__ = ["BUILTIN_METHODS", "Method", "PixelStats", "SiameseMethod", "StepOutput", "build_method",
           "method_class", "method_names", "register_method"]
