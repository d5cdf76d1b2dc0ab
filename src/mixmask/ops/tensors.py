"""Small tensor helpers every op shares: autocast switched off, per-channel statistics as
a broadcastable tensor, and one finiteness check over many tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: under AMP a matmul runs in half precision even on float32
    inputs, and losses (logits over a small temperature, squared errors of normalised
    pixels) and filters (FFTs) need float32. A no-op where autocast does not exist."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def mixed_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of ``train.precision`` (resolved: ``32``, ``bf16``, ``16``) on ``device``,
    as Fabric's mixed-precision plugins enter it for a training step; for code that runs
    outside Fabric (feature extraction). A no-op for ``32`` or where autocast does not
    exist."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def channel_values(values: Sequence[float] | Tensor, channels: int, device: torch.device,
                   name: str) -> Tensor:
    """``values`` (one per channel: a mean, a std) as a float32 ``[1, C, 1, 1]`` tensor on
    ``device``; a ValueError naming ``name`` when the count is not ``channels``."""
    stats = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if stats.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got "
                         f"{stats.numel()}.")
    return stats.view(1, channels, 1, 1)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool on the tensors' device: no NaN or infinity in any of them (one fused
    max-abs reduction per tensor, no host read)."""
    floats = [tensor for tensor in tensors if tensor.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_norm(floats, float("inf"))).isfinite().all()
