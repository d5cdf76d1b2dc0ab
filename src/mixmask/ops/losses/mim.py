"""Losses of masked image modeling as pure functions of tensors: MAE's per-patch MSE
(He et al., arXiv 2111.06377; PixMIM reuses it) and A2MIM's spatial and frequency losses
(Li et al., arXiv 2205.13943, sec. 4; reference: Westlake-AI/openmixup
``openmixup/models/heads/mim_head.py: A2MIMHead``, ``models/losses/focal_loss.py:
FocalFrequencyLoss``, ``models/losses/regression_loss.py: focal_l1_loss``).

MAE / PixMIM (``mask`` [B, L], 1 = masked patch; ``patchify`` is MAE's, in
:mod:`mixmask.models.vit`)::

    target = norm_pix_target(patchify(ideal_lowpass(images, radius), patch_size))
    loss = masked_mse_per_patch(decoder_patches, target, mask)

A2MIM (``mask_pixels`` [B, 1, H, W], 1 = masked pixel; ``upsample_mask`` from
:mod:`mixmask.ops.mixing` turns a block mask into one)::

    spatial = masked_l1(prediction, images, mask_pixels)                # ViT
    spatial = masked_focal_l1(prediction, images, mask_pixels)          # ResNet / ConvNeXt
    loss = spatial + 0.1 * a2mim_frequency_loss(prediction, images, mask_pixels)

Every loss returns a 0-dim float32 tensor; the inputs may be half precision (autocast),
the arithmetic and FFTs run in float32 with autocast off.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mixmask.ops.tensors import autocast_off

__all__ = [
    "a2mim_frequency_loss",
    "fft_composite",
    "focal_frequency_loss",
    "focal_l1",
    "masked_focal_l1",
    "masked_l1",
    "masked_mse_per_patch",
    "masked_pixel_mean",
    "norm_pix_target",
]


# -- MAE / PixMIM ------------------------------------------------------------------------


def norm_pix_target(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's per-patch normalised target (``norm_pix_loss=True``, which PixMIM's configs
    keep): ``(x - mean) / sqrt(var + eps)`` over each patch's values (last dim).

    ``var`` is the unbiased estimate, as MAE's ``target.var(dim=-1, keepdim=True)`` and
    mmselfsup's ``MAEPretrainHead`` compute it (torch's default correction of 1).
    Float32, autocast off."""
    with autocast_off(patches.device):
        values = patches.float()
        mean = values.mean(dim=-1, keepdim=True)
        var = values.var(dim=-1, keepdim=True)
        return (values - mean) / (var + eps).sqrt()


def masked_mse_per_patch(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss (``models_mae.py: forward_loss``; mmselfsup ``MAEReconstructionLoss``):
    the squared error averaged over each patch's values, then averaged over the masked
    patches only: ``sum_l m_l mean_d (p - t)^2 / sum_l m_l``.

    prediction, target: ``[B, L, D]``; mask: ``[B, L]``, 1 (or True) = masked. No epsilon
    in the denominator, as in MAE: a mask without masked patches gives NaN."""
    if prediction.shape != target.shape or prediction.dim() != 3:
        raise ValueError(f"prediction and target must share a [B, L, D] shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}.")
    if mask.shape != prediction.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(prediction.shape[:2])}, got "
                         f"{tuple(mask.shape)}.")
    with autocast_off(prediction.device):
        per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)
        weight = mask.float()
        return (per_patch * weight).sum() / weight.sum()


# -- A2MIM spatial loss --------------------------------------------------------------------


def focal_l1(prediction: Tensor, target: Tensor, *, alpha: float = 0.2, gamma: float = 1.0,
             activate: Literal["sigmoid", "tanh"] = "sigmoid") -> Tensor:
    """Element-wise focal L1 (openmixup ``regression_loss.py: focal_l1_loss``, after Yang et
    al., arXiv 2102.09554): ``|e| * (2 sigmoid(alpha |e|) - 1)^gamma`` or, with
    ``activate="tanh"``, ``|e| * tanh(alpha |e|)^gamma``, e = prediction - target.

    The defaults are A2MIM's ResNet config (``_base_/models/a2mim/r50.py``: sigmoid,
    alpha 0.2, gamma 1, no residual L1): since ``2 sigmoid(a) - 1 = tanh(a / 2)`` that is
    ``|e| tanh(0.1 |e|)``, quadratic for small errors and L1-like for large ones.
    Returns float32 in the inputs' shape."""
    with autocast_off(prediction.device):
        error = (prediction.float() - target.float()).abs()
        if activate == "sigmoid":
            modulation = 2.0 * torch.sigmoid(alpha * error) - 1.0
        elif activate == "tanh":
            modulation = torch.tanh(alpha * error)
        else:
            raise ValueError(f"activate must be 'sigmoid' or 'tanh', got {activate!r}.")
        return error * modulation.pow(gamma)


