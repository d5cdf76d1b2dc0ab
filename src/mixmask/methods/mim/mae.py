"""MAE (He et al. 2022, arXiv 2111.06377) and PixMIM on top of it (Liu et al., arXiv
2303.02416): what is special about them.

MAE (facebookresearch/mae ``models_mae.py``): per-sample random masking of 75% of the
patches by argsort of uniform noise; the ViT encoder sees the visible patches only; a
light decoder (``decoder_depth`` blocks of width ``decoder_dim``) gets the encoded tokens
plus one shared mask token per masked patch, unshuffled into place, with fixed sin-cos
position embeddings, and predicts every patch's pixels; the loss is the MSE on the masked
patches only, against the per-patch normalised pixels (``norm_pix``, sec. 3 "Reconstruction
target").

PixMIM (``method.mae.target=lowpass`` + ``data.augmentation=conservative``): the target is
the ideal low-pass filtered image (radius 40 x S / 224) before patchify and ``norm_pix``
(mmselfsup ``pixmim.py``); ``lowpass_mode`` picks the reference's exact path (``faithful``)
or the DC-centred one (``clean``): :func:`mixmask.ops.lowpass.ideal_lowpass`.

Long-sequence MAE (LSMAE, Hu et al., arXiv 2210.07224; facebookresearch/long_seq_mae) is
MAE with a longer sequence (a larger image or a smaller ``model.patch_size``) and the mask
unit decoupled from the patch: ``mask_unit`` k masks whole k x k blocks of patches
together (its ``--mask_downsampling``), the target stays at the patch resolution. PixMIM
on it is the same low-pass target (the radius scales with ``data.image_size``: 80 at
448 px, our choice, which the reference does not state).

Optimiser (``train.optimizer=adamw``): the protocol's AdamW groups leave norms, biases and
the tokens (cls, mask, position) undecayed, as the MAE paper's recipe and timm's ViTs do;
MAE's ``main_pretrain.py`` excludes only 1-d parameters, so its cls and mask tokens (3-d)
are decayed there, a small difference from the code, kept on purpose for one rule across
methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.methods.mim.targets import PixelTarget, PixelTargetConfig, validate_pixel_target
from mixmask.methods.protocol import MaskedViews, Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.models.backbones import backbone_traits
from mixmask.models.vit import (
    init_linear_and_norm_like_mae,
    patchify,
    sincos_2d_position_embedding,
    unpatchify,
)
from mixmask.ops.losses.mim import masked_mse_per_patch, norm_pix_target
from mixmask.ops.token_masks import mae_random_masking, unshuffle


@dataclass
class MAEConfig(PixelTargetConfig):
    # The share of patches masked (MAE: 0.75).
    mask_ratio: float = 0.75
    # The decoder: MAE's ViT-B recipe is 8 blocks of width 512 with 16 heads.
    decoder_depth: int = 8
    decoder_dim: int = 512
    decoder_heads: int = 16
    # Per-patch normalised pixel target (MAE sec. 3; its released models use it).
    norm_pix: bool = True
    # Long-sequence MAE (arXiv 2210.07224): mask whole k x k blocks of patches together, the
    # mask unit decoupled from the patch (its --mask_downsampling); 1 = MAE's per patch.
    mask_unit: int = 1
    # (and target, lowpass_mode, lowpass_radius: PixelTargetConfig; PixMIM is target=lowpass)


class MAEDecoder(nn.Module):
    """MAE's decoder: embed, mask tokens unshuffled into place, fixed sin-cos positions,
    transformer blocks, norm, a linear map to each patch's p x p x 3 pixels."""

    def __init__(self, *, encoder_dim: int, grid: int, patch_size: int, dim: int, depth: int,
                 heads: int, cls_token: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # The encoder's cls token (a ViT's; ConvMAE's encoder has none) keeps its place.
        self.cls_token = cls_token
        position = sincos_2d_position_embedding(grid, grid, dim, cls_token=cls_token)
        self.register_buffer("pos_embed", position[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        # models_mae.py initialize_weights: mask token N(0, 0.02), Linear xavier, LN 1/0.
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm_like_mae(self)

    def forward(self, encoded: Tensor, restore_indices: Tensor) -> Tensor:
        """encoded [B, 1 + K, D_enc] (cls first; [B, K, D_enc] without one) -> predicted
        patches [B, N, p*p*3]."""
        tokens = self.embed(encoded)
        first = 1 if self.cls_token else 0
        batch, kept = tokens.shape[0], tokens.shape[1] - first
        num_patches = restore_indices.shape[1]
        masks = self.mask_token.expand(batch, num_patches - kept, -1)
        patches = unshuffle(torch.cat([tokens[:, first:], masks], dim=1), restore_indices)
        tokens = torch.cat([tokens[:, :first], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.pred(self.norm(tokens))[:, first:]


@register_method("mae")
class MAE(Method):
    config_class = MAEConfig
    num_views = 1

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.patch_size = self.backbone.patch_size
        self.grid = config.data.image_size // self.patch_size
        self.decoder = MAEDecoder(encoder_dim=self.feature_dim, grid=self.grid,
                                  patch_size=self.patch_size, dim=params.decoder_dim,
                                  depth=params.decoder_depth, heads=params.decoder_heads,
                                  cls_token=self.backbone.has_cls_token)
        self.pixel_target = PixelTarget(params, config.data.image_size, pixel_stats)
        # Pretraining never pools (the decoder reads the encoded tokens), so the pooled
        # LayerNorm of global_pool=avg (fc_norm) would get no gradient, and DDP
        # (find_unused_parameters=False) fails on the second step with one such parameter.
        # Frozen: models_mae.py's pretraining encoder has no fc_norm; finetuning trains it.
        self.backbone.pooling_head.requires_grad_(False)

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)

        traits = backbone_traits(config.model.backbone)
        if traits.token_stride is None:
            raise ConfigError(f"method 'mae' needs a token encoder: a ViT (model.backbone="
                              f"vit_tiny, vit_small, vit_base) or ConvMAE's (convvit_tiny, "
                              f"convvit_small, convvit_base), got {config.model.backbone}.")
        params = config.method.mae
        if not 0.0 < params.mask_ratio < 1.0:
            raise ConfigError(f"method.mae.mask_ratio must lie in (0, 1), got "
                              f"{params.mask_ratio}.")
        if params.decoder_dim % params.decoder_heads:
            raise ConfigError(f"method.mae.decoder_dim={params.decoder_dim} must be a multiple "
                              f"of method.mae.decoder_heads={params.decoder_heads}.")
        for key in ("decoder_depth", "decoder_dim", "decoder_heads"):
            if getattr(params, key) < 1:
                raise ConfigError(f"method.mae.{key} must be at least 1.")
        stride = traits.token_stride(config.model, config.data.image_size)
        if config.data.image_size % stride:
            raise ConfigError(f"data.image_size ({config.data.image_size}) must be a multiple "
                              f"of the encoder's token stride ({stride} px).")
        grid = config.data.image_size // stride
        if params.mask_unit < 1 or grid % params.mask_unit:
            raise ConfigError(f"method.mae.mask_unit ({params.mask_unit}) must divide the patch "
                              f"grid's side ({grid} patches of model.patch_size).")
        validate_pixel_target(params, "method.mae")

    def target_patches(self, images: Tensor) -> Tensor:
        """What the decoder regresses: patches of the image (PixMIM: of its low-pass),
        per-patch normalised under ``norm_pix``; no gradient."""
        with torch.no_grad():
            patches = patchify(self.pixel_target(images).float(), self.patch_size)
            return norm_pix_target(patches) if self.params.norm_pix else patches

    @torch.no_grad()
    def masked_views(self, images: Tensor, generator: torch.Generator) -> MaskedViews:
        keep, mask, restore = mae_random_masking(images.shape[0], self.grid * self.grid,
                                                 self.params.mask_ratio, generator,
                                                 images.device, mask_unit=self.params.mask_unit)
        predicted = self.decoder(self.backbone.forward_visible(images, keep), restore).float()
        target = self.pixel_target(images).float()
        if self.params.norm_pix:
            # MAE's visualize notebook: the prediction in the target patch's own scale.
            patches = patchify(target, self.patch_size)
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            predicted = predicted * std + mean
        grid = (self.grid, self.grid)
        reconstruction = unpatchify(predicted, self.patch_size, grid)
        mask_pixels = unpatchify(mask.float()[..., None].expand(-1, -1, self.patch_size ** 2),
                                 self.patch_size, grid).bool()
        return MaskedViews(mask=mask_pixels, inputs=images.float() * ~mask_pixels,
                           target=target, reconstruction=reconstruction)

    def training_step(self, batch, generator, progress: float = 0.0) -> StepOutput:
        images = batch.views[0]
        keep, mask, restore = mae_random_masking(images.shape[0], self.grid * self.grid,
                                                 self.params.mask_ratio, generator,
                                                 images.device, mask_unit=self.params.mask_unit)
        encoded = self.backbone.forward_visible(images, keep)
        predicted = self.decoder(encoded, restore)
        loss = masked_mse_per_patch(predicted.float(), self.target_patches(images), mask)
        # The probe's features: the cls token, or (ConvMAE, no cls) the visible tokens' mean.
        pooled = encoded[:, 0] if self.backbone.has_cls_token else encoded.mean(dim=1)
        return StepOutput(loss, {"loss": loss.detach()}, pooled.detach())
