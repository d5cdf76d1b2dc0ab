"""Reading checkpoints without trusting them.

A checkpoint is a file users are handed (a model zoo, a colleague's run folder), so it is
read as data, never as code: ``torch.load(..., weights_only=True)``, whose unpickler builds
only tensors, numbers, strings and containers and refuses every other Python global
(PyTorch's default since 2.6, for this reason). What it returns is then checked against
the shape mixmask writes (which keys, of which kinds) before anything uses it, so a
malformed file is one sentence, not a traceback from deep inside ``load_state_dict`` or
the first optimizer step.

Everything mixmask writes loads this way: tensors, numbers, strings, lists, tuples and
dicts only (random-number states are uint8 tensors; versions are plain strings).
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.torch_version import TorchVersion

from mixmask.errors import CheckpointError, ConfigError, UntrustedCheckpointError
from mixmask.ops.tensors import all_finite

# The one global the safe loader is allowed beyond its defaults: checkpoints written before
# this check stored ``torch.__version__`` as it is, a TorchVersion (a ``str`` subclass with
# comparison methods only; unpickling it builds a string and runs nothing). New checkpoints
# store a plain ``str``.
ALLOWED_GLOBALS: tuple[type, ...] = (TorchVersion,)

TRUST_HINT = ("mixmask reads checkpoints as data only, because unpickling other objects can "
              "run code (the docs' Design page, section 'What mixmask trusts')")


def read_checkpoint(path: Path, *, required: tuple[str, ...] = ("method",),
                    other: str = "point resume= at another checkpoint, or delete it to "
                                 "start over",
                    what: str = "mixmask checkpoint") -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with the safe unpickler and checked: every key of
    ``required`` present and every known key of the kind mixmask writes. ``other`` says how
    to choose another file (``pass another one with --checkpoint PATH``). Anything else is
    a :class:`CheckpointError` of one sentence; nothing in the file is executed."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UntrustedCheckpointError(
                f"checkpoint {path} carries Python objects that are not plain data "
                f"({', '.join(unsafe[:3])}) and was not loaded: {TRUST_HINT}; {other}."
            ) from None
        raise CheckpointError(_corrupt(path, error, what, other)) from None
    except Exception as error:  # noqa: BLE001 - any other failure to read means corrupt
        raise CheckpointError(_corrupt(path, error, what, other)) from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a {what} (it holds a {type(content).__name__}, "
                              f"not a mapping); {other}.")
    missing = [key for key in required if key not in content]
    if missing:
        raise CheckpointError(f"{path} is not a {what} (no {', '.join(map(repr, missing))}); "
                              f"{other}.")
    for key, value in content.items():
        check = _FIELDS.get(key)
        problem = check(value) if check is not None else None
        if problem:
            raise CheckpointError(f"checkpoint {path} is malformed: {key!r} should be "
                                  f"{problem}; {other}.")
    return content


def _corrupt(path: Path, error: BaseException, what: str, other: str) -> str:
    return (f"checkpoint {path} is corrupt or not a {what} ({type(error).__name__}); "
            f"{other}.")


def _unsafe_globals(path: Path) -> list[str]:
    """The globals the file's pickle names beyond the allowed ones, read without running
    them (``get_unsafe_globals_in_checkpoint`` scans opcodes); [] when it cannot tell."""
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in ALLOWED_GLOBALS}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - an unreadable pickle: reported as corrupt
        return []
    return [name for name in names if name not in allowed]


# --------------------------------------------------------------------------- the kinds


def _integer(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"an integer >= 0, not {_kind(value)}"


def _seconds(value: Any) -> str | None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)
    return None if ok else f"a finite number of seconds >= 0, not {_kind(value)}"


def _state_dict(value: Any) -> str | None:
    """Parameter and buffer names to tensors (``*._extra_state`` entries hold what a module's
    ``get_extra_state`` returns; its ``set_extra_state`` checks them when loading)."""
    if not isinstance(value, Mapping):
        return f"a state dict (names to tensors), not {_kind(value)}"
    for name, tensor in value.items():
        if not isinstance(name, str):
            return f"a state dict (names to tensors), with a key {_kind(name)}"
        if not name.endswith("_extra_state") and not torch.is_tensor(tensor):
            return f"a state dict (names to tensors), with {name!r} {_kind(tensor)}"
    return None


def _random_state(value: Any) -> str | None:
    ok = torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() == 1
    return None if ok else f"a random-number state (a 1-D uint8 tensor), not {_kind(value)}"


def _optimizer_state(value: Any) -> str | None:
    if not (isinstance(value, Mapping) and isinstance(value.get("state"), Mapping)
            and isinstance(value.get("param_groups"), list)):
        return "an optimizer state (a mapping with 'state' and 'param_groups')"
    for group in value["param_groups"]:
        if not (isinstance(group, Mapping) and isinstance(group.get("params"), list)
                and all(_integer(index) is None for index in group["params"])):
            return "an optimizer state whose param_groups each list integer 'params'"
    for index, entry in value["state"].items():
        if _integer(index) is not None or not isinstance(entry, Mapping):
            return "an optimizer state whose 'state' maps parameter indices to mappings"
        for item in entry.values():
            if not (torch.is_tensor(item) or _number(item)):
                return f"an optimizer state of tensors and numbers, with {_kind(item)}"
    return None


def _rank_states(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"a list of per-process states, not {_kind(value)}"
    for rank_state in value:
        if not (isinstance(rank_state, Mapping) and _random_state(rank_state.get("generator"))
                is None and isinstance(rank_state.get("modules"), Mapping)):
            return "a list of per-process states ({'generator': tensor, 'modules': {...}})"
        if not all(isinstance(name, str) for name in rank_state["modules"]):
            return "a list of per-process states whose modules are named by strings"
    return None


def _mapping_of(kind: str, accept: Callable[[Any], bool]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, Mapping) and all(
            isinstance(key, str) and accept(item) for key, item in value.items())
        return None if ok else f"a mapping of {kind}, not {_kind(value)}"
    return check


def _history(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(row, Mapping) and _integer(row.get("epoch")) is None
        and _number(row.get("top1")) and _number(row.get("top5")) for row in value)
    return None if ok else "a list of {'epoch', 'top1', 'top5'} rows"


def _loss_curve(value: Any) -> str | None:
    ok = isinstance(value, list) and all(
        isinstance(row, list) and len(row) == 2 and _integer(row[0]) is None
        and _number(row[1]) for row in value)
    return None if ok else "a list of [iteration, loss] pairs"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# What mixmask writes, by key (pretraining: train.trainer.Trainer.save_checkpoint; finetuning:
# eval.finetune). A key not listed here is ignored.
_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "method": _state_dict, "probe": _state_dict, "classifier": _state_dict,
    "optimizer": _optimizer_state, "probe_optimizer": _optimizer_state,
    "epoch": _integer, "step": _integer, "skipped_steps": _integer,
    "generator": _random_state, "rank_states": _rank_states,
    "config": _mapping_of("config sections", lambda item: True),
    "settings": _mapping_of("settings", lambda item: True),
    "versions": _mapping_of("version strings", lambda item: isinstance(item, str)),
    "wall_time_s": _seconds, "history": _history,
    # mixmask detect / segment (mixmask.eval.dense_training)
    "model": _state_dict, "iteration": _integer, "losses": _loss_curve,
}


# --------------------------------------------------------------------------- applying


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state_dict holding NaN or infinity."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point()
            and not bool(all_finite([value]))]


def load_state(module: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """``module.load_state_dict(state)`` (strict), with an error that names the first
    missing and unexpected keys and shape mismatches instead of torch's long report."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
              for key, value in expected.items()
              if key in state and torch.is_tensor(value) and torch.is_tensor(state[key])
              and state[key].shape != value.shape]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (checkpoint vs this model)", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{what}: {', '.join(items[:3])}{more}")
    if problems:
        hint = ("; was it saved with another method, backbone or head size?")
        if missing and all(key.endswith("_extra_state") for key in missing):
            hint = ("; it predates BEiT block masks drawn on the host: continue it with "
                    "method.mask.generator=exact_count")
        raise CheckpointError(f"checkpoint {path} does not fit this model "
                              f"({'; '.join(problems)}){hint}.")
    try:
        module.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - a foreign value in a checked structure
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{_first_line(error)}.") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
                         path: Path, what: str = "optimizer") -> None:
    """``optimizer.load_state_dict(saved)`` once ``saved`` is known to fit: as many groups
    and parameters, each hyperparameter of the kind the live optimizer holds, and every
    per-parameter tensor of its parameter's shape (or a scalar, like Adam's step). Torch
    checks only the counts, so anything else would fail later, inside the first step."""
    live = optimizer.state_dict()
    problem = _optimizer_misfit(saved, live, optimizer.param_groups)
    if problem is None:
        try:
            optimizer.load_state_dict(saved)
        except Exception as error:  # noqa: BLE001 - a foreign value in a checked structure
            problem = _first_line(error)
    if problem is not None:
        raise CheckpointError(f"the {what} state of checkpoint {path} does not fit this run: "
                              f"{problem}.")


