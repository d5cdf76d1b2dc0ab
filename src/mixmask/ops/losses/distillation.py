"""Self-distillation with a centred, sharpened teacher (DINO, Caron et al. 2021, arXiv
2104.14294, sec. 3.1 and Algorithm 1; iBOT, Zhou et al. 2022, arXiv 2111.07832, eq. 2-3),
as pure functions of tensors.

A student output s and a teacher output t (logits over K prototypes) of two views of the
same image give the cross-entropy H(P_t, P_s) = -sum_k P_t[k] log P_s[k] with

    P_s = softmax(s / tau_s),    P_t = softmax((t - c) / tau_t)

where c is the centre, an EMA of the teacher's mean output (``updated_center``); centring
and a low tau_t (sharpening) together avoid collapse (sec. 3.1, "Avoiding collapse")::

    probabilities = teacher_probabilities(teacher_logits, center, 0.04)
    loss = distillation_cross_entropy(student_logits, probabilities, 0.1).mean()
    center = updated_center(center, teacher_logits, momentum=0.9)

Computed in float32 with autocast off (65,536 prototypes' softmax in bf16 loses the
small probabilities that the cross-entropy sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmask.ops.distributed import all_reduce_mean, world_size
from mixmask.ops.tensors import autocast_off

__all__ = ["distillation_cross_entropy", "masked_token_mean", "teacher_probabilities",
           "teacher_temperature", "updated_center"]


def teacher_probabilities(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """softmax((t - c) / tau_t) over the last dimension, float32, without gradient (the
    teacher is never trained by the loss: DINO's ``.detach()``)."""
    if temperature <= 0:
        raise ValueError(f"the teacher temperature must be positive, got {temperature}.")
    with autocast_off(teacher_logits.device):
        centred = teacher_logits.detach().float() - center.float()
        return F.softmax(centred / temperature, dim=-1)


def distillation_cross_entropy(student_logits: Tensor, teacher_probs: Tensor,
                               temperature: float) -> Tensor:
    """H(P_t, P_s) = -sum_k P_t[k] log softmax(s / tau_s)[k] per row: [...] for logits
    [..., K] (DINO's ``DINOLoss``; iBOT's patch term per token)."""
    if temperature <= 0:
        raise ValueError(f"the student temperature must be positive, got {temperature}.")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher "
                         f"probabilities {tuple(teacher_probs.shape)} differ in shape.")
    with autocast_off(student_logits.device):
        log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return -(teacher_probs * log_probs).sum(dim=-1)


def masked_token_mean(token_losses: Tensor, mask: Tensor) -> Tensor:
    """iBOT's patch term per image (eq. 2; ``iBOTLoss``): the mean of ``token_losses``
    [B, N] over the masked tokens (``mask`` [B, N], True = masked), sum(l m) / max(sum(m),
    1), so an image without a masked token gives 0: [B]."""
    weights = mask.to(token_losses.dtype)
    return (token_losses * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)


@torch.no_grad()
def updated_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """c <- m c + (1 - m) mean(t) (DINO eq. 4): the mean over every row of
    ``teacher_logits`` [..., K] and, under DDP, over every process (the reference's
    all_reduce of the batch sum divided by the global row count)."""
    rows = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    batch_center = rows.mean(dim=0)
    if world_size() > 1:
        batch_center = all_reduce_mean(batch_center)
    return center * momentum + batch_center.to(center.dtype) * (1.0 - momentum)


def teacher_temperature(epoch: int, *, start: float, end: float, warmup_epochs: int) -> float:
    """DINO's teacher-temperature schedule (``DINOLoss.teacher_temp_schedule``): linear from
    ``start`` at epoch 0 to ``end`` at epoch ``warmup_epochs - 1`` (numpy's linspace over
    the warm-up epochs), then ``end``; constant within an epoch."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)
