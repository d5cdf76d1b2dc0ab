"""``mixmask export RUN --format safetensors``, and what every export format checks first.

safetensors (Hugging Face's format) holds a header of tensor names, dtypes and shapes, plus
string metadata, then the raw tensor bytes: reading it runs no code, unlike a pickle
(``torch.load`` of an untrusted file), which is why it is offered for weights that are
shared. Any registered backbone exports to it, under our own names, unchanged.

The file's metadata says what it holds, so :func:`load_safetensors_backbone` rebuilds
the backbone from the file alone (strings only, as safetensors requires; "" for a missing
value): ``mixmask_format_version``, ``architecture`` (``model.backbone``), ``stem``,
``width``, ``patch_size`` (a token model's token stride in pixels, else ``model.patch_size``),
``image_size`` (the input size a token model was built for; "" where unknown),
``global_pool`` and ``mixmask_version``. ``mixmask export`` also writes the same fields as
JSON beside the file (``r18.safetensors`` -> ``r18.json``)::

    backbone, description = load_safetensors_backbone("r18.safetensors")   # strict
    state = safetensors.torch.load_file("r18.safetensors")                   # without mixmask

Shared with :mod:`mixmask.runs.export` (which writes the files): :class:`ExportError`, the
check of the weights against our builder, and the input size a token model was built for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from mixmask import __version__
from mixmask.config import ModelConfig
from mixmask.errors import MixmaskError
from mixmask.models.backbones import backbone_names, backbone_traits, build_backbone

FORMAT_VERSION = 1

# The description's fields and their types, in the order written.
DESCRIPTION_FIELDS: dict[str, type] = {
    "mixmask_format_version": int, "architecture": str, "stem": str, "width": float,
    "patch_size": int, "image_size": int, "global_pool": str, "mixmask_version": str}


class ExportError(MixmaskError):
    """A backbone that the asked-for format cannot hold, an output that cannot be written,
    or an exported file that cannot be read back."""


# -- shared by every format ------------------------------------------------------------------
def check_matches_builder(backbone_state: dict[str, Tensor], model_config: Any,
                          image_size: int | None = None) -> nn.Module:
    """The weights must be exactly those of our builder for the run's model.* (and, for a
    token model, its input size): the key set and every shape, so a wrong model.* section
    fails here, not in the user's load. Returns the reference backbone (on the meta device:
    structure only, no memory)."""
    name, stem = model_config.backbone, model_config.stem
    with torch.device("meta"):
        reference, _ = build_backbone(model_config, image_size)
    not_tensors = [key for key, value in backbone_state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ExportError(f"the backbone state holds non-tensors ({not_tensors[0]!r}); pass "
                          "backbone_state(method).")
    problem = state_mismatch(backbone_state, reference)
    if problem:
        raise ExportError(f"the weights are not a {name} with model.stem={stem}: {problem}; "
                          "check the run's model.* settings.")
    return reference


def state_mismatch(state: dict[str, Tensor], module: nn.Module) -> str:
    """What keeps ``state`` from loading strictly into ``module`` (a phrase), or ""."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        return (f"{len(missing)} tensors missing, {len(unexpected)} unexpected "
                f"(e.g. {example!r})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            return f"{key} has shape {tuple(state[key].shape)}, expected {shape}"
    return ""


def resolve_image_size(backbone_state: dict[str, Tensor], model_config: Any,
                       image_size: int | None = None) -> int | None:
    """The input size the backbone was built for: ``image_size`` if given, else the
    config's (where it has one), else, for timm's ViT layout, the one its position
    embeddings fit (patch grid side x the patch embedding's kernel). None: not known
    (a ConvNet, whose weights fit any size, or a token model without that layout)."""
    if image_size:
        return int(image_size)
    if getattr(model_config, "image_size", None):
        return int(model_config.image_size)
    position, patch = backbone_state.get("pos_embed"), backbone_state.get("patch_embed.proj.weight")
    if position is None or patch is None or position.dim() != 3:
        return None
    tokens = position.shape[1] - (1 if "cls_token" in backbone_state else 0)
    side = math.isqrt(tokens)
    return side * patch.shape[-1] if side * side == tokens else None


