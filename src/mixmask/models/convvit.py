"""ConvMAE's hybrid encoder, "ConvViT" (Gao et al., arXiv 2205.03892; Alpha-VL/ConvMAE
``models_convmae.py``): ``model.backbone: convvit_tiny | convvit_small | convvit_base``.

Three stages: two convolutional stages of conv blocks, each stage opened by a
non-overlapping patch embedding (conv, LayerNorm, GELU), then a transformer stage on the
stage-3 grid (a linear layer, fixed 2-D sin-cos positions, no cls token). A conv block is
``x + conv1x1(dwconv5x5(conv1x1(norm(x))))`` then ``x + mlp(norm(x))`` with 1x1-conv MLPs.

MAE on it (``method.name: mae`` with this backbone: ConvMAE) masks the stage-3 grid and
upsamples the mask to the earlier stages. The **masked convolution**: in each conv block the
visible mask multiplies the features after the first 1x1 conv and before the 5x5 depthwise
conv, so masked content cannot spread into visible positions; the patch embeddings and the
fusion convolutions are non-overlapping and aligned with the mask units, so nothing else
mixes positions. Only visible tokens enter the transformer. The stage-1 and stage-2 outputs,
brought to the stage-3 grid by strided convolutions, are added at the visible tokens
before the final norm (multi-scale fusion).

Geometry: the reference's ImageNet one (``model.stem: imagenet``): patch embeddings of
stride 4, 2, 2 (56, 28, 14 at 224 px; total stride 16). ``model.stem: cifar`` is our
adaptation for 32 px: strides 1, 2, 2 (32, 16, 8: 64 stage-3 tokens, as a ViT with 4 px
patches). ``convvit_small`` and ``convvit_base`` are the reference's widths;
``convvit_tiny`` (64, 128, 192 wide, 3 heads) is ours, for CPU-sized runs.

The encoder's "patch size" (``patch_size``, what MAE patchifies its target at) is its total
stride; its pooled features (``forward``) are the mean of the final-normed stage-3 tokens.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.models.backbones import BackboneTraits, register_backbone
from mixmask.models.vit import init_linear_and_norm_like_mae, sincos_2d_position_embedding
from mixmask.ops.token_masks import gather_tokens

# name -> (widths of the three stages, depths, heads of stage 3)
CONVVITS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], int]] = {
    "convvit_tiny": ((64, 128, 192), (2, 2, 11), 3),  # ours
    "convvit_small": ((128, 256, 384), (2, 2, 11), 6),
    "convvit_base": ((256, 384, 768), (2, 2, 11), 12),
}
STRIDES = {"cifar": (1, 2, 2), "imagenet": (4, 2, 2)}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (per position)."""

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbedding(nn.Sequential):
    """A non-overlapping conv (kernel = stride), LayerNorm, GELU (``PatchEmbed``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, stride, stride=stride),
                         ChannelLayerNorm(out_channels, eps=1e-6), nn.GELU())


class ConvBlock(nn.Module):
    """ConvMAE's conv block (``CBlock``), with the masked convolution."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = ChannelLayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, features: Tensor, visible: Tensor | None = None) -> Tensor:
        """``visible`` [B, 1, H, W] (1 = visible): multiplies the features before the
        depthwise conv, so masked positions contribute nothing to it."""
        mixed = self.conv1(self.norm1(features))
        if visible is not None:
            mixed = mixed * visible
        features = features + self.conv2(self.attn(mixed))
        return features + self.mlp(self.norm2(features))


