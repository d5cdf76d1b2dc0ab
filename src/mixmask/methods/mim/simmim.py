"""SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", arXiv
2111.09886, CVPR 2022): what is special about it, as its reference runs (microsoft/SimMIM
``models/simmim.py``, ``data/data_simmim.py``; for ResNets, which the paper does not train:
openmixup's SimMIM-R50, ``backbones/mim_resnet.py`` with ``replace=True``, ``mask_layer=0``).

One view. ``mask_ratio`` of the ``mask_block_size`` px blocks are masked (``MaskGenerator``,
sec. 3.2: random blocks of 32 px at 0.6; :func:`a2mim_block_mask` draws the same masks); a
learnable mask token *replaces* the masked cells at the encoder's input (ViT: the patch
embeddings, before the position embedding; ConvNet: the stem's output, the input of stage
0); a 1x1 conv + PixelShuffle decoder (sec. 3.3's linear head) predicts the image from the
last feature map; the loss is L1 on the masked pixels (sec. 3.4, eq. 1).

The input pixels. The reference leaves them as they are: ``SimMIM.forward(x, mask)`` gives
the same ``x`` to the encoder and to the loss, only the token replaces (no fill, unlike
A2MIM's mean). A ViT patch embedding sees its own patch only, so a masked patch's pixels
reach nothing. A ResNet's stem overlaps the cells (3x3 conv in the CIFAR stem, 7x7 conv +
max pool in ImageNet's): visible cells beside a masked block would see its pixels, so
``input_fill=auto`` sets the masked pixels of a ConvNet's input to 0 (the dataset mean in the
normalised space). openmixup's SimMIM-R50 config names ``mask_color='zero'``, but its
``BlockwiseMaskGenerator`` has no zero branch (only "mean" fills), so its inputs stay
unfilled: ``input_fill=none`` is that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.methods.mim.a2mim import PixelShuffleDecoder
from mixmask.methods.mim.targets import PixelTarget, PixelTargetConfig, validate_pixel_target
from mixmask.methods.protocol import MaskedViews, Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.models.backbones import backbone_traits
from mixmask.models.vit import resolve_patch_size
from mixmask.ops.block_masks import a2mim_block_mask, a2mim_block_size
from mixmask.ops.grid_masks import upsample_mask
from mixmask.ops.losses.mim import masked_l1


@dataclass
class SimMIMConfig(PixelTargetConfig):
    # Share of the blocks masked (MASK_RATIO; sec. 3.2 and Table 1: the paper's default).
    mask_ratio: float = 0.6
    # Mask block side in px (MASK_PATCH_SIZE 32); 0 = a2mim_block_size(data.image_size):
    # 32 at 224 (7x7 blocks), 8 at 32 px (4x4).
    mask_block_size: int = 0
    # Masked input pixels: none = left as they are (the reference), zero = set to 0; auto =
    # none for a ViT, zero for a ConvNet, whose stem would carry them into the visible
    # cells beside them.
    input_fill: Literal["auto", "none", "zero"] = "auto"
    # (and target, lowpass_mode, lowpass_radius: PixelTargetConfig; target=lowpass is ours)


def replace_with_token(features: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """``features`` [B, C, h, w] with the cells of ``mask`` [B, h, w] (True = masked) set to
    ``mask_token`` [1, C, 1, 1] (``MIMResNet.forward_mask`` with ``replace=True``)."""
    return torch.where(mask.unsqueeze(1), mask_token.to(features.dtype), features)


@register_method("simmim")
class SimMIM(Method):
    config_class = SimMIMConfig
    num_views = 1

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params, size = self.params, config.data.image_size
        self.is_vit = backbone_traits(config.model.backbone).tokens
        self.block_size = params.mask_block_size or a2mim_block_size(size)
        fill = params.input_fill if params.input_fill != "auto" else (
            "none" if self.is_vit else "zero")
        self.zero_fill = fill == "zero"
        if self.is_vit:
            self.cell = decoder_stride = self.backbone.patch_size
            # VisionTransformerForSimMIM: trunc_normal(std .02), cut at +-1 std (its
            # _trunc_normal_ passes a=-std, b=std).
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        else:
            input_strides, decoder_stride, channels = self.backbone.stage_geometry()
            self.cell = input_strides[0]
            # MIMResNet draws its token only when loading weights (init_weights' `if
            # pretrained is not None`), so openmixup's pretraining starts from zeros: kept.
            self.mask_token = nn.Parameter(torch.zeros(1, channels[0], 1, 1))
        # The loss reads the feature map and the pooled features feed only the (detached)
        # probe, so the pooling head (ViT fc_norm, ConvNeXt's LayerNorm) would get no
        # gradient, which DDP refuses: frozen in pretraining, as A2MIM's; finetuning trains it.
        self.backbone.pooling_head.requires_grad_(False)
        self.decoder = PixelShuffleDecoder(self.feature_dim, decoder_stride)
        self.pixel_target = PixelTarget(params, size, pixel_stats)

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        backbone, params, size = config.model.backbone, config.method.simmim, \
            config.data.image_size
        traits = backbone_traits(backbone)
        if not (traits.tokens or traits.stages):
            raise ConfigError(f"method 'simmim' needs a ViT (vit_tiny, vit_small, vit_base) or "
                              f"a ResNet / ConvNeXt backbone, got {backbone}.")
        if not 0.0 < params.mask_ratio < 1.0:
            raise ConfigError(f"method.simmim.mask_ratio must lie in (0, 1), got "
                              f"{params.mask_ratio}.")
        if traits.tokens:
            cell, what = resolve_patch_size(config.model.patch_size, size), "ViT patch size"
        else:
            input_strides, last_stride = traits.stage_strides(config.model.stem)
            cell, what = input_strides[0], "stride of the backbone's stem"
            if size % last_stride:
                raise ConfigError(f"data.image_size ({size}) must be a multiple of the "
                                  f"backbone's output stride ({last_stride}) for the decoder.")
        try:
            block = params.mask_block_size or a2mim_block_size(size)
        except ValueError:
            raise ConfigError(f"No default mask block tiles data.image_size {size}; set "
                              "method.simmim.mask_block_size.") from None
        if block < 1 or size % block or block % cell:
            raise ConfigError(f"method.simmim.mask_block_size ({block}) must divide "
                              f"data.image_size ({size}) and be a multiple of the {what} "
                              f"({cell}).")
        validate_pixel_target(params, "method.simmim")

    # -- the step --------------------------------------------------------------------------
    def sample_mask(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Block mask on the token's grid, bool [B, S / cell, S / cell], True = masked."""
        return a2mim_block_mask(images.shape[0], images.shape[-1], self.block_size, self.cell,
                                self.params.mask_ratio, generator=generator,
                                device=images.device)

    def encoder_input(self, images: Tensor, mask_pixels: Tensor) -> Tensor:
        return images * ~mask_pixels if self.zero_fill else images

    def encode(self, inputs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(last feature map [B, C, h, w], pooled features [B, D]), the token in place."""
        if self.is_vit:
            tokens = self.backbone.forward_with_mask_token(inputs, mask, self.mask_token,
                                                           replace=True)
            grid_h, grid_w = self.backbone.grid_size
            feature_map = tokens[:, 1:].transpose(1, 2).reshape(
                tokens.shape[0], -1, grid_h, grid_w)
            return feature_map, self.backbone.pool(tokens)
        feature_map = self.backbone.forward_stages(
            inputs, 0, lambda features: replace_with_token(features, mask, self.mask_token))
        return feature_map, feature_map.mean(dim=(2, 3))

    @torch.no_grad()
    def masked_views(self, images: Tensor, generator: torch.Generator) -> MaskedViews:
        mask = self.sample_mask(images, generator)
        mask_pixels = upsample_mask(mask, images.shape[-1])
        inputs = self.encoder_input(images, mask_pixels)
        prediction = self.decoder(self.encode(inputs, mask)[0]).float()
        # A ViT's masked patches reach nothing (the token takes their place): shown at 0.
        shown = images * ~mask_pixels if self.is_vit else inputs
        return MaskedViews(mask=mask_pixels, inputs=shown.float(),
                           target=self.pixel_target(images).float(), reconstruction=prediction)

    def training_step(self, batch, generator, progress: float = 0.0) -> StepOutput:
        images = batch.views[0]
        mask = self.sample_mask(images, generator)
        mask_pixels = upsample_mask(mask, images.shape[-1])
        feature_map, pooled = self.encode(self.encoder_input(images, mask_pixels), mask)
        # masked_l1 is eq. 1 as the reference computes it, sum(|x - x_rec| m) / (sum(m) +
        # 1e-5) / in_chans with m [B, 1, H, W]: the same normalisation, the same epsilon.
        loss = masked_l1(self.decoder(feature_map), self.pixel_target(images), mask_pixels)
        return StepOutput(loss, {"loss": loss.detach()}, pooled.detach())
