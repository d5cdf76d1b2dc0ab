"""The training step, once: used by the engine, by ``benchmarks/train_step.py`` and by
anything else that trains a :class:`~mixmask.methods.protocol.Method` (finetuning).

Views on the device -> the method's loss (under the caller's autocast; a Fabric-wrapped
module brings its own) -> backward -> [clipping] -> the method's before-step hook (the
gradients it drops) -> optimizer step -> gradients freed -> the method's after-step hook
(EMA, queue). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixmask.data.batch import Batch
from mixmask.methods.protocol import StepOutput
from mixmask.ops.tensors import all_finite


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr`` times its ``lr_scale`` (mixmask.ops.optim's groups: e.g. a
    mask token at 0.1x, layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Every decayed group's weight decay = ``weight_decay``; groups built without decay
    (biases, norms, tokens) stay at 0 (DINO sets the regularised group's only)."""
    for group in optimizer.param_groups:
        if group.setdefault("decayed", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay


def training_step(method: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                  generator: torch.Generator, progress: float, *,
                  backward: Callable[[Tensor], None] | None = None,
                  autocast: contextlib.AbstractContextManager | None = None,
                  channels_last: bool = False, skip_nonfinite: bool = False,
                  clip_gradients: Callable[[], Tensor] | None = None,
                  scaled_gradients: bool = False) -> StepOutput:
    """One optimisation step of ``method`` on ``batch``; returns the method's output.

    backward: how to backpropagate the loss (the engine passes ``fabric.backward``;
        default ``loss.backward()``).
    autocast: a context for the forward and loss (e.g. ``torch.autocast(...)``), for
        callers without Fabric.
    skip_nonfinite: when the loss or a gradient is NaN or infinite, drop the step: no
        optimizer update, no after-step hook, the buffers the forward changed (BN
        statistics) restored; ``output.skipped`` says so. Costs one host read per step.
    clip_gradients: called after the backward, before the update (the engine passes
        Fabric's ``clip_gradients`` at ``train.grad_clip``); the norm it returns is logged
        as ``grad_norm``.
    scaled_gradients: the gradients are scaled by fp16's GradScaler, which skips the
        update of a step whose gradients overflow and lowers its scale, inside
        ``optimizer.step()``; skip_nonfinite then checks the loss only, so that routine
        overflow still reaches the scaler (else the scale would never come down).
    """
    if channels_last:
        batch = batch.channels_last()
    saved_buffers = None
    if skip_nonfinite:
        buffers = list(method.buffers())
        saved_buffers = [buffer.clone() for buffer in buffers]
    with autocast if autocast is not None else contextlib.nullcontext():
        output = method(batch, generator, progress)
    if backward is None:
        output.loss.backward()
    else:
        backward(output.loss)
    if skip_nonfinite:
        finite = torch.isfinite(output.loss.detach()).all()
        if not scaled_gradients:
            gradients = [param.grad for group in optimizer.param_groups
                         for param in group["params"] if param.grad is not None]
            finite = finite & all_finite(gradients).to(output.loss.device)
        if not bool(finite):
            optimizer.zero_grad(set_to_none=True)
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)
            output.skipped = True
            return output
    if clip_gradients is not None:
        output.logs["grad_norm"] = clip_gradients().detach()
    before_step = getattr(method, "before_optimizer_step", None)
    if before_step is not None:  # a plain model (finetuning) has none
        before_step(progress)
    optimizer.step()
    # Gradients freed after the step, not before the next: no memory held between steps
    # (the parameters' size again).
    optimizer.zero_grad(set_to_none=True)
    after_step = getattr(method, "after_optimizer_step", None)
    if after_step is not None:  # a plain model (finetuning) has none
        after_step(output, progress)
    return output