def masked_pixel_mean(values: Tensor, mask_pixels: Tensor, eps: float = 1e-5) -> Tensor:
    """The mean of ``values`` ``[B, C, H, W]`` over masked pixels and all channels:
    ``sum(values * m) / (sum(m) + eps) / C`` with m ``[B, 1, H, W]`` (or ``[B, H, W]``),
    A2MIM's spatial reduction (``A2MIMHead.forward`` with ``unmask_weight=0``; its
    ``eps = 1e-5`` keeps a mask without masked pixels finite)."""
    weight = _pixel_mask(mask_pixels, values)
    with autocast_off(values.device):
        total = (values.float() * weight).sum()
        return total / (weight.sum() + eps) / values.shape[1]


def masked_l1(prediction: Tensor, target: Tensor, mask_pixels: Tensor) -> Tensor:
    """A2MIM's (and SimMIM's) ViT spatial loss: L1 averaged over the masked pixel values
    (:func:`masked_pixel_mean`); visible pixels do not count."""
    with autocast_off(prediction.device):
        error = (prediction.float() - target.float()).abs()
    return masked_pixel_mean(error, mask_pixels)


def masked_focal_l1(prediction: Tensor, target: Tensor, mask_pixels: Tensor, *,
                    alpha: float = 0.2, gamma: float = 1.0,
                    activate: Literal["sigmoid", "tanh"] = "sigmoid") -> Tensor:
    """A2MIM's CNN spatial loss: :func:`focal_l1` averaged over the masked pixel values."""
    values = focal_l1(prediction, target, alpha=alpha, gamma=gamma, activate=activate)
    return masked_pixel_mean(values, mask_pixels)


# -- A2MIM frequency loss ------------------------------------------------------------------


def focal_frequency_loss(prediction: Tensor, target: Tensor, *, alpha: float = 1.0,
                         ave_spectrum: bool = True, log_matrix: bool = True,
                         batch_matrix: bool = True) -> Tensor:
    """Focal frequency loss (Jiang et al., ICCV 2021, arXiv 2012.12821, eq. 2-5) as
    openmixup's ``FocalFrequencyLoss`` computes it; the defaults are A2MIM's
    (``A2MIMHead`` with ``fft_focal=True``).

    With ``F = fft2(x, norm="ortho")`` per channel of ``[B, C, H, W]`` inputs::

        F_p, F_t = mean_b F(prediction), mean_b F(target)     # ave_spectrum
        d = |F_p - F_t|^2                                     # per (c, u, v)
        w = |F_p - F_t|^alpha;  w = log(1 + w)                # log_matrix
        w = clamp(w / max(w), 0, 1), NaN -> 0, detached       # batch_matrix: global max
        loss = mean_{c,u,v}(w * d)

    ``ave_spectrum`` compares the spectra of the batch-mean images (the transform is
    linear), a much weaker signal than per-image spectra; it is what produced A2MIM's
    weights, so it is the default. ``batch_matrix=False`` normalises ``w`` by its maximum
    per image and channel instead (the FFL paper's default; the reference indexes that max
    with the original repo's extra patch axis, ``[:, :, :, None, None]``, which fails on
    4-d inputs, so it is written here for the shape we have). The weight carries no
    gradient. Float32 FFTs with autocast off; returns a 0-dim float32 tensor.
    """
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise ValueError(f"prediction and target must share a [B, C, H, W] shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}.")
    with autocast_off(prediction.device):
        spectrum_pred = torch.fft.fft2(prediction.float(), norm="ortho")
        spectrum_target = torch.fft.fft2(target.float(), norm="ortho")
        if ave_spectrum:
            spectrum_pred = spectrum_pred.mean(dim=0, keepdim=True)
            spectrum_target = spectrum_target.mean(dim=0, keepdim=True)
        difference = spectrum_pred - spectrum_target
        distance = difference.real.pow(2) + difference.imag.pow(2)
        with torch.no_grad():
            weight = distance.sqrt().pow(alpha)
            if log_matrix:
                weight = torch.log1p(weight)
            if batch_matrix:
                weight = weight / weight.max()
            else:
                weight = weight / weight.amax(dim=(-2, -1), keepdim=True)
            # 0 / 0 where the spectra agree everywhere (reference: matrix[isnan] = 0).
            weight = torch.where(torch.isnan(weight), 0.0, weight).clamp(0.0, 1.0)
        return (weight * distance).mean()


