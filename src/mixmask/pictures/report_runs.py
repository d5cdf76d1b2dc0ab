"""What the report reads of a run folder (:class:`RunRecord`): its resolved config, the
recipe it was launched with (which keys differ), summary.json and the evaluations of
``RUN/eval/*.json``; whatever is missing or unreadable becomes a note on the page."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixmask.config import load_config
from mixmask.errors import MixmaskError
from mixmask.eval.results import result_row_list
from mixmask.runs.folder import protocol_results, read_mapping

__all__ = ["RunRecord", "changed_keys", "disambiguate_labels", "flatten", "load_run"]


@dataclass
class RunRecord:
    """One run folder as the report shows it, with a note for each part it lacks."""

    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    summary_note: str = ""
    changed: set[str] = field(default_factory=set)
    recipe_values: dict[str, Any] = field(default_factory=dict)
    recipe_note: str = ""
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    evaluation_note: str = ""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``);
    an empty dict is kept as a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Keys a run settles from "auto" at its start and records settled (train.precision:
# mixmask.train.fabric.settle_precision): the machine's choice, not a change of the recipe.
SETTLED_FROM_AUTO = frozenset({"train.precision"})


def changed_keys(config: dict[str, Any], recipe: dict[str, Any]) -> set[str]:
    """Dotted keys of ``config`` whose value differs from (or is absent in) ``recipe``; a
    key of :data:`SETTLED_FROM_AUTO` the recipe leaves at ``auto`` does not count."""
    recipe_flat = flatten(recipe)
    return {key for key, value in flatten(config).items()
            if key not in recipe_flat or (recipe_flat[key] != value and not (
                key in SETTLED_FROM_AUTO and recipe_flat[key] == "auto"))}


def load_run(path: Path) -> RunRecord:
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise MixmaskError(f"{path} is not a run folder (no config.yaml); pass the out_dir of "
                           "`mixmask pretrain`.")
    config = _read_yaml_mapping(config_path)
    run = RunRecord(path=path, label=path.name or str(path), config=config, summary=None)
    _load_summary(run)
    _compare_with_recipe(run)

    problems: list[str] = []
    run.evaluations = [{**row, "file": result_file.name}
                       for result_file, result in protocol_results(path, problems)
                       for row in result_row_list(path, result)]
    if problems:
        run.evaluation_note = " ".join(problems)
    return run


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    raw, problem = read_mapping(path, yaml.safe_load)
    if raw is None:
        raise MixmaskError(f"{path.parent} is not a run folder: {problem}.")
    return raw


def _load_summary(run: RunRecord) -> None:
    summary_path = run.path / "summary.json"
    if not summary_path.is_file():
        run.summary_note = "No summary.json: the run has not finished (or was stopped)."
        return
    summary, problem = read_mapping(summary_path, json.loads)
    if summary is None:
        run.summary_note = f"{problem}."
        return
    run.summary = summary


def _compare_with_recipe(run: RunRecord) -> None:
    """Mark the config keys that differ from the recipe (the YAML file and layers the run
    was launched with, without its command-line overrides): what the command line changed.
    Without a loadable recipe, the keys the overrides name are marked."""

    recipe_path = run.path / "recipe.yaml"
    if not recipe_path.is_file():
        run.recipe_note = ("No recipe.yaml (a run from before mixmask recorded it): "
                           "nothing is highlighted.")
        return
    provenance, problem = read_mapping(recipe_path, lambda text: yaml.safe_load(text) or {})
    if provenance is None:
        run.recipe_note = f"{problem}: nothing is highlighted."
        return
    recipe = provenance.get("recipe")
    layers = [str(layer) for layer in provenance.get("layers") or []]
    overrides = [str(override) for override in provenance.get("overrides") or []]
    named = " + ".join([str(recipe) if recipe else "the defaults", *layers])
    try:
        recipe_config = load_config(recipe, layers=layers).to_dict()
    except MixmaskError as error:
        run.changed = _keys_named_by(overrides, flatten(run.config))
        run.recipe_note = (f"The recipe {named} cannot be loaded here ({error}); highlighted "
                           "are the keys named by the command-line overrides.")
        return
    run.changed = changed_keys(run.config, recipe_config)
    recipe_flat = flatten(recipe_config)
    run.recipe_values = {key: recipe_flat.get(key, "(absent)") for key in run.changed}
    run.recipe_note = (f"Highlighted: the keys that differ from the recipe {named} as it "
                       f"reads now ({len(run.changed)} of {len(flatten(run.config))}). "
                       f"Overrides given: {' '.join(overrides) if overrides else 'none'}.")


def _keys_named_by(overrides: list[str], config_flat: dict[str, Any]) -> set[str]:
    named = {override.split("=", 1)[0].strip() for override in overrides}
    return {key for key in config_flat
            if any(key == name or key.startswith(name + ".") for name in named)}


def disambiguate_labels(runs: list[RunRecord]) -> None:
    """Folder names, or the full paths where two runs share a name."""
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = str(run.path)


# --------------------------------------------------------------------------- formatting
