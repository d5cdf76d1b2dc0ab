"""The run folder: what `mixmask pretrain` writes and every other command reads.

::

    RUN/config.yaml        the resolved config (and recipe.yaml: the recipe it came from)
    RUN/checkpoints/       last.ckpt, epoch=N.ckpt (mixmask.runs.checkpoint)
    RUN/metrics.csv        one row per logged step or epoch (mixmask.train.metrics_log)
    RUN/summary.json       the run's end: evaluations, throughput, versions, device
    RUN/eval/<name>.json   one per evaluation protocol (mixmask.eval.protocols)
    RUN/plots/, RUN/report.html   pictures (mixmask.pictures)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from mixmask.config import Config, load_config, save_config
from mixmask.data.splits import EvalData, load_eval_data
from mixmask.errors import CheckpointError, ConfigError, MixmaskError
from mixmask.methods import PixelStats, build_method
from mixmask.runs.checkpoint import load_state, nonfinite_tensors, read_checkpoint


def check_out_dir(out_dir: Path) -> None:
    """A clear error, before any work, for an out_dir that is a file or cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder; choose another out_dir.")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir} lies under {existing}, which is a file, not a "
                          "folder; choose another out_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir} cannot be written ({existing} is read-only or "
                          "not yours); choose another out_dir.")


def start_run_folder(config: Config, out_dir: Path) -> None:
    """Create ``out_dir/checkpoints`` and write config.yaml (and recipe.yaml, where the
    config came from a recipe); a folder that cannot be written is one sentence."""
    checkpoint_dir = out_dir / "checkpoints"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # A save killed by a full disk leaves its .partial file; it would keep the disk full.
        for partial in checkpoint_dir.glob("*.partial"):
            partial.unlink()
        save_config(config, out_dir / "config.yaml")
        provenance = getattr(config, "provenance", None)
        if provenance is not None:
            (out_dir / "recipe.yaml").write_text(yaml.safe_dump(provenance, sort_keys=False))
    except OSError as error:
        raise ConfigError(f"cannot write the run folder {out_dir}: {error.strerror or error}; "
                          "choose another out_dir.") from None


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """``RUN/summary.json``."""
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


def load_run_config(run: Path, overrides: list[str], protocol_file: str | None = None
                    ) -> Config:
    if not (run / "config.yaml").is_file():
        raise MixmaskError(f"{run} is not a run folder (no config.yaml); pass the out_dir of "
                           "`mixmask pretrain`.")
    layers = [protocol_file] if protocol_file else []
    return load_config(run / "config.yaml", overrides, layers=layers)


def load_run_checkpoint(run: Path, checkpoint: str | None) -> tuple[Path, dict[str, Any]]:
    path = Path(checkpoint) if checkpoint else run / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; has the run saved one yet?")
    content = read_checkpoint(path, other="pass another one with --checkpoint PATH")
    bad = nonfinite_tensors(content["method"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({len(bad)} tensors, "
                              f"e.g. {bad[0]}): it comes from a diverged run; evaluate an "
                              "earlier one with --checkpoint PATH.")
    return path, content


def build_run_method(config: Config, pixel_stats, checkpoint_path: Path | None,
                     checkpoint: dict[str, Any] | None):
    """The run's method, with the checkpoint's weights, or (no checkpoint) the random init
    of ``train.seed``: the init pretraining started from (the engine seeds the same way)."""
    torch.manual_seed(config.train.seed)
    method = build_method(config, pixel_stats)
    if checkpoint is not None:
        load_state(method, checkpoint["method"], checkpoint_path)
    return method


def evaluation_sets(config: Config) -> EvalData:
    """The labelled train and test splits the evaluations use; one sentence when the
    config has none."""
    eval_data, reason = load_eval_data(config)
    if eval_data is None:
        raise MixmaskError(f"cannot evaluate: {reason}.")
    return eval_data


def write_result(run: Path, name: str, result: dict[str, Any]) -> Path:
    """``RUN/eval/<name>.json``, written atomically."""
    folder = run / "eval"
    path = folder / f"{name}.json"
    partial = path.with_suffix(".partial")
    try:
        folder.mkdir(exist_ok=True)
        partial.write_text(json.dumps(result, indent=2))
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise MixmaskError(f"cannot write {path}: {error.strerror or error}.") from None
    return path


def pretrained_method(config: Config, eval_data: EvalData, checkpoint_path: Path | None,
                      checkpoint: dict[str, Any] | None, device: torch.device):
    """The run's method on ``device``, normalised with the pixel statistics of the
    evaluation's training split, with the checkpoint's weights (or the random init)."""
    train_set = eval_data.train.image_set
    method = build_run_method(config, PixelStats(tuple(train_set.mean), tuple(train_set.std)),
                              checkpoint_path, checkpoint)
    return method.to(device)


# --------------------------------------------------------------------------- reading runs


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders (holding config.yaml) among ``paths``; a folder that is not a run but
    holds runs (``runs/``) stands for those below it."""
    runs: list[Path] = []
    for given in paths:
        path = Path(given)
        if (path / "config.yaml").is_file():
            runs.append(path)
        elif path.is_dir():
            below = sorted(config.parent for config in path.rglob("config.yaml"))
            if not below:
                raise MixmaskError(f"{path} holds no run folder (no config.yaml below it).")
            runs.extend(below)
        else:
            raise MixmaskError(f"{path} is not a run folder.")
    return runs


def read_mapping(path: Path, parse: Callable[[str], Any]) -> tuple[dict | None, str]:
    """The mapping a JSON or YAML file holds (``parse``: json.loads, yaml.safe_load), or
    None and why not, as a clause."""
    try:
        value = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:  # JSONDecodeError: a ValueError
        return None, f"{path.name} is not readable ({error})"
    if not isinstance(value, dict):
        return None, f"{path.name} does not hold a mapping"
    return value, ""


def protocol_results(run: Path, problems: list[str] | None = None
                     ) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, result)`` for each ``RUN/eval/*.json`` that holds a protocol result, in
    file-name order. A file that cannot be read is left out and named in ``problems`` (one
    sentence each), so one bad file never hides the others."""
    results = []
    for path in sorted((run / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            if problems is not None:
                problems.append(f"{path} is not a readable result ({error}); left out.")
            continue
        if isinstance(result, dict) and "protocol" in result:
            results.append((path, result))
    return results
