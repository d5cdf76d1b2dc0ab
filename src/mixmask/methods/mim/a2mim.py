"""A2MIM (Li et al., "Architecture-Agnostic Masked Image Modeling", arXiv 2205.13943, ICML
2023): what is special about it, as its reference runs (Westlake-AI/openmixup
``models/algorithms/a2mim.py``, ``backbones/mim_resnet.py``, ``backbones/mim_vit.py``,
``necks/mim_neck.py``, ``heads/mim_head.py``).

One view. SimMIM blocks (``mask_block_size`` px, ``mask_ratio`` of them) are masked; the
masked input pixels take the image's per-channel mean (normalised space; ``a2mim.py``); a
learnable mask token is *added* to the masked positions of an intermediate feature map
(ViT: the patch tokens before block ``mask_layer``; ResNet: the input of stage
``mask_layer``); a 1x1 conv + PixelShuffle decoder (SimMIM's linear head, ``NonLinearMIMNeck``
with ``decoder_cfg=None``) predicts the unfilled image from the last feature map; the loss
is L1 (ViT) or focal-L1 (ResNet) on masked pixels plus ``frequency_weight`` x the focal
frequency loss of the composite image (``A2MIMHead``; :mod:`mixmask.ops.losses.mim`).

``mask_layer`` numbering. ViT: 0 = right after the patch + position embedding (the
reference's ``mask_layer=0``, before the position embedding, is the same sum), l = before
block l (0-indexed), ``depth`` = after the last block; the reference's ``mask_layer=l >= 1``
is ``l - 1`` here (:meth:`ViTBackbone.forward_with_mask_token`). ResNet: stage i's input,
0 = after the stem (input of ``layer1``) ... 3 = input of ``layer4`` (the reference's
``MIMResNet`` numbering; its ImageNet R50 runs use 3: 14x14, 1024 channels at 224 px).

``target=lowpass`` (ours, not A2MIM): PixMIM's low-frequency target (arXiv 2303.02416) in
place of the pixels, for both the spatial and the frequency loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.methods.mim.targets import PixelTarget, PixelTargetConfig, validate_pixel_target
from mixmask.methods.protocol import MaskedViews, Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.models.backbones import backbone_traits
from mixmask.models.vit import resolve_patch_size
from mixmask.ops.block_masks import a2mim_block_mask, a2mim_block_size, mean_fill
from mixmask.ops.grid_masks import upsample_mask
from mixmask.ops.losses.mim import a2mim_frequency_loss, masked_focal_l1, masked_l1
from mixmask.ops.optim import pretraining_groups

# Parameter names (on the method) that form the mask token's optimizer group.
MASK_TOKEN_NAMES = ("mask_token", "mask_gamma")


@dataclass
class A2MIMConfig(PixelTargetConfig):
    # Share of the blocks masked (BlockwiseMaskGenerator mask_ratio=0.6).
    mask_ratio: float = 0.6
    # Mask block side in px; 0 = a2mim_block_size(data.image_size): 32 at 224, 8 at 32.
    mask_block_size: int = 0
    # Where the token is added (module docstring): ViT 0..depth, ResNet stage input 0..3.
    # -1 = the reference's choice: 0 for ViT, 3 (input of layer4) for ResNet.
    mask_layer: int = -1
    # ResNet: learnable per-channel gain on the masked features before the token is added
    # (A2MIM's ``mask_init``; the headline ResNet runs use 1e-6). 0 = no gain. ViTs ignore
    # it (A2MIM's ViT configs leave mask_init at 0).
    mask_token_gain_init: float = 1e-6
    # auto: l1 for ViT, focal_l1 for ResNet (A2MIMHead configs).
    loss: Literal["auto", "l1", "focal_l1"] = "auto"
    # Weight of the frequency loss; -1 = auto (0.1 ViT, 0.5 ResNet); 0 turns it off.
    frequency_weight: float = -1.0
    # Gradient share of visible pixels in the frequency composite (fft_unmask_weight);
    # -1 = auto (0 ViT, 1e-3 ResNet). The spatial loss counts masked pixels only.
    unmask_weight: float = -1.0
    # lr multiplier of the mask token (and gain) group, which has no weight decay (the
    # reference's CNN configs: paramwise_options mask_token lr_mult 0.1, weight_decay 0).
    mask_token_lr_scale: float = 0.1
    # (and target, lowpass_mode, lowpass_radius: PixelTargetConfig; target=lowpass is ours)


def resolved_mask_layer(params: A2MIMConfig, backbone: str) -> int:
    if params.mask_layer >= 0:
        return params.mask_layer
    return 0 if backbone_traits(backbone).tokens else 3


def add_mask_token(features: Tensor, mask: Tensor, mask_token: Tensor,
                   mask_gamma: Tensor | None = None) -> Tensor:
    """A2MIM's residual mask token on a feature map (``mim_resnet.py``
    ``MIMResNet.forward_mask`` with ``replace=False``)::

        x <- (1 - m) x + m (gamma x) + m token      # the gamma term only with mask_init > 0

    features [B, C, h, w]; mask [B, h, w], 1 = masked; mask_token, mask_gamma [1, C, 1, 1].
    The code scales the masked *features* by gamma and adds the token unscaled (the gain
    nearly zeroes the masked features at the start), as mim_resnet.py's forward_mask does."""
    weight = mask.to(features.dtype).unsqueeze(1)
    if mask_gamma is not None:
        features = features * (1.0 - weight) + features * weight * mask_gamma
    return features + mask_token * weight