def _optimizer_misfit(saved: Mapping[str, Any], live: Mapping[str, Any],
                      live_groups: list[dict]) -> str | None:
    saved_groups, live_group_states = saved["param_groups"], live["param_groups"]
    if len(saved_groups) != len(live_group_states):
        return (f"{len(saved_groups)} parameter groups saved, {len(live_group_states)} "
                "here")
    shapes: dict[int, torch.Size] = {}
    for saved_group, live_group, params in zip(saved_groups, live_group_states, live_groups,
                                               strict=True):
        if len(saved_group["params"]) != len(live_group["params"]):
            return "a parameter group of another size"
        for key, value in saved_group.items():
            if key != "params" and key in live_group and not _same_kind(value, live_group[key]):
                return f"its {key!r} is {_kind(value)}, not {_kind(live_group[key])}"
        shapes.update({index: param.shape
                       for index, param in zip(saved_group["params"], params["params"],
                                               strict=True)})
    for index, entry in saved["state"].items():
        if index not in shapes:
            return f"state for parameter {index}, which no group holds"
        for name, item in entry.items():
            if not torch.is_tensor(item) and name != "step":  # Adam's step may be a float
                return f"{name!r} of parameter {index} is {_kind(item)}, not a tensor"
            if torch.is_tensor(item) and item.numel() != 1 and item.shape != shapes[index]:
                return (f"{name!r} of parameter {index} has shape {tuple(item.shape)}, the "
                        f"parameter {tuple(shapes[index])}")
    return None


