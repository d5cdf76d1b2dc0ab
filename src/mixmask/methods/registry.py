"""The method registry: ``method.name`` in a config maps to a class registered here.

A method registers itself, with its config dataclass, where it is defined::

    @register_method("mae")
    class MAE(Method):
        config_class = MAEConfig          # its keys: method.mae.*
        ...

so adding a method is one file plus its config, and the engine never names a method.
"""

from __future__ import annotations

import difflib
from typing import Any

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


def _load_builtin_methods() -> None:
    # Importing the package registers the built-in methods (each module registers itself).
    import mixmask.methods  # noqa: F401


def method_names() -> tuple[str, ...]:
    _load_builtin_methods()
    return tuple(_METHODS)


def method_class(name: str) -> Any:
    """The class registered as ``name``; a short error naming the closest valid name."""
    from mixmask.errors import ConfigError

    _load_builtin_methods()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'method.name' must be one of {', '.join(map(repr, _METHODS))}; got "
                          f"{name!r}.{hint}")
    return _METHODS[name]
