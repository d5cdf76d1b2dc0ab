"""The training step, once: used by the engine, by ``benchmarks/train_step.py`` and by
anything else that trains a :class:`~mixmask.methods.protocol.Method` (finetuning).

Views on the device -> the method's loss (under the caller's autocast; a Fabric-wrapped
module brings its own) -> backward -> optimizer step -> gradients freed -> the method's
after-step hook (EMA, queue). Nothing here reads a value back to the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixmask.data.batch import Batch
from mixmask.methods.protocol import StepOutput


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr`` times its ``lr_scale`` (mixmask.optim's groups: e.g. a
    mask token at 0.1x, layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def training_step(method: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                  generator: torch.Generator, progress: float, *,
                  backward: Callable[[Tensor], None] | None = None,
                  autocast: contextlib.AbstractContextManager | None = None,
                  channels_last: bool = False) -> StepOutput:
    """One optimisation step of ``method`` on ``batch``; returns the method's output.

    backward: how to backpropagate the loss (the engine passes ``fabric.backward``;
        default ``loss.backward()``).
    autocast: a context for the forward and loss (e.g. ``torch.autocast(...)``), for
        callers without Fabric.
    """
    if channels_last:
        batch = batch.channels_last()
    with autocast if autocast is not None else contextlib.nullcontext():
        output = method(batch, generator, progress)
    if backward is None:
        output.loss.backward()
    else:
        backward(output.loss)
    optimizer.step()
    # Gradients freed after the step, not before the next: no memory held between steps
    # (the parameters' size again).
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(output, progress)
    return output