def _same_kind(saved: Any, live: Any) -> bool:
    if isinstance(live, bool) or live is None:
        return isinstance(saved, bool) or saved is None
    if isinstance(live, (int, float)):
        return _number(saved) and not isinstance(saved, bool)
    if isinstance(live, (list, tuple)):
        return (isinstance(saved, (list, tuple)) and len(saved) == len(live)
                and all(_same_kind(a, b) for a, b in zip(saved, live, strict=True)))
    if torch.is_tensor(live):
        return torch.is_tensor(saved) and saved.numel() == live.numel()
    return isinstance(saved, type(live))


def set_random_state(generator: torch.Generator, state: torch.Tensor, path: Path) -> None:
    """``generator.set_state(state)``, with one sentence where the saved state does not fit
    (a CUDA generator's state is 16 bytes, a CPU one's 5,056: a run saved on one device
    type and resumed on another)."""
    try:
        generator.set_state(state.to("cpu"))
    except Exception:  # noqa: BLE001 - torch says only "RNG state is wrong size"
        raise CheckpointError(
            f"the random-number state in checkpoint {path} ({state.numel()} bytes) does not "
            f"fit this run's {generator.device.type} generator: it was saved on another "
            "device type (CPU vs GPU). Resume it on the device type it was trained on, or "
            "start a new out_dir.") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__


# --------------------------------------------------------------------------- writing


def check_same_settings(saved: Mapping[str, Any], settings: Mapping[str, Any], folder: Path,
                        what: str) -> None:
    """A resumed evaluation (finetune, detect, segment) continues only with the settings it
    started with; otherwise one sentence naming up to three that differ."""
    differing = sorted(key for key in set(saved) | set(settings)
                       if saved.get(key) != settings.get(key))
    if differing:
        shown = ", ".join(f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now"
                          for key in differing[:3])
        raise ConfigError(f"{folder} holds a {what} with other settings ({shown}); delete "
                          f"that folder to run the {what} afresh with these.")


def save_on_rank_zero(content: dict[str, Any], path: Path, *, is_global_zero: bool,
                      where: str) -> None:
    """An evaluation's resumable state (finetune, detect, segment), written atomically by
    the first process; a full disk or unwritable folder is one sentence naming ``where``
    (``step 12``, ``iteration 300``) and how to continue."""
    if not is_global_zero:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_atomically(content, path)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"cannot save {path} at {where} ({error}); free some space and "
                              "run the same command again to continue.") from None


def save_atomically(content: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path.partial``, then a rename over ``path``: a killed save never
    leaves a truncated file at ``path``; on an error the partial file is removed and the
    error raised."""
    partial = path.with_suffix(".partial")
    try:
        torch.save(content, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_checkpoint(content: dict[str, Any], path: Path, *, step: int, kept: str) -> None:
    """Save ``content`` at ``path`` atomically: written to ``.partial``, then renamed over
    ``path``, so a killed save never leaves a truncated checkpoint. A full disk is one
    :class:`CheckpointError` that says how much room the save needs and what is ``kept``
    (the last good checkpoint); the partial file is removed either way."""
    try:
        save_atomically(content, path)
    except (OSError, RuntimeError) as error:
        needed = tensor_bytes(content)
        if not _disk_full(error, path.parent, needed):
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(
            f"no space left on the disk of {path.parent} to save {path.name} at step "
            f"{step}: it needs about {needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are "
            f"free. Free some space, then continue with resume=auto; {kept}.") from None


def _disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    # torch.save reports a full disk as OSError(ENOSPC) or as one of its writer's
    # RuntimeErrors ("iostream error", "unexpected pos"): judged by the free space left.
    return (getattr(error, "errno", None) == errno.ENOSPC
            or shutil.disk_usage(folder).free < needed)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (its size on disk, roughly)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0
