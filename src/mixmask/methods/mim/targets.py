"""What a masked-image model regresses: the normalised image, or PixMIM's low-pass of it
(Liu et al., arXiv 2303.02416; mmselfsup ``pixmim.py``). MAE (``method.mae.target``) and
A2MIM (``method.a2mim.target``, ours: PixMIM pairs it with MAE only) share the three
config keys and the one filter (:func:`mixmask.ops.lowpass.ideal_lowpass`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mixmask.errors import ConfigError
from mixmask.ops.lowpass import ideal_lowpass, lowpass_radius


@dataclass
class PixelTargetConfig:
    # pixels: the image itself; lowpass: PixMIM's low-frequency target.
    target: Literal["pixels", "lowpass"] = "pixels"
    # faithful: mmselfsup's low_freq_generator.py path exactly; clean: centred on DC.
    lowpass_mode: Literal["faithful", "clean"] = "faithful"
    # 0: PixMIM's 40 at 224 px, scaled to data.image_size (r = 40 x S / 224).
    lowpass_radius: float = 0.0


def validate_pixel_target(params: PixelTargetConfig, section: str) -> None:
    if params.lowpass_radius < 0:
        raise ConfigError(f"{section}.lowpass_radius must be 0 (auto) or positive.")


class PixelTarget:
    """The target image of a batch of normalised images: the images, or their low-pass
    (computed under no_grad; ``pixel_stats`` un-normalise for the faithful path)."""

    def __init__(self, params: PixelTargetConfig, image_size: int, pixel_stats=None):
        self.params = params
        self.radius = params.lowpass_radius or lowpass_radius(image_size)
        self.pixel_stats = pixel_stats

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.lowpass(images) if self.params.target == "lowpass" else images

    @torch.no_grad()
    def lowpass(self, images: Tensor) -> Tensor:
        """PixMIM's low-pass of ``images`` (whatever the target; the gallery shows it)."""
        stats = self.pixel_stats
        return ideal_lowpass(images, self.radius, mode=self.params.lowpass_mode,
                             mean=None if stats is None else stats.mean,
                             std=None if stats is None else stats.std)
