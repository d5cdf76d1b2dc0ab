"""Tests for mixmask.ops.lowpass (PixMIM's low-pass target), against images whose spectra
are known by construction and a DFT written out in the test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixmask.ops.lowpass import ideal_lowpass, lowpass_mask, lowpass_radius

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def stats(channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CIFAR_MEAN[:channels]).view(1, channels, 1, 1)
    std = torch.tensor(CIFAR_STD[:channels]).view(1, channels, 1, 1)
    return mean, std


def cosine_image(size: int, ky: int, kx: int) -> torch.Tensor:
    """cos(2 pi (ky y + kx x) / size): all its energy at the frequencies +-(ky, kx)."""
    y = torch.arange(size, dtype=torch.float64).view(-1, 1)
    x = torch.arange(size, dtype=torch.float64).view(1, -1)
    return torch.cos(2 * math.pi * (ky * y + kx * x) / size)


def smooth_images(batch: int, size: int, low: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1]: uniform noise on a low x low grid, bicubic-upsampled."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, low, low, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic",
                         align_corners=False).clamp(0, 1)


def test_radius_scales_with_the_image():
    assert lowpass_radius(224) == 40.0
    assert lowpass_radius(32) == pytest.approx(5.714, abs=1e-3)
    assert lowpass_radius(64) == pytest.approx(11.43, abs=1e-2)
    assert lowpass_radius(112) == pytest.approx(20.0)


def test_clean_keeps_a_low_frequency_image():
    # A constant plus cosines at |k| = 2 and sqrt(5): inside r = 5.71 at 32 px.
    image = 0.3 + 0.5 * cosine_image(32, 2, 0) - 0.2 * cosine_image(32, 1, 2)
    images = image.float().expand(2, 3, 32, 32).clone()
    out = ideal_lowpass(images, lowpass_radius(32))
    assert out.shape == images.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_clean_removes_a_high_frequency_image():
    # 0.7 + checkerboard: the checkerboard is the Nyquist frequency (16, 16), far outside r.
    checker = cosine_image(32, 16, 16)  # (-1)^(x + y)
    assert torch.equal(checker.abs(), torch.ones_like(checker))
    images = (0.7 + 0.4 * checker).float().expand(1, 3, 32, 32).clone()
    out = ideal_lowpass(images, lowpass_radius(32))
    torch.testing.assert_close(out, torch.full_like(images, 0.7), atol=1e-5, rtol=0)
    # And a cosine just outside the circle (|k| = 6 > 5.71) goes, one inside (5) stays.
    outside = cosine_image(32, 6, 0).float().expand(1, 1, 32, 32)
    inside = cosine_image(32, 3, 4).float().expand(1, 1, 32, 32)
    torch.testing.assert_close(ideal_lowpass(outside, lowpass_radius(32)),
                               torch.zeros_like(outside), atol=1e-5, rtol=0)
    torch.testing.assert_close(ideal_lowpass(inside, lowpass_radius(32)), inside,
                               atol=1e-5, rtol=0)


def test_clean_spectrum_outside_the_radius_is_zero():
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    radius = 5.0
    spectrum = torch.fft.fft2(ideal_lowpass(images, radius).double())
    # Signed frequencies written out, not via fftfreq.
    k = torch.tensor([i if i < 12 else i - 24 for i in range(24)], dtype=torch.float64)
    outside = (k.view(-1, 1) ** 2 + k.view(1, -1) ** 2) > radius**2
    assert spectrum.abs()[..., outside].max() < 1e-4
    assert spectrum.abs()[..., ~outside].max() > 1.0  # the rest is still there


def test_clean_mask_is_conjugate_symmetric_and_faithful_is_off_centre():
    clean = lowpass_mask(32, 32, lowpass_radius(32), "clean")
    # H[-k] = H[k] (indices mod n): a real filter.
    mirrored = torch.roll(clean.flip(0, 1), shifts=(1, 1), dims=(0, 1))
    assert torch.equal(clean, mirrored)
    faithful = lowpass_mask(32, 32, lowpass_radius(32), "faithful")
    # Centred at (15.5, 15.5) of the shifted spectrum, not at DC (16, 16): symmetric about
    # 15.5 instead, so it differs from the fftshift-ed clean mask.
    assert torch.equal(faithful, faithful.flip(0, 1))
    assert not torch.equal(faithful, torch.fft.fftshift(clean))
    # At odd sizes the centre (n - 1) / 2 is the DC index: the two agree.
    odd_clean = lowpass_mask(33, 33, 6.0, "clean")
    assert torch.equal(lowpass_mask(33, 33, 6.0, "faithful"), torch.fft.fftshift(odd_clean))


def test_normalising_commutes_with_the_clean_filter():
    # Normalisation is affine per channel and the filter linear with DC kept, so filtering
    # normalised images equals normalising filtered [0, 1] images.
    pixels = smooth_images(4, 32, 16)
    mean, std = stats()
    radius = lowpass_radius(32)
    filtered_then_normalised = (ideal_lowpass(pixels, radius) - mean) / std
    normalised_then_filtered = ideal_lowpass((pixels - mean) / std, radius)
    torch.testing.assert_close(normalised_then_filtered, filtered_then_normalised,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_a_radius_beyond_the_corner_returns_the_input(mode):
    pixels = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    mean, std = stats()
    images = (pixels - mean) / std
    corner = math.hypot(8, 10)  # the largest |frequency| of a 16 x 20 spectrum
    for radius in (corner, corner + 3, math.inf):
        out = ideal_lowpass(images, radius, mode, mean=CIFAR_MEAN, std=CIFAR_STD)
        # Faithful: |x| of non-negative de-normalised pixels is x.
        torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    # Just inside the corner something is removed.
    out = ideal_lowpass(images, corner - 0.5, "clean")
    assert (out - images).abs().max() > 1e-3


def test_faithful_is_the_reference_path_written_out():
    # The reference's steps (low_freq_generator.py) with the DFT as explicit sums over
    # complex exponentials, in float64, on a tiny 6 x 4 image.
    height, width, radius = 6, 4, 1.6
    pixels = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    mean, std = stats()
    images = (pixels - mean) / std
    y = torch.arange(height, dtype=torch.float64)
    x = torch.arange(width, dtype=torch.float64)
    dft_y = torch.exp(-2j * math.pi * y.view(-1, 1) * y.view(1, -1) / height)
    dft_x = torch.exp(-2j * math.pi * x.view(-1, 1) * x.view(1, -1) / width)
    spectrum = dft_y @ pixels.double().to(torch.complex128) @ dft_x.T
    shifted = torch.roll(spectrum, shifts=(height // 2, width // 2), dims=(-2, -1))
    keep = torch.zeros(height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            if (i - (height - 1) / 2) ** 2 + (j - (width - 1) / 2) ** 2 <= radius**2:
                keep[i, j] = 1.0
    inverse = dft_y.conj() @ (shifted * keep) @ dft_x.conj().T / (height * width)
    expected = ((inverse.abs() - mean.double()) / std.double()).float()
    out = ideal_lowpass(images, radius, "faithful", mean=CIFAR_MEAN, std=CIFAR_STD)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_faithful_is_non_negative_in_pixel_space():
    mean, std = stats()
    # Sharp images (noise): the ideal filter rings, clean goes negative, faithful's abs not.
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images = (pixels - mean) / std
    radius = lowpass_radius(32)
    faithful = ideal_lowpass(images, radius, "faithful", mean=CIFAR_MEAN, std=CIFAR_STD)
    assert (faithful * std + mean).min() >= -1e-6
    square = torch.full((1, 3, 32, 32), 0.02)
    square[..., 8:24, 8:24] = 1.0
    clean = ideal_lowpass((square - mean) / std, radius) * std + mean
    assert clean.min() < -0.01  # Gibbs undershoot below 0 next to the bright square


def test_faithful_versus_clean_gap_is_small_at_224_and_large_at_32():
    # Measured on smooth random images in [0, 1] (mean |faithful - clean| in pixel units),
    # (mmselfsup low_freq_generator.py's off-centre mask against the DC-centred one).
    mean, std = stats()
    gaps, effects = {}, {}
    for size, low in ((224, 8), (64, 8), (32, 8)):
        pixels = smooth_images(4 if size == 224 else 8, size, low, seed=5)
        images = (pixels - mean) / std
        radius = lowpass_radius(size)
        faithful = ideal_lowpass(images, radius, "faithful", mean=CIFAR_MEAN, std=CIFAR_STD)
        clean = ideal_lowpass(images, radius, "clean")
        gaps[size] = ((faithful - clean) * std).abs().mean().item()
        effects[size] = ((clean - images) * std).abs().mean().item()
    print("mean |faithful - clean| (pixel units):",
          {size: f"{gap:.5f}" for size, gap in gaps.items()},
          "filter effect mean |clean - input|:",
          {size: f"{effect:.5f}" for size, effect in effects.items()})
    assert 5e-4 < gaps[224] < 3e-3
    assert 4e-3 < gaps[32] < 4e-2
    assert gaps[32] > 4 * gaps[224]
    assert gaps[32] > 0.2 * effects[32]  # a large share of the filter's own effect at 32


def test_dc_centred_faithful_path_matches_clean():
    # The gap above comes from the half-bin offset of the circle, not from abs() or the
    # missing ifftshift: the reference path with the circle moved onto DC equals clean.
    mean, std = stats()
    for size in (224, 32):
        pixels = smooth_images(2, size, 8, seed=6)
        radius = lowpass_radius(size)
        spectrum = torch.fft.fftshift(torch.fft.fft2(pixels), dim=(-2, -1))
        index = torch.arange(size, dtype=torch.float32) - size // 2  # DC at size // 2
        keep = ((index.view(-1, 1) ** 2 + index.view(1, -1) ** 2) <= radius**2).float()
        dc_centred = torch.fft.ifft2(spectrum * keep).abs()
        clean = ideal_lowpass((pixels - mean) / std, radius) * std + mean
        gap = (dc_centred - clean.abs()).abs().max().item()
        print(f"{size} px: max |DC-centred faithful - clean| = {gap:.2e}")
        assert gap < 1e-5


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_float32_under_autocast(mode):
    mean, std = stats()
    images = (smooth_images(2, 32, 8, seed=7) - mean) / std
    radius = lowpass_radius(32)
    plain = ideal_lowpass(images, radius, mode, mean=CIFAR_MEAN, std=CIFAR_STD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ideal_lowpass(images, radius, mode, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert autocast.dtype == torch.float32 and torch.isfinite(autocast).all()
    torch.testing.assert_close(autocast, plain, atol=0, rtol=0)
    # A half-precision input comes back in its dtype, computed in float32.
    half = ideal_lowpass(images.bfloat16(), radius, mode, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), plain, atol=0.05, rtol=0)


def test_errors():
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="pass the images' per-channel mean and std"):
        ideal_lowpass(images, 2.0, "faithful")
    with pytest.raises(ValueError, match="radius must be 0 or more"):
        ideal_lowpass(images, -1.0)
    with pytest.raises(ValueError, match="mode must be"):
        ideal_lowpass(images, 2.0, "fast")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ideal_lowpass(images[0], 2.0)
    with pytest.raises(ValueError, match="one value per channel"):
        ideal_lowpass(images, 2.0, "faithful", mean=(0.5,), std=(0.2,))