# -- safetensors -----------------------------------------------------------------------------
def describe_backbone(model_config: Any, image_size: int | None) -> dict[str, Any]:
    """The description fields (:data:`DESCRIPTION_FIELDS`) of a backbone built from
    ``model_config`` for ``image_size``."""
    name = model_config.backbone
    patch_size = int(getattr(model_config, "patch_size", 0) or 0)
    traits = backbone_traits(name)
    if traits.token_stride is not None and image_size:
        patch_size = int(traits.token_stride(model_config, image_size))
    return {"mixmask_format_version": FORMAT_VERSION, "architecture": name,
            "stem": str(model_config.stem), "width": float(model_config.width),
            "patch_size": patch_size, "image_size": image_size,
            "global_pool": str(getattr(model_config, "global_pool", "token")),
            "mixmask_version": __version__}


def safetensors_bytes(backbone_state: dict[str, Tensor], model_config: Any,
                      image_size: int | None = None) -> tuple[bytes, dict[str, Any], int]:
    """``(the file's bytes, its description, how many tensors)`` for the backbone's own
    state (contiguous CPU tensors, names and values unchanged)."""
    size = resolve_image_size(backbone_state, model_config, image_size)
    check_matches_builder(backbone_state, model_config, size)
    description = describe_backbone(model_config, size)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in backbone_state.items()}
    metadata = {key: "" if value is None else str(value) for key, value in description.items()}
    try:
        data = save(state, metadata=metadata)
    except (RuntimeError, ValueError, SafetensorError) as error:  # e.g. tensors sharing memory
        raise ExportError(f"safetensors cannot hold this backbone's state ({error}).") from None
    return data, description, len(state)


def read_safetensors_description(path: str | Path) -> dict[str, Any]:
    """The description a ``mixmask export --format safetensors`` file carries, typed as in
    :data:`DESCRIPTION_FIELDS` (``image_size`` None where not recorded)."""
    path = Path(path)
    metadata = _read(path, lambda: _metadata(path))
    if not metadata or "mixmask_format_version" not in metadata:
        raise ExportError(f"{path} has no mixmask metadata (mixmask_format_version), so it "
                          "does not say which backbone it holds; export the run with "
                          "`mixmask export RUN --format safetensors`.")
    description = {}
    for key, kind in DESCRIPTION_FIELDS.items():
        text = metadata.get(key)
        try:
            description[key] = None if text == "" and key == "image_size" else kind(text)
        except (TypeError, ValueError):
            raise ExportError(f"{path}'s metadata has no valid {key} ({text!r}); export the "
                              "run again with `mixmask export RUN --format safetensors`."
                              ) from None
    if description["mixmask_format_version"] > FORMAT_VERSION:
        raise ExportError(f"{path} was written by a newer mixmask (format version "
                          f"{description['mixmask_format_version']}; this one reads up to "
                          f"{FORMAT_VERSION}); update mixmask to read it.")
    return description


def load_safetensors_backbone(path: str | Path, *, image_size: int | None = None
                              ) -> tuple[nn.Module, dict[str, Any]]:
    """``(backbone, description)`` from a ``--format safetensors`` file: the backbone is
    rebuilt from the file's metadata with :func:`build_backbone` (for ``image_size`` if
    given, else the recorded one) and its tensors are loaded strictly. The module is as
    built (training mode); call ``.eval()`` for features."""
    path = Path(path)
    description = read_safetensors_description(path)
    name = description["architecture"]
    if name not in backbone_names():
        raise ExportError(f"{path} holds a {name!r} backbone, which this mixmask does not "
                          f"register (it has {', '.join(backbone_names())}); import the "
                          "module that registers it first.")
    config = ModelConfig(backbone=name, stem=description["stem"], width=description["width"],
                         patch_size=description["patch_size"],
                         global_pool=description["global_pool"])
    backbone, _ = build_backbone(config, image_size or description["image_size"])
    state = _read(path, lambda: load_file(path))
    problem = state_mismatch(state, backbone)
    if problem:
        raise ExportError(f"{path}'s tensors do not fit the {name} its metadata describes: "
                          f"{problem}.")
    backbone.load_state_dict(state, strict=True)
    return backbone, description


def _metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _read(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with a missing or unreadable file as one sentence."""
    try:
        return read()
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist.") from None
    except OSError as error:
        raise ExportError(f"could not read {path}: {error.strerror or error}.") from None
    except SafetensorError as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{path} is not a readable safetensors file ({detail}); export the "
                          "run again with `mixmask export RUN --format safetensors`.") from None
