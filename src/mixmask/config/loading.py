"""Reading configs: recipes by name or path, YAML with ``base:`` inheritance,
``section.key=value`` overrides, typed building (every key checked), and saving."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from mixmask.config.schema import Config, build_section
from mixmask.config.validation import validate
from mixmask.errors import ConfigError, did_you_mean
from mixmask.methods.registry import method_class, method_names

# The recipes shipped with the package (a checkout's configs/ is a link to this folder).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
# Folders of RECIPES_DIR that hold no mixmask config (detectron2's, SLURM's).
_NOT_MIXMASK = ("transfer/detectron2", "cluster")


def recipe_names() -> list[str]:
    """Every YAML the package ships, by name: its path under RECIPES_DIR without ``.yaml``
    (``quickstart``, ``cifar10/mixmask_mocov2_r18``, ``eval/knn``, ``masking/none``)."""
    names = (path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
             for path in RECIPES_DIR.rglob("*.yaml"))
    return sorted(name for name in names if not name.startswith(_NOT_MIXMASK))


def resolve_recipe(given: str | Path, *, protocol: bool = False) -> Path:
    """A config file: ``given`` when it is a file (a path wins), else the shipped recipe of
    that name (``quickstart``, ``cifar10/mae_vit_tiny``; ``configs/...yaml`` as the docs
    write it works from any folder; a protocol file also by its bare name, ``knn``)."""
    path = Path(given).expanduser()
    if path.is_file():
        return path
    name = str(given).replace("\\", "/").removesuffix(".yaml").removeprefix("configs/")
    names = recipe_names()  # only these: a name cannot reach outside the folder
    for candidate in [name, *([f"eval/{name}", f"transfer/{name}"] if protocol else [])]:
        if candidate in names:
            return RECIPES_DIR / f"{candidate}.yaml"
    what = "protocol file" if protocol else "config"
    # Closest by full name, else by the file name alone (the folder left out).
    hint = did_you_mean(name, names, cutoff=0.5)
    if not hint:
        by_file = {item.split("/")[-1]: item for item in reversed(names)}
        close = difflib.get_close_matches(name.split("/")[-1], list(by_file), n=1, cutoff=0.5)
        hint = f" Did you mean '{by_file[close[0]]}'?" if close else ""
    raise ConfigError(f"{what} {given} is neither a file nor a recipe name.{hint} "
                      "`mixmask recipes` lists the recipes.")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A config file's mapping with its ``base:`` files merged in (no defaults, no checks)."""
    return _read_yaml(Path(path))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                layers: list[str | Path] | tuple[str | Path, ...] = ()) -> Config:
    """Read a YAML config (a file, or a shipped recipe by name; the defaults when ``path``
    is None), merge the ``layers`` files over it in order (an evaluation protocol's
    settings over a run's config), then apply overrides."""
    path = resolve_recipe(path) if path is not None else None
    layers = [resolve_recipe(layer, protocol=True) for layer in layers]
    raw = _read_yaml(path) if path is not None else {}
    for layer in layers:
        _deep_merge(raw, _read_yaml(layer))
    for override in overrides:
        _apply_override(raw, override)
    overridden = {override.split("=", 1)[0].strip() for override in overrides}
    ignored = _drop_inherited_axis_keys(raw, overridden)
    config = build_section(Config, raw, prefix="")
    config.method.ignored_keys = ignored
    validate(config)
    # Where the config came from (not a config key): pretraining writes it to
    # RUN/recipe.yaml, so `mixmask report` can mark the keys the command line changed.
    # Absolute, so a report made from another folder still finds the recipe.
    config.provenance = {"recipe": None if path is None else str(Path(path).resolve()),
                         "layers": [str(Path(layer).resolve()) for layer in layers],
                         "overrides": list(overrides)}
    return config


def _drop_inherited_axis_keys(raw: dict[str, Any], overridden: set[str]) -> list[str]:
    """Switching ``method.name`` on the command line to a method without the masking axis
    drops the axis keys the config file set (they belonged to the file's method); axis
    keys given on the command line stay, and are an error. Returns the dropped keys."""
    method = raw.get("method")
    if "method.name" not in overridden or not isinstance(method, dict):
        return []

    name = method.get("name")
    if not isinstance(name, str) or name not in method_names():
        return []  # the parser says what is wrong with it
    if getattr(method_class(name), "axis_config_class", None) is not None:
        return []
    axis_keys = {f.name for other in method_names()
                 for axis in [getattr(method_class(other), "axis_config_class", None)] if axis
                 for f in dataclasses.fields(axis)}
    dropped = [key for key in list(method) if key in axis_keys and not any(
        given == f"method.{key}" or given.startswith(f"method.{key}.") for given in overridden)]
    for key in dropped:
        del method[key]
    return [f"method.{key}" for key in dropped]


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one clause: what is wrong and where (PyYAML's message spans lines).
    Python tags (``!!python/object/apply:...``) land here: safe_load builds plain data only."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}".rstrip(".")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {yaml_problem(error)}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}.")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(item, str) for item in bases):
        raise ConfigError(f"config {path}: 'base' must be a file name or a list of them.")
    merged: dict[str, Any] = {}
    for base in bases:  # later files override earlier ones; this file overrides them all
        _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path.resolve())))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value.")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{key}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
