"""SiameseIM (Tao et al., "Siamese Image Modeling for Self-Supervised Vision Representation
Learning", arXiv 2206.01204, CVPR 2023): what is special about it, as its reference runs
(fundamentalvision/Siamese-Image-Modeling ``models_sim.py: SiameseIMViT``).

Two views of each image, their crops and flips known (``Batch.boxes``, ``Batch.flips``).
The online branch encodes the VISIBLE patches of view 1 (BEiT block masks, one fixed count
per sample), maps them to the decoder width, runs them through a projector, and a
predictor then reads [cls, visible view-1 tokens at their absolute positions, one mask
token per view-2 patch at its position RELATIVE to crop 1] and predicts every view-2
token. The target is an EMA copy of encoder + linear + projector on the whole view 2 (the
predictor has no copy). The loss is UniGrad's (:func:`mixmask.ops.losses.unigrad.unigrad_loss`).

Reference details kept: no final LayerNorm on the encoder's tokens; projector and
predictor are ViT blocks whose norms are BatchNorm over batch x tokens in fp32
("PermuteBN"); the patch embedding stays at its random init (``train_patch_embed=False``,
MoCo v3's trick), so its EMA copy never changes; momentum 0.995 -> 1 on a cosine. The
reference updates the EMA at the start of each forward; we update it after each optimizer
step (the same sequence of targets: the first update would average two equal copies).

ConvNet variant (ours, not in the paper, whose code is ViT-only): a ResNet encodes view 1
with its masked cells filled (``method.siameseim.fill``: the image mean, zeros, or
MixMask's fill from the reversed batch), its last feature map's unmasked cells are the
visible tokens (their mean stands for the cls token), at the same sin-cos positions of
that grid; the EMA ResNet encodes view 2; predictor and loss are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.methods.common import (
    HostGenerator,
    check_unit_interval,
    cosine_momentum,
    ema_copy,
    ema_update,
)
from mixmask.methods.protocol import Method, StepOutput
from mixmask.methods.registry import register_method
from mixmask.models.backbones import backbone_traits
from mixmask.models.vit import resolve_patch_size, sincos_2d_position_embedding
from mixmask.ops.block_masks import mean_fill
from mixmask.ops.distributed import all_reduce_mean
from mixmask.ops.grid_masks import beit_block_mask, host_to_device, upsample_mask
from mixmask.ops.losses.unigrad import unigrad_loss
from mixmask.ops.relative_position import relative_position_embedding
from mixmask.ops.token_masks import gather_tokens


@dataclass
class SiameseIMConfig:
    # Share of view 1's patches masked, the same count for every sample (the 1600-epoch
    # script: 118 of 196).
    mask_ratio: float = 0.6
    # Smallest BEiT block in patches; 0 = 16 at 14 x 14 scaled by the grid's area (5 at 8 x 8).
    min_block_patches: int = 0
    # Width of projector and predictor; 0 = the encoder's (the reference: 768 for ViT-B).
    decoder_dim: int = 0
    # Heads of their blocks; 0 = decoder_dim / 48 (the reference: 16 heads at 768).
    decoder_heads: int = 0
    projector_depth: int = 2
    predictor_depth: int = 4
    # UniGrad's weight of the correlation term (neg_weight).
    negative_weight: float = 0.02
    # Target EMA momentum, cosine from start to end over training.
    momentum_start: float = 0.995
    momentum_end: float = 1.0
    # Keep the ViT's patch embedding at its random init (the reference's default).
    freeze_patch_embed: bool = True
    # ConvNet variant (ours): how view 1's masked cells are filled.
    fill: Literal["mean", "zero", "mix"] = "mean"


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the channels of [B, T, D] tokens, statistics over batch x tokens,
    computed in fp32 with autocast off (``models_sim.py: PermuteBN``)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, device=device, dtype=dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            shape = tokens.shape
            return self.norm(tokens.float().reshape(-1, shape[-1])).reshape(shape)


def _blocks(dim: int, heads: int, depth: int) -> nn.Sequential:
    from timm.models.vision_transformer import Block

    return nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                 norm_layer=TokenBatchNorm) for _ in range(depth)))


def default_min_block_patches(num_patches: int) -> int:
    """16 patches at 14 x 14 (BEiT / SiameseIM), scaled by grid area, at least 1."""
    return max(1, round(16 * num_patches / 196))


@register_method("siameseim")
class SiameseIM(Method):
    config_class = SiameseIMConfig
    num_views = 2

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        params = self.params
        self.is_vit = backbone_traits(config.model.backbone).tokens
        size = config.data.image_size
        if self.is_vit:
            self.grid = self.backbone.grid_size[0]
            encoder_dim = self.backbone.embed_dim
            if params.freeze_patch_embed:
                self.backbone.patch_embed.requires_grad_(False)
            # Pretraining runs the blocks itself and never pools, so neither pooling
            # LayerNorm (norm for global_pool=token, fc_norm for avg) gets a gradient:
            # frozen, DDP would otherwise fail on its second step. The reference's
            # pretraining encoder normalises in its own decoder (models_sim.py);
            # finetuning trains both (requires_grad again).
            self.backbone.norm.requires_grad_(False)
            self.backbone.fc_norm.requires_grad_(False)
        else:
            # The last feature map's side: ceil(S / output stride), as the convolutions pad.
            _, output_stride, _ = self.backbone.stage_geometry()
            self.grid, encoder_dim = -(-size // output_stride), self.feature_dim
            # Tokens come from the feature map: the pooling head (ConvNeXt's LayerNorm; a
            # ResNet has none) gets no gradient. Frozen (DDP); finetuning trains it.
            self.backbone.pooling_head.requires_grad_(False)
        self.num_patches = self.grid * self.grid
        dim = params.decoder_dim or encoder_dim
        heads = params.decoder_heads or max(1, dim // 48)
        if dim % heads:  # the automatic count need not divide an unusual width
            raise ConfigError(f"method.siameseim: {heads} attention heads do not divide the "
                              f"projector / predictor width {dim}; set "
                              "method.siameseim.decoder_heads to a divisor of it.")
        self.dim = dim
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.projector = _blocks(dim, heads, params.projector_depth)
        self.predictor = _blocks(dim, heads, params.predictor_depth)
        self.decoder_pred = nn.Linear(dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # 2D relative channels (position + scale) -> D: models_sim.py decoder_pos_mlp.
        self.relative_mlp = nn.Linear(2 * dim, dim)
        self.register_buffer("decoder_pos_embed", sincos_2d_position_embedding(
            self.grid, self.grid, dim, cls_token=True)[None], persistent=False)
        self.masked_count = round(params.mask_ratio * self.num_patches)
        self.min_block = params.min_block_patches or default_min_block_patches(
            self.num_patches)
        self.mask_generator = HostGenerator()
        self._init_heads()
        self.target_backbone = ema_copy(self.backbone)
        self.target_decoder_embed = ema_copy(self.decoder_embed)
        self.target_projector = ema_copy(self.projector)

    def _init_heads(self) -> None:
        # models_sim.py: Linear layers Xavier-uniform with zero bias (MAE), tokens N(0, 0.02).
        for module in (self.decoder_embed, self.projector, self.predictor, self.decoder_pred,
                       self.relative_mlp):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)

        params = config.method.siameseim
        check_unit_interval(params, "method.siameseim", "momentum_start", "momentum_end")
        if not 0.0 < params.mask_ratio < 1.0:
            raise ConfigError(f"method.siameseim.mask_ratio must lie in (0, 1), got "
                              f"{params.mask_ratio}.")
        for key in ("projector_depth", "predictor_depth"):
            if getattr(params, key) < 1:
                raise ConfigError(f"method.siameseim.{key} must be at least 1.")
        for key in ("decoder_dim", "decoder_heads", "min_block_patches"):
            if getattr(params, key) < 0:
                raise ConfigError(f"method.siameseim.{key} must be 0 (auto) or positive.")
        dim = params.decoder_dim
        if dim and (dim % 4 or (params.decoder_heads and dim % params.decoder_heads)):
            raise ConfigError(f"method.siameseim.decoder_dim={dim} must be a multiple of 4 "
                              "(sin-cos positions) and of method.siameseim.decoder_heads.")
        backbone = config.model.backbone
        traits = backbone_traits(backbone)
        if traits.tokens:
            resolve_patch_size(config.model.patch_size, config.data.image_size)
        elif not traits.stages:
            raise ConfigError(f"method 'siameseim' runs on a ViT or (our ConvNet variant) a "
                              f"ResNet, got model.backbone={backbone}.")

    # -- the step --------------------------------------------------------------------------
    def sample_mask(self, batch_size: int, generator: torch.Generator,
                    device: torch.device) -> Tensor:
        """bool [B, N], True = masked: BEiT blocks with exactly ``masked_count`` per sample
        (``util/masking_generator.py`` with ``fixed_num_masking_patches``; the MixMask
        block generator's blocks are its *kept* cells, so they are read as masked here).
        Drawn on the host (BEiT's loop), as the reference's dataset draws it, from the
        method's checkpointed host generator, seeded from the step generator's seed."""
        host = self.mask_generator.get(generator)
        keep_ratio = 1.0 - self.masked_count / self.num_patches
        blocks = beit_block_mask(batch_size, self.grid, keep_ratio, generator=host,
                                 min_block_cells=self.min_block, fill_to_target=True)
        return host_to_device(blocks.reshape(batch_size, -1).bool(), device)

    def online_tokens(self, images: Tensor, mask: Tensor, generator: torch.Generator
                      ) -> tuple[Tensor, Tensor]:
        """(cls [B, 1, E], visible tokens [B, K, E]) of view 1 and the visible indices."""
        keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :self.num_patches
                                                                         - self.masked_count]
        if self.is_vit:
            backbone = self.backbone
            visible = gather_tokens(backbone.embed_patches(images), keep)
            # No final norm: models_sim.py's forward_sim skips it.
            tokens = backbone.blocks(backbone.prepend_cls(visible))
            return tokens, keep
        filled = self._fill(images, mask, generator)
        cells = self.backbone.feature_map(filled).flatten(2).transpose(1, 2)
        visible = gather_tokens(cells, keep)
        return torch.cat([visible.mean(dim=1, keepdim=True), visible], dim=1), keep

    def _fill(self, images: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
        size = images.shape[-1]
        mask_pixels = upsample_mask(mask.reshape(-1, self.grid, self.grid), size)
        fill = self.params.fill
        if fill == "mean":
            return mean_fill(images, mask_pixels)
        if fill == "zero":
            return images * ~mask_pixels
        # MixMask's fill: the masked cells take the reversed batch's pixels.
        return torch.where(mask_pixels, images.flip(0), images)

    @torch.no_grad()
    def target_tokens(self, images: Tensor) -> Tensor:
        """The EMA encoder + linear + projector on all of view 2, patch tokens [B, N, D]."""
        if self.is_vit:
            backbone = self.target_backbone
            tokens = backbone.blocks(backbone.prepend_cls(backbone.embed_patches(images)))
        else:
            cells = self.target_backbone.feature_map(images).flatten(2).transpose(1, 2)
            tokens = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)
        return self.target_projector(self.target_decoder_embed(tokens))[:, 1:]

    def predict(self, online: Tensor, keep: Tensor, relative: Tensor) -> Tensor:
        """The predictor over [cls, visible view-1 tokens, one query per view-2 patch]:
        the queries' outputs [B, N, D]."""
        tokens = self.projector(self.decoder_embed(online))
        batch = tokens.shape[0]
        position = self.decoder_pos_embed.to(tokens.dtype)
        cls = tokens[:, :1] + position[:, :1]
        visible = tokens[:, 1:] + gather_tokens(position[:, 1:].expand(batch, -1, -1), keep)
        queries = self.mask_token + self.relative_mlp(relative.to(tokens.dtype))
        sequence = self.predictor(torch.cat([cls, visible, queries], dim=1))
        return self.decoder_pred(sequence[:, -self.num_patches:])

    def training_step(self, batch, generator, progress: float = 0.0) -> StepOutput:
        view1, view2 = batch.views[0], batch.views[1]
        mask = self.sample_mask(view1.shape[0], generator, view1.device)
        online, keep = self.online_tokens(view1, mask, generator)
        relative = relative_position_embedding(batch.boxes[0], batch.flips[0], batch.boxes[1],
                                               batch.flips[1], self.grid, self.dim)
        prediction = self.predict(online, keep, relative.to(view1.device))
        target = self.target_tokens(view2)
        distributed = dist.is_available() and dist.is_initialized() and (
            dist.get_world_size() > 1)
        loss = unigrad_loss(prediction, target, negative_weight=self.params.negative_weight,
                            all_reduce=all_reduce_mean if distributed else None)
        pooled = online[:, 1:].mean(dim=1) if self.is_vit else online[:, 0]
        return StepOutput(loss, {"loss": loss.detach()}, pooled.detach())

    @torch.no_grad()
    def after_optimizer_step(self, output: StepOutput, progress: float) -> None:
        momentum = cosine_momentum(self.params.momentum_start, self.params.momentum_end,
                                   progress)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_decoder_embed, self.decoder_embed, momentum)
        ema_update(self.target_projector, self.projector, momentum)


__all__ = ["SiameseIM", "SiameseIMConfig", "TokenBatchNorm", "default_min_block_patches"]
