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


def build_fabric(config: Config, accelerator: str) -> Fabric:
    """The Fabric of pretraining and finetuning: devices, precision, DDP (one place, so a
    test can hand the engine another precision plugin, e.g. fp16 with a GradScaler on the
    CPU)."""
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
