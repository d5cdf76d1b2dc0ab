"""PixMIM's low-frequency reconstruction target (Liu et al., arXiv 2303.02416, sec. 3;
reference: open-mmlab/mmselfsup ``mmselfsup/models/target_generators/low_freq_generator.py``)
as pure tensor functions.

PixMIM is MAE with the pixel target replaced by an ideal circular low-pass of the image:

    >>> radius = lowpass_radius(32)                       # 40 * 32 / 224, about 5.71
    >>> target = ideal_lowpass(images, radius)            # "clean", normalised space
    >>> target = ideal_lowpass(images, radius, mode="faithful", mean=mean, std=std)

Two modes (:func:`ideal_lowpass`):

* ``"faithful"``: the reference's path, step by step: de-normalise, ``fftshift(fft2(x))``
  per channel, keep the frequencies within ``radius`` of index ``((h-1)/2, (w-1)/2)`` of
  the shifted spectrum, ``ifft2`` without the inverse shift, ``abs``, re-normalise. For
  even sizes the circle's centre is half a bin off the DC index ``h/2``, so the mask is not
  conjugate-symmetric and ``abs`` hides the imaginary part; the missing ``ifftshift``
  only multiplies the result by a unit-modulus phase, which ``abs`` removes.
* ``"clean"``: the circle centred on DC (radius in ``fftfreq`` indices), the real part of
  the inverse FFT. The filter is linear and keeps DC, so filtering normalised images
  equals normalising filtered ones and no de/re-normalisation is needed.

The two agree closely at 224 px and differ a lot at 32 px (the half-bin offset is a large
share of a radius of 5.7 bins): ``tests/test_frequency.py`` measures and prints the gap.
The FFTs run in float32 with autocast off (cuFFT in half precision handles only
power-of-two sizes); results come back in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mixmask.ops.tensors import autocast_off, channel_values

__all__ = ["ideal_lowpass", "lowpass_mask", "lowpass_radius"]

# PixMIM's radius at 224 px (configs/selfsup/pixmim/*.py: LowFreqTargetGenerator(radius=40,
# img_size=224)).
_REFERENCE_RADIUS, _REFERENCE_SIZE = 40.0, 224

LowpassMode = Literal["faithful", "clean"]


def lowpass_radius(image_size: int) -> float:
    """PixMIM's filter radius scaled to the image: ``40 * S / 224`` frequency bins (40 at
    224, the reference's value; about 5.71 at 32 and 11.43 at 64), so the filter keeps the
    same share of the band (spatial periods of about 5.6 px and longer) at every size."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    return _REFERENCE_RADIUS * image_size / _REFERENCE_SIZE


def lowpass_mask(height: int, width: int, radius: float, mode: LowpassMode = "clean", *,
                 device: torch.device | str | None = None) -> Tensor:
    """The ideal circular low-pass mask, float32 ``[height, width]`` of 0/1.

    ``"clean"``: in the unshifted layout of ``fft2``; 1 where ``ky^2 + kx^2 <= r^2`` with
    ``ky, kx`` the signed integer frequencies (``fftfreq(n) * n``), so the circle is
    centred on DC and conjugate-symmetric. ``"faithful"``: in the ``fftshift``-ed layout,
    1 where ``(i - (h-1)/2)^2 + (j - (w-1)/2)^2 <= r^2`` (the reference's
    ``_generate_low_pass_filter``, vectorised instead of its Python loop over pixels).
    """
    _check_radius(radius)
    if mode == "clean":
        rows = torch.fft.fftfreq(height, d=1.0 / height, device=device)
        cols = torch.fft.fftfreq(width, d=1.0 / width, device=device)
    elif mode == "faithful":
        rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
        cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    else:
        raise ValueError(f"mode must be 'faithful' or 'clean', got {mode!r}.")
    distance_sq = rows.view(-1, 1) ** 2 + cols.view(1, -1) ** 2
    return (distance_sq <= radius**2).float()


def ideal_lowpass(
    images: Tensor,
    radius: float,
    mode: LowpassMode = "clean",
    *,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Images ``[B, C, H, W]`` (normalised) with every frequency beyond ``radius`` bins
    removed: PixMIM's reconstruction target (arXiv 2303.02416, sec. 3), normalised like
    the input, in the input's dtype (computed in float32 with autocast off).

    radius: in frequency-index units (``lowpass_radius(S)`` for PixMIM's 40 at 224);
        ``math.inf`` keeps everything.
    mode: ``"faithful"`` (the reference's ``LowFreqTargetGenerator.forward``) or
        ``"clean"``; see the module docstring.
    mean, std: per-channel normalisation of ``images``, needed by ``"faithful"`` only,
        which filters de-normalised pixels (the reference hard-codes ImageNet's; pass your
        dataset's, as notes 4.7 advise). ``"clean"`` ignores them.

    A radius at or beyond the spectrum's corner keeps every frequency: ``"clean"`` then
    returns a copy of the input without running an FFT (the r = inf ablation, plain MAE);
    ``"faithful"`` still runs the reference path, which returns the input wherever the
    de-normalised pixels are non-negative (``abs`` flips the others).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}.")
    _check_radius(radius)
    height, width = images.shape[-2:]
    if mode == "clean":
        if radius >= math.hypot(height // 2, width // 2):
            # |fftfreq| peaks at n // 2: the mask is all ones, the filter the identity.
            return images.clone()
        with autocast_off(images.device):
            pixels = images.float()
            keep = lowpass_mask(height, width, radius, "clean", device=images.device)
            filtered = torch.fft.ifft2(torch.fft.fft2(pixels) * keep).real
            return filtered.to(images.dtype)
    if mode != "faithful":
        raise ValueError(f"mode must be 'faithful' or 'clean', got {mode!r}.")
    if mean is None or std is None:
        raise ValueError("mode='faithful' filters de-normalised pixels: pass the images' "
                         "per-channel mean and std.")
    channels = images.shape[1]
    with autocast_off(images.device):
        mean_t = channel_values(mean, channels, images.device, "mean")
        std_t = channel_values(std, channels, images.device, "std")
        pixels = images.float() * std_t + mean_t
        spectrum = torch.fft.fftshift(torch.fft.fft2(pixels), dim=(-2, -1))
        keep = lowpass_mask(height, width, radius, "faithful", device=images.device)
        # No ifftshift, then abs: the reference's order (low_freq_generator.py, forward).
        filtered = torch.fft.ifft2(spectrum * keep).abs()
        return ((filtered - mean_t) / std_t).to(images.dtype)


def _check_radius(radius: float) -> None:
    if not radius >= 0:  # also refuses NaN
        raise ValueError(f"radius must be 0 or more (frequency bins), got {radius}.")


