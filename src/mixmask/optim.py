"""Optimizers for pretraining: SGD (MoCo, MixMask) and LARS (BYOL, Barlow Twins, VICReg).

Usage::

    optimizer = build_optimizer("lars", method.named_parameters(), lr=0.2, momentum=0.9,
                                weight_decay=1.5e-6)

Both put every trainable parameter in the optimizer; LARS gets two parameter groups, the
second (biases and normalisation parameters) without adaptation or weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LARS", "build_optimizer", "param_groups_for_lars"]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888), in the form of
    BYOL, Barlow Twins and solo-learn: for each parameter p with gradient g::

        g     = g + weight_decay * p                                 (not for excluded)
        trust = eta * ||p|| / ||g||  if ||p|| > 0 and ||g|| > 0, else 1   (not for excluded)
        trust = min(trust / lr, 1)                                   (only with clip_lr)
        buf   = momentum * buf + trust * g
        p     = p - lr * buf

    Parameters of groups flagged ``{"lars_exclude": True}`` (biases and normalisation
    parameters, see :func:`param_groups_for_lars`) get neither weight decay nor
    adaptation: plain SGD with momentum, as in the papers. The flag is read from the group,
    never guessed from shapes here. ``exclude_bias_and_norm=False`` ignores the flag
    (every parameter adapted and decayed: an ablation).

    No value is read back to the host: the trust ratio is computed on the device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = False,
        exclude_bias_and_norm: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"LARS learning rate must be non-negative, got {lr}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}.")
        if weight_decay < 0:
            raise ValueError(f"LARS weight decay must be non-negative, got {weight_decay}.")
        if eta <= 0:
            raise ValueError(f"LARS eta (trust coefficient) must be positive, got {eta}.")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        clip_lr=clip_lr, exclude_bias_and_norm=exclude_bias_and_norm,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Multi-tensor (foreach) ops over a group: a few kernels per group, not several
        # per parameter, which matters on a GPU where a ResNet has ~60 parameter tensors.
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            updates = [param.grad for param in params]
            if not (group["lars_exclude"] and group["exclude_bias_and_norm"]):
                updates = self._adapt(params, updates, group)
            buffers = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapt(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        """Weight decay, then the layer-wise trust ratios (computed on the device)."""
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        param_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        both_positive = (param_norms > 0) & (grad_norms > 0)
        # The inner where keeps 0/0 out of the graph of values (no NaN even where unused).
        trust = torch.where(
            both_positive,
            group["eta"] * param_norms / torch.where(both_positive, grad_norms, 1.0),
            1.0,
        )
        if group["clip_lr"]:
            # solo-learn's clipping: the effective step lr * trust never exceeds lr * 1.
            trust = torch.clamp(trust / group["lr"], max=1.0)
        return torch._foreach_mul(grads, list(trust.unbind()))


def param_groups_for_lars(named_parameters: Iterable[tuple[str, Tensor]]) -> list[dict]:
    """Split trainable parameters for :class:`LARS`: weights in a first group, biases and
    normalisation parameters (ndim <= 1) in a second with ``lars_exclude: True`` and
    ``weight_decay: 0`` (BYOL sec. 3.3 / Barlow Twins' reference exclude them from both).
    Parameters without ``requires_grad`` are left out; empty groups are dropped."""
    weights, excluded = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (excluded if param.ndim <= 1 else weights).append(param)
    groups = []
    if weights:
        groups.append({"params": weights})
    if excluded:
        groups.append({"params": excluded, "lars_exclude": True, "weight_decay": 0.0})
    return groups


def build_optimizer(
    name: Literal["sgd", "lars"],
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float = 0.02,
    clip_lr: bool = False,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The pretraining optimizer over the trainable parameters.

    ``"sgd"``: torch.optim.SGD (foreach) over all of them with one weight decay (MoCo v2,
    MixMask); ``fused=True`` makes it one fused kernel for all parameters (same update, up
    to float rounding). ``"lars"``: :class:`LARS` over :func:`param_groups_for_lars` (BYOL,
    Barlow Twins, VICReg). The engine may overwrite each group's ``lr`` every step.
    """
    if name == "sgd":
        params = [param for _, param in named_parameters if param.requires_grad]
        implementation = {"fused": True} if fused else {"foreach": True}
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **implementation)
    if name == "lars":
        return LARS(param_groups_for_lars(named_parameters), lr=lr, momentum=momentum,
                    weight_decay=weight_decay, eta=eta, clip_lr=clip_lr)
    raise ValueError(f"Unknown optimizer {name!r}: use 'sgd' or 'lars'.")