class PixelShuffleDecoder(nn.Module):
    """SimMIM's linear decoder (``NonLinearMIMNeck`` with ``decoder_cfg=None``):
    Conv1x1(C -> stride^2 x 3), PixelShuffle(stride) back to the image size."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, stride * stride * 3, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.shuffle(self.conv(feature_map))


@register_method("a2mim")
class A2MIM(Method):
    config_class = A2MIMConfig
    num_views = 1

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params, size = self.params, config.data.image_size
        self.is_vit = backbone_traits(config.model.backbone).tokens
        self.mask_layer = resolved_mask_layer(params, config.model.backbone)
        self.block_size = params.mask_block_size or a2mim_block_size(size)
        if self.is_vit:
            self.cell = self.backbone.patch_size
            # mim_vit.py SimMIMViT.init_weights: trunc_normal(std=0.02).
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            # The loss reads the token map; the pooled features (the online probe's input)
            # are detached, so global_pool=avg's fc_norm would get no gradient, and DDP
            # (find_unused_parameters=False) fails on the second step with one such
            # parameter: frozen in pretraining; finetuning trains it.
            self.backbone.fc_norm.requires_grad_(False)
            decoder_channels, decoder_stride = self.feature_dim, self.backbone.patch_size
        else:
            input_strides, output_stride, channels = self.backbone.stage_geometry()
            # The loss reads the feature map, so the pooling head (ConvNeXt's LayerNorm; a
            # ResNet has none) gets no gradient: frozen, as fc_norm above; finetuning
            # trains it.
            self.backbone.pooling_head.requires_grad_(False)
            self.cell = input_strides[self.mask_layer]
            width = channels[self.mask_layer]
            # mim_resnet.py MIMResNet.init_weights draws the token from trunc_normal(0.02)
            # only under ``if pretrained is not None``, so its pretraining runs start from
            # the zeros of __init__; kept (the ViT's init, which does run, is N(0, 0.02)).
            self.mask_token = nn.Parameter(torch.zeros(1, width, 1, 1))
            gain = params.mask_token_gain_init
            self.mask_gamma = (nn.Parameter(torch.full((1, width, 1, 1), gain))
                               if gain > 0 else None)
            decoder_channels, decoder_stride = self.feature_dim, output_stride
        self.decoder = PixelShuffleDecoder(decoder_channels, decoder_stride)
        self.loss_name = params.loss if params.loss != "auto" else (
            "l1" if self.is_vit else "focal_l1")
        self.frequency_weight = params.frequency_weight if params.frequency_weight >= 0 else (
            0.1 if self.is_vit else 0.5)
        self.unmask_weight = params.unmask_weight if params.unmask_weight >= 0 else (
            0.0 if self.is_vit else 1e-3)
        self.pixel_target = PixelTarget(params, size, pixel_stats)

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)

        backbone, params, size = config.model.backbone, config.method.a2mim, \
            config.data.image_size
        traits = backbone_traits(backbone)
        if not (traits.tokens or traits.stages):
            raise ConfigError(f"method 'a2mim' needs a ViT (vit_tiny, vit_small, vit_base) or "
                              f"resnet18/34/50 backbone, got {backbone}.")
        if not 0.0 < params.mask_ratio < 1.0:
            raise ConfigError(f"method.a2mim.mask_ratio must lie in (0, 1), got "
                              f"{params.mask_ratio}.")
        layer = resolved_mask_layer(params, backbone)
        if traits.tokens:
            depth = traits.blocks
            if layer > depth:
                raise ConfigError(f"method.a2mim.mask_layer for {backbone} must lie in "
                                  f"0..{depth} (-1 = 0), got {params.mask_layer}.")
            cell, what = resolve_patch_size(config.model.patch_size, size), "ViT patch size"
        else:
            if layer > 3:
                raise ConfigError(f"method.a2mim.mask_layer for a ResNet is a stage input in "
                                  f"0..3 (-1 = 3), got {params.mask_layer}.")
            input_strides, last_stride = traits.stage_strides(config.model.stem)
            cell = input_strides[layer]
            what = f"stride of stage {layer}'s mask-token point"
            if size % last_stride:
                raise ConfigError(f"data.image_size ({size}) must be a multiple of the "
                                  f"backbone's output stride ({last_stride}) for the decoder.")
        try:
            block = params.mask_block_size or a2mim_block_size(size)
        except ValueError as error:
            raise ConfigError(f"{error} Set method.a2mim.mask_block_size.") from None
        if block < 1 or size % block or block % cell:
            raise ConfigError(f"method.a2mim.mask_block_size ({block}) must divide "
                              f"data.image_size ({size}) and be a multiple of the {what} "
                              f"({cell}).")
        if params.unmask_weight > 1.0:
            raise ConfigError(f"method.a2mim.unmask_weight must be -1 (auto) or in [0, 1], "
                              f"got {params.unmask_weight}.")
        if params.mask_token_lr_scale < 0 or params.mask_token_gain_init < 0:
            raise ConfigError("method.a2mim.mask_token_lr_scale and mask_token_gain_init must "
                              "not be negative.")
        validate_pixel_target(params, "method.a2mim")

    def parameter_groups(self, optimizer: str) -> list[dict[str, Any]]:
        """The base class's groups for every other parameter, plus the mask token (and its
        gain) alone with ``lr_scale = mask_token_lr_scale`` and no weight decay (A2MIM's
        CNN configs: ``paramwise_options={'mask_token': dict(weight_decay=0., lr_mult=0.1)}``;
        its ViT configs exclude the token from decay and keep lr x1, so set the scale to 1
        for the reference's ViT recipe)."""
        named = list(self.named_parameters())
        token_params = [(name, param) for name, param in named
                        if name in MASK_TOKEN_NAMES and param.requires_grad]
        others = [(name, param) for name, param in named if name not in MASK_TOKEN_NAMES]
        # The base class's rule for everything else (Method.parameter_groups).
        groups = pretraining_groups(optimizer, others)
        token_group = {"params": [param for _, param in token_params],
                       "param_names": [name for name, _ in token_params],
                       "lr_scale": float(self.params.mask_token_lr_scale),
                       "weight_decay": 0.0}
        if optimizer == "lars":
            token_group["lars_exclude"] = True
        return [*groups, token_group]

    # -- the step --------------------------------------------------------------------------
    def sample_mask(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Block mask on the token's grid, bool [B, S / cell, S / cell], True = masked."""
        return a2mim_block_mask(images.shape[0], images.shape[-1], self.block_size, self.cell,
                                self.params.mask_ratio, generator=generator,
                                device=images.device)

    def encode(self, inputs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(last feature map [B, C, h, w], pooled features [B, D]) of the filled input."""
        if self.is_vit:
            tokens = self.backbone.forward_with_mask_token(inputs, mask, self.mask_token,
                                                           layer=self.mask_layer)
            grid_h, grid_w = self.backbone.grid_size
            feature_map = tokens[:, 1:].transpose(1, 2).reshape(
                tokens.shape[0], -1, grid_h, grid_w)
            return feature_map, self.backbone.pool(tokens)
        feature_map = self.backbone.forward_stages(
            inputs, self.mask_layer,
            lambda features: add_mask_token(features, mask, self.mask_token, self.mask_gamma))
        return feature_map, feature_map.mean(dim=(2, 3))

    def loss_terms(self, prediction: Tensor, target: Tensor,
                   mask_pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(spatial, frequency) losses, float32 (the helpers turn autocast off)."""
        spatial_fn = masked_l1 if self.loss_name == "l1" else masked_focal_l1
        spatial = spatial_fn(prediction, target, mask_pixels)
        if self.frequency_weight == 0:
            return spatial, spatial.new_zeros(())
        frequency = a2mim_frequency_loss(prediction, target, mask_pixels,
                                         unmask_weight=self.unmask_weight)
        return spatial, frequency

    @torch.no_grad()
    def masked_views(self, images: Tensor, generator: torch.Generator) -> MaskedViews:
        mask = self.sample_mask(images, generator)
        mask_pixels = upsample_mask(mask, images.shape[-1])
        inputs = mean_fill(images, mask_pixels)
        prediction = self.decoder(self.encode(inputs, mask)[0]).float()
        return MaskedViews(mask=mask_pixels.bool(), inputs=inputs.float(),
                           target=self.pixel_target(images).float(), reconstruction=prediction)

    def training_step(self, batch, generator, progress: float = 0.0) -> StepOutput:
        images = batch.views[0]
        mask = self.sample_mask(images, generator)
        mask_pixels = upsample_mask(mask, images.shape[-1])
        inputs = mean_fill(images, mask_pixels)
        feature_map, pooled = self.encode(inputs, mask)
        prediction = self.decoder(feature_map)
        spatial, frequency = self.loss_terms(prediction, self.pixel_target(images),
                                             mask_pixels)
        loss = spatial + self.frequency_weight * frequency
        logs = {"loss": loss.detach(), "loss_spatial": spatial.detach(),
                "loss_frequency": frequency.detach()}
        return StepOutput(loss, logs, pooled.detach())