class ConvViT(nn.Module):
    """ConvMAE's encoder (module docstring). ``forward`` gives pooled features [B, D];
    ``forward_visible`` is MAE's encoder on the visible tokens."""

    has_cls_token = False

    def __init__(self, widths: tuple[int, int, int], depths: tuple[int, int, int],
                 heads: int, *, strides: tuple[int, int, int], image_size: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.strides = strides
        self.patch_size = strides[0] * strides[1] * strides[2]
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the encoder's "
                             f"total stride {self.patch_size}.")
        side = image_size // self.patch_size
        self.grid_size = (side, side)
        self.embed_dim = widths[2]
        self.patch_embed1 = PatchEmbedding(3, widths[0], strides[0])
        self.blocks1 = nn.ModuleList(ConvBlock(widths[0]) for _ in range(depths[0]))
        self.patch_embed2 = PatchEmbedding(widths[0], widths[1], strides[1])
        self.blocks2 = nn.ModuleList(ConvBlock(widths[1]) for _ in range(depths[1]))
        self.patch_embed3 = PatchEmbedding(widths[1], widths[2], strides[2])
        self.patch_embed4 = nn.Linear(widths[2], widths[2])
        position = sincos_2d_position_embedding(side, side, widths[2], cls_token=False)
        self.register_buffer("pos_embed", position[None], persistent=False)
        self.blocks3 = nn.ModuleList(
            Block(widths[2], heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depths[2]))
        # Multi-scale fusion: stage 1 and 2 outputs brought to the stage-3 grid.
        self.stage1_fusion = nn.Conv2d(widths[0], widths[2], strides[1] * strides[2],
                                       stride=strides[1] * strides[2])
        self.stage2_fusion = nn.Conv2d(widths[1], widths[2], strides[2], stride=strides[2])
        self.norm = nn.LayerNorm(widths[2], eps=1e-6)
        # MAE's init for the linear layers and norms (ours for ConvViT: its own init was not
        # read); convolutions keep torch's default.
        init_linear_and_norm_like_mae(self)

    @property
    def pooling_head(self) -> nn.Module:
        """Nothing beyond averaging the normed tokens."""
        return nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_tokens(images).mean(dim=1)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Every stage-3 token, fused and normed: [B, N, D] (no cls token)."""
        return self._encode(images, None)

    def forward_visible(self, images: Tensor, keep_indices: Tensor) -> Tensor:
        """ConvMAE's encoder on the tokens ``keep_indices`` [B, K] keeps (MAE's masking on
        the stage-3 grid), with the masked convolution in stages 1 and 2: [B, K, D]."""
        return self._encode(images, keep_indices)

    def _encode(self, images: Tensor, keep_indices: Tensor | None) -> Tensor:
        visible = None if keep_indices is None else self._visible_map(images, keep_indices)
        stage1 = self.patch_embed1(images)
        visible1 = None if visible is None else _upsample(visible, stage1)
        for block in self.blocks1:
            stage1 = block(stage1, visible1)
        stage2 = self.patch_embed2(stage1)
        visible2 = None if visible is None else _upsample(visible, stage2)
        for block in self.blocks2:
            stage2 = block(stage2, visible2)
        grid = self.patch_embed3(stage2)
        tokens = self.patch_embed4(grid.flatten(2).transpose(1, 2))
        tokens = tokens + self._position_embedding(tuple(grid.shape[-2:]))
        fused = (self.stage1_fusion(stage1).flatten(2).transpose(1, 2)
                 + self.stage2_fusion(stage2).flatten(2).transpose(1, 2))
        if keep_indices is not None:
            tokens, fused = gather_tokens(tokens, keep_indices), gather_tokens(fused, keep_indices)
        for block in self.blocks3:
            tokens = block(tokens)
        return self.norm(tokens + fused)

    def feature_map(self, images: Tensor) -> Tensor:
        """The stage-3 tokens as a map [B, D, h, w], at any input size the total stride
        divides (the dense-transfer heads read it)."""
        tokens = self._encode(images, None)
        side_h, side_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(len(images), self.embed_dim, side_h, side_w)

    def _position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The fixed 2-D sin-cos embedding of the stage-3 grid: the built one, or, for
        another input size (detection, segmentation), the same formula on that grid, which
        is exact since the embedding is not learned."""
        if grid == self.grid_size:
            return self.pos_embed
        position = sincos_2d_position_embedding(*grid, self.embed_dim, cls_token=False)
        return position[None].to(self.pos_embed)

    def _visible_map(self, images: Tensor, keep_indices: Tensor) -> Tensor:
        """[B, 1, g, g]: 1 at the kept stage-3 positions."""
        side = self.grid_size[0]
        visible = torch.zeros(images.shape[0], side * side, device=images.device,
                              dtype=images.dtype)
        visible.scatter_(1, keep_indices, 1.0)
        return visible.view(-1, 1, side, side)


def _upsample(visible: Tensor, features: Tensor) -> Tensor:
    """The stage-3 visible map repeated up to ``features``' grid (nearest: whole units)."""
    return F.interpolate(visible, size=features.shape[-2:], mode="nearest").to(features.dtype)


def convvit_stride(model_config, image_size: int) -> int:
    """The token stride (MAE's patch size) of a ConvViT from the config."""
    first, second, third = STRIDES[model_config.stem]
    return first * second * third


def build_convvit(name: str, *, stem: str = "imagenet", image_size: int = 224
                  ) -> tuple[ConvViT, int]:
    if name not in CONVVITS:
        raise ValueError(f"unknown ConvViT {name!r}; choose from {sorted(CONVVITS)}")
    widths, depths, heads = CONVVITS[name]
    model = ConvViT(widths, depths, heads, strides=STRIDES[stem], image_size=image_size)
    return model, widths[2]


def _check_convvit(model_config) -> None:
    if model_config.width != 1.0:
        raise ConfigError(f"model.width scales ResNets; {model_config.backbone}'s widths are "
                          f"its own ({', '.join(CONVVITS)}).")


def _convvit_builder(name: str):
    def build(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
        return build_convvit(name, stem=model_config.stem, image_size=image_size or 224)

    build.__doc__ = f"ConvMAE's {name} (model.stem: cifar is our 32 px adaptation)."
    return build


for _name in CONVVITS:
    register_backbone(_name, BackboneTraits(token_stride=convvit_stride,
                                            check=_check_convvit))(_convvit_builder(_name))
