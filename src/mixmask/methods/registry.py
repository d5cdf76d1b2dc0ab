"""The method registry: ``method.name`` in a config maps to a class registered here.

A method registers itself, with its config dataclass, where it is defined::

    @register_method("mae")
    class MAE(Method):
        config_class = MAEConfig          # its keys: method.mae.*
        ...

so adding a method is one file plus its config, and the engine never names a method.
"""

from __future__ import annotations

from typing import Any

from mixmask.errors import ConfigError, did_you_mean

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: register ``cls`` as ``method.name: <name>``. The class must set
    ``config_class`` (a dataclass whose fields are the ``method.<name>.*`` keys)."""

    def register(cls: type) -> type:
        if not name.isidentifier():
            raise ValueError(f"A method name must be a Python identifier, got {name!r}.")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"Method {name!r} is already registered by {_METHODS[name]}.")
        if getattr(cls, "config_class", None) is None:
            raise ValueError(f"Method {name!r} must set config_class (its config dataclass).")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def import_plugin(name: str) -> None:
    """Import a module that registers methods or backbones: a dotted module name, or the
    path of a ``.py`` file (``mixmask pretrain --import my_method.py CONFIG``)."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path


    path = Path(name)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise ConfigError(f"--import {name}: no such file.")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(f"--import {name}: {error}.") from None


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_class(name: str) -> Any:
    """The class registered as ``name``; a short error naming the closest valid name."""

    if name not in _METHODS:
        hint = did_you_mean(name, _METHODS)
        raise ConfigError(f"'method.name' must be one of {', '.join(map(repr, _METHODS))}; got "
                          f"{name!r}.{hint}")
    return _METHODS[name]
