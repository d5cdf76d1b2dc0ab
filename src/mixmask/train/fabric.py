"""Where training runs: the accelerator, Lightning Fabric (devices, precision, DDP) shared
by pretraining and finetuning, torch.compile, and the versions and device a run reports."""

from __future__ import annotations

import os
import platform

import torch
from lightning.fabric import Fabric
from torch import nn

from mixmask import __version__
from mixmask.config import Config
from mixmask.errors import ConfigError

PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def resolve_accelerator(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu.")
    return device


def native_bf16(accelerator: str) -> str | None:
    """Why this device computes bf16 natively (a few words), or None where it does not.

    CPU: torch's own CPU-feature queries (``torch.cpu._is_avx512_bf16_supported`` and
    ``_is_amx_tile_supported``, what torch's oneDNN and inductor kernels dispatch on); a
    torch without them counts as no. Without those instructions oneDNN emulates bf16 by
    converting to fp32 and back, slower than fp32 itself. GPU: ``torch.cuda.
    is_bf16_supported(including_emulation=False)`` (Ampere and later)."""
    if accelerator == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
        return "this GPU computes bf16 natively" if supported else None
    if accelerator != "cpu":
        return None
    found = [name for name, query in (("AMX", "_is_amx_tile_supported"),
                                      ("AVX-512 BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, query, lambda: False)()]
    return f"this CPU computes bf16 natively ({' and '.join(found)})" if found else None


def resolve_precision(requested: str, accelerator: str) -> tuple[str, str]:
    """(``train.precision`` to run with, one sentence saying why). ``auto`` is bf16 mixed
    precision where :func:`native_bf16` says so, else fp32: never fp16, whose overflow
    needs a GradScaler and care that a default should not ask for. An explicit value is
    kept as given."""
    if requested != "auto":
        return requested, f"train.precision={requested} as configured"
    why = native_bf16(accelerator)
    if why is not None:
        return "bf16", f"bf16 mixed precision (train.precision=auto: {why})"
    return "32", (f"fp32 (train.precision=auto: this {accelerator.upper()} has no native "
                  "bf16 arithmetic)")


def settle_precision(config: Config, accelerator: str) -> str:
    """Replace ``train.precision=auto`` in ``config`` by this machine's choice, so that
    config.yaml, summaries and result settings record what ran; returns the sentence of
    :func:`resolve_precision` (commands print it once)."""
    config.train.precision, sentence = resolve_precision(config.train.precision, accelerator)
    return sentence


def build_fabric(config: Config, accelerator: str) -> Fabric:
    """The Fabric of pretraining and finetuning: devices, precision, DDP (one place, so a
    test can hand the engine another precision plugin, e.g. fp16 with a GradScaler on the
    CPU). ``train.precision=auto`` is settled here (:func:`settle_precision`)."""
    settle_precision(config, accelerator)
    return Fabric(accelerator=accelerator, devices=config.train.devices,
                  num_nodes=config.train.num_nodes,
                  precision=PRECISIONS[config.train.precision],
                  strategy="ddp" if config.train.processes > 1 else "auto")


def grad_scaler(fabric: Fabric):
    """The GradScaler of fp16 mixed precision, or None: under it a step's gradients are
    scaled, and their overflow is the scaler's to handle (it skips that update and lowers
    the scale)."""
    return getattr(getattr(fabric, "_precision", None), "scaler", None)


def compile_networks(method: nn.Module, config: Config) -> None:
    """torch.compile each network of the method (backbone, heads, EMA copies) in place, so
    parameter names and checkpoints stay as without compilation. Masks, mixes and losses
    stay eager: they are a few cheap elementwise ops with data-dependent shapes."""
    import torch._dynamo

    backend = config.train.compile_backend
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"train.compile_backend={backend!r} is not a torch.compile backend; "
                          f"use one of: {', '.join(sorted(known))}.")
    options = {"backend": backend}
    if backend == "inductor":
        options["mode"] = config.train.compile_mode
    for network in method.children():
        if any(True for _ in network.parameters()):  # not parameter-free helpers
            network.compile(**options)


def versions() -> dict[str, str]:
    import lightning
    import torchvision

    return {"mixmask": __version__, "python": platform.python_version(),
            # str(): torch's version is a TorchVersion, which the safe loader refuses.
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "lightning": str(lightning.__version__)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def printer(fabric: Fabric, console):
    def say(message: str) -> None:
        if fabric.is_global_zero:
            (console.print if console is not None else print)(message)
    return say