def fft_composite(prediction: Tensor, target: Tensor, mask_pixels: Tensor,
                  unmask_weight: float = 0.0) -> Tensor:
    """The image A2MIM's frequency loss compares with the target (``A2MIMHead.forward``,
    ``fft_unmask_replace="mixed"``, the setting of every A2MIM model config)::

        w = m + unmask_weight * (1 - m)
        composite = w * prediction + (1 - w) * (sg(prediction) + target) / 2

    Masked pixels take the prediction; visible ones mostly the mean of the detached
    prediction and the target, so their gradient is scaled by ``unmask_weight`` (0 for
    ViT, 1e-3 for ResNet: ``fft_unmask_weight`` in ``_base_/models/a2mim/*.py``).
    mask_pixels: ``[B, 1, H, W]`` or ``[B, H, W]``, 1 = masked."""
    if not 0.0 <= unmask_weight <= 1.0:
        raise ValueError(f"unmask_weight must lie in [0, 1], got {unmask_weight}.")
    weight = _pixel_mask(mask_pixels, prediction)
    weight = weight + (1.0 - weight) * unmask_weight
    with autocast_off(prediction.device):
        prediction, target = prediction.float(), target.float()
        replacement = 0.5 * prediction.detach() + 0.5 * target
        return prediction * weight + replacement * (1.0 - weight)


def a2mim_frequency_loss(prediction: Tensor, target: Tensor, mask_pixels: Tensor, *,
                         unmask_weight: float = 0.0) -> Tensor:
    """A2MIM's L_freq (arXiv 2205.13943, sec. 4, as coded in ``A2MIMHead.forward``):
    :func:`focal_frequency_loss` (alpha 1, batch-averaged spectrum, log weight, global
    max) of :func:`fft_composite` against the target. The paper weighs it by 0.1 (ViT)
    or 0.5 (ResNet) against the spatial loss (``fft_weight``)."""
    composite = fft_composite(prediction, target, mask_pixels, unmask_weight)
    return focal_frequency_loss(composite, target)


def _pixel_mask(mask_pixels: Tensor, images: Tensor) -> Tensor:
    """``mask_pixels`` as float32 ``[B, 1, H, W]`` matching ``images`` ``[B, C, H, W]``."""
    if mask_pixels.dim() == 3:
        mask_pixels = mask_pixels.unsqueeze(1)
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(mask_pixels.shape) != expected:
        raise ValueError(f"mask_pixels must have shape {expected} (or without the channel "
                         f"axis), got {tuple(mask_pixels.shape)}; upsample a block mask "
                         f"with mixmask.ops.grid_masks.upsample_mask.")
    return mask_pixels.float()


