"""The recipes shipped with the package: ``mixmask recipes`` lists them, ``mixmask
recipes NAME --copy DIR`` writes one out to edit, and every command that takes a config
takes a recipe's name (:func:`mixmask.config.resolve_recipe`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mixmask.config import RECIPES_DIR, load_config, read_recipe, recipe_names, resolve_recipe
from mixmask.errors import MixmaskError, writing

# The folders of pretraining recipes (the others hold protocol files and fragments).
PRETRAINING = ("", "cifar10", "cifar100", "imagenet")


def pretraining_recipes() -> list[dict[str, str]]:
    """Name, method, backbone, dataset and the first line of its header comment for each
    pretraining recipe (a file of those folders whose merged content names a method: the
    shared bases, e.g. cifar100/common_r18, do not)."""
    rows = []
    for name in sorted(recipe_names(), key=lambda item: ("/" in item, item)):  # top level first
        folder = name.rpartition("/")[0]
        path = RECIPES_DIR / f"{name}.yaml"
        method = read_recipe(path).get("method")
        if folder not in PRETRAINING or not (isinstance(method, dict) and "name" in method):
            continue
        config = load_config(path)
        rows.append({"name": name, "method": config.method.name,
                     "masking": (config.method.axis.masking if config.method.axis is not None
                                 else "-"),
                     "backbone": config.model.backbone, "dataset": config.data.dataset,
                     "about": _about(path)})
    return rows


def protocol_files() -> list[dict[str, str]]:
    """The evaluation protocol files (``--config`` of knn / linear / finetune, and of
    detect / segment: ``transfer/``)."""
    return [{"name": name, "about": _about(RECIPES_DIR / f"{name}.yaml")}
            for name in recipe_names() if name.startswith(("eval/", "transfer/"))]


def _about(path: Path, limit: int = 110) -> str:
    """The first sentence of a recipe's header comment, at most ``limit`` characters."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(part for part in header if part)
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def copy_recipe(name: str, folder: str | Path) -> Path:
    """Write recipe ``name`` to ``folder/<file name>``: the file itself, or, for a recipe
    built from ``base:`` files, the merged result (so the copy stands alone). Refuses to
    overwrite a file."""
    source = resolve_recipe(name)
    target = Path(folder) / source.name
    if target.exists():
        raise MixmaskError(f"{target} exists; copy into another folder or remove it first.")
    text = source.read_text()
    if "base" in (yaml.safe_load(text) or {}):
        header = [line for line in text.splitlines() if line.startswith("#")]
        text = "\n".join([*header, f"# Merged from the recipe {name} and its base files.",
                          yaml.safe_dump(read_recipe(source), sort_keys=False)])
    with writing(target) as target:
        target.write_text(text)
    return target
