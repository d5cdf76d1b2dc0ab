"""What methods of both families share: the EMA target network (MoCo, BYOL, SiameseIM),
its momentum schedule, and a host generator kept in the state_dict (BEiT's block masks)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.ops.tensors import autocast_off


def ema_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network``: an EMA target's start (the online weights at init,
    MoCo sec. 3.2, BYOL sec. 3.1); :func:`ema_update` moves it after each step."""
    return copy.deepcopy(network).requires_grad_(False)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online for parameters (MoCo eq. 2,
    BYOL eq. 1); buffers (BN running statistics, batch counters) are copied from online.

    MoCo's and BYOL's reference code average the parameters only and leave the target's
    buffers to its own forward passes. Training cannot tell the difference: the target runs
    in train mode, so its BN normalises with batch statistics and its running statistics
    never enter the loss. We copy them so that the target is an evaluable network whose
    statistics match the network its weights follow, in one multi-tensor copy per step.
    """
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("the target and online networks differ in their parameters.")
    # Frozen online parameters (a ViT's fixed sin-cos position embedding) are equal in
    # both networks; averaging them would only add rounding drift.
    pairs = [(t, o) for t, o in zip(target_params, online_params, strict=True)
             if o.requires_grad]
    target_params, online_params = [t for t, _ in pairs], [o for _, o in pairs]
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    target_buffers, online_buffers = list(target.buffers()), list(online.buffers())
    if len(target_buffers) != len(online_buffers):
        raise ValueError("the target and online networks differ in their buffers.")
    if target_buffers:
        # One multi-tensor copy, not one kernel per BN buffer (a ResNet-18 has ~60).
        torch._foreach_copy_(target_buffers, online_buffers)


def head_in_float32(head: Callable[[Tensor], Tensor], features: Tensor) -> Tensor:
    """``head(features)`` in float32 with autocast off: under mixed precision the backbone's
    convolutions are where bf16 pays; a head's small matmuls gain little, and the rounding of
    its outputs to bf16's 8 significant bits before a temperature-scaled contrastive loss
    cost SimCLR about 4 kNN points on CIFAR-10 in our CPU comparison with lightly
    (docs/performance.md, "SimCLR and DINO against lightly's"). The Siamese heads run so."""
    with autocast_off(features.device):
        return head(features.float())


def check_unit_interval(params, section: str, *keys: str) -> None:
    """ConfigError unless each of ``keys`` of ``params`` lies in [0, 1] (EMA momenta)."""
    for key in keys:
        value = getattr(params, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"'{section}.{key}' must lie in [0, 1], got {value}.")


def cosine_momentum(start: float, end: float, progress: float) -> float:
    """BYOL's schedule (sec. 3.2): tau = end - (end - start) * (cos(pi * progress) + 1) / 2,
    from ``start`` at progress 0 to ``end`` at progress 1."""
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


class HostGenerator(nn.Module):
    """A CPU ``torch.Generator`` for masks drawn on the host (BEiT's block masks, as the
    reference draws them), kept in the method's ``state_dict`` so a resumed run draws the
    masks the uninterrupted run would have drawn.

    Seeded at its first use from the seed of the run's device generator (a host integer:
    no device read, no draw from it), which is a function of ``train.seed`` and the
    process rank, so each DDP process draws its own masks, as in the reference.
    """

    # Each DDP process has its own stream: the engine checkpoints it per process.
    per_process_state = True

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator()
        self.seeded = False

    def get(self, device_generator: torch.Generator) -> torch.Generator:
        if not self.seeded:
            # A fixed odd multiplier (an LCG's) keeps this stream apart from the device one.
            seed = (device_generator.initial_seed() * 6364136223846793005 + 1) % 2**63
            self.generator.manual_seed(seed)
            self.seeded = True
        return self.generator

    def get_extra_state(self) -> dict:
        return {"seeded": self.seeded, "state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.seeded = bool(state["seeded"])
        self.generator.set_state(state["state"])
