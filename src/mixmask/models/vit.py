"""Vision Transformers for the backbone registry: ``model.backbone: vit_tiny | vit_small |
vit_base``, set up as MAE's encoder (He et al., arXiv 2111.06377; ``models_mae.py`` in
facebookresearch/mae) and usable by every method through ``forward(images) -> [B, D]``.

Built by timm's ``VisionTransformer`` (timm is needed only when a ViT is built), whose
modules :class:`ViTBackbone` adopts under timm's names (``cls_token``, ``pos_embed``,
``patch_embed``, ``blocks``, ``norm``, ``fc_norm``), so its state dict loads strictly into
``timm.models.vision_transformer.VisionTransformer(..., num_classes=0)`` of the same
shape. Differences from timm's defaults, all MAE's:

- fixed 2-D sin-cos position embeddings (:func:`sincos_2d_position_embedding`), frozen;
- MAE's initialisation (``MaskedAutoencoderViT.initialize_weights``), not timm's;
- LayerNorm eps 1e-6, qkv bias, MLP ratio 4 (``mae_vit_base_patch16``).

Besides the pooled forward, the masked-image-modeling entry points: all tokens
(:meth:`ViTBackbone.forward_tokens`), MAE's encoder on the visible patches only
(:meth:`ViTBackbone.forward_visible`), and A2MIM's residual mask token added at a chosen
depth or SimMIM's replacing one (:meth:`ViTBackbone.forward_with_mask_token`). Pixels to
patches and back: :func:`patchify`, :func:`unpatchify`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from mixmask.errors import ConfigError
from mixmask.models.backbones import BackboneTraits, register_backbone
from mixmask.ops.token_masks import gather_tokens

# name -> (embed_dim, depth, num_heads): DeiT's tiny / small and ViT-B (timm's vit_*_patch16).
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def default_patch_size(image_size: int) -> int:
    """``model.patch_size=0``: 4 below 64 px (8x8 patches at 32 px), 8 below 224 px (8x8 at
    64 px), 16 from 224 px (ViT-B/16's 14x14)."""
    return 4 if image_size < 64 else 8 if image_size < 224 else 16


def resolve_patch_size(patch_size: int, image_size: int) -> int:
    return patch_size or default_patch_size(image_size)


def validate_vit(model_config, image_size: int) -> None:
    """The ViT keys' cross-checks (called by :func:`mixmask.config.validate`); nothing for a
    backbone that is not a ViT."""

    if model_config.backbone not in VIT_ARCHS:
        return
    patch = resolve_patch_size(model_config.patch_size, image_size)
    if image_size % patch:
        if model_config.patch_size:
            raise ConfigError(f"'model.patch_size' ({patch}) must divide data.image_size "
                              f"({image_size}); set it to a divisor of {image_size}.")
        raise ConfigError(f"'model.patch_size' is 0, which picks {patch} for data.image_size "
                          f"{image_size}, but {patch} does not divide {image_size}; set "
                          f"model.patch_size to a divisor of {image_size}.")


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int,
                                 cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [(1 +) grid_h * grid_w, dim], float32, tokens
    in row-major patch order (the order of timm's and MAE's patch embedding).

    MAE (``util/pos_embed.py: get_2d_sincos_pos_embed``, after MoCo v3, arXiv
    2104.02057): half the channels encode one coordinate and half the other, each half being
    ``[sin(pos * omega_k), cos(pos * omega_k)]`` with ``omega_k = 10000^(-k / (dim / 4))``,
    k = 0 .. dim/4 - 1 (the Transformer's frequencies). Which coordinate comes first
    follows the code, not its comments: MAE stacks ``np.meshgrid(grid_w, grid_h)`` ("w goes
    first") and encodes ``grid[0]``, which holds the *column* (w) index, into the first
    half it calls ``emb_h``; the row (h) index fills the second half. With ``cls_token`` a
    zero row is prepended for the cls token, as MAE's.

    Computed in float64 and rounded to float32 once (MAE: float32 NumPy; the two agree to
    float32 rounding).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim divisible by 4, got {dim}.")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    embedding = torch.cat([_sincos_1d(cols.flatten(), dim // 2),
                           _sincos_1d(rows.flatten(), dim // 2)], dim=1)
    if cls_token:
        embedding = torch.cat([embedding.new_zeros(1, dim), embedding], dim=0)
    return embedding.float()


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    frequencies = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def init_linear_and_norm_like_mae(network: nn.Module) -> None:
    """MAE's ``initialize_weights`` for every Linear (xavier-uniform, bias 0) and LayerNorm
    (1, 0) of ``network``, in ``modules()`` order (the order its random draws follow)."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p * p * C], patches row-major, each flattened in (row in
    patch, column in patch, channel) order: MAE's layout (``models_mae.py: patchify``), so
    that a decoder's per-patch output and norm_pix targets match the reference's."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size "
                         f"{height}x{width}.")
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # B, gh, gw, p, q, C
    return patches.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int,
               grid_size: tuple[int, int] | None = None) -> Tensor:
    """The inverse of :func:`patchify`: [B, N, p * p * C] -> [B, C, H, W]. ``grid_size``
    (patch rows, patch columns) defaults to a square grid, as MAE's."""
    batch, num_patches, patch_dim = patches.shape
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches are no square grid; pass grid_size.")
        grid_size = (side, side)
    grid_h, grid_w = grid_size
    channels = patch_dim // (patch_size * patch_size)
    if grid_h * grid_w != num_patches or channels * patch_size * patch_size != patch_dim:
        raise ValueError(f"patches {tuple(patches.shape)} do not fit a {grid_h}x{grid_w} grid "
                         f"of {patch_size}x{patch_size} patches.")
    images = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    images = images.permute(0, 5, 1, 3, 2, 4)  # B, C, gh, p, gw, q
    return images.reshape(batch, channels, grid_h * patch_size, grid_w * patch_size)


class ViTBackbone(nn.Module):
    """A ViT with a cls token whose ``forward(images)`` gives the pooled feature [B, D].

    ``global_pool``: ``"token"``: the cls token after the final LayerNorm ``norm`` (MAE's
    pretraining encoder; its linear probe). ``"avg"``: timm's semantics, which are MAE's
    fine-tuning model's (``models_vit.py`` with ``global_pool=True``): the final LayerNorm
    moves after pooling (``fc_norm``), the patch tokens (not the cls token) are averaged,
    and ``norm`` is the identity, so the token outputs below are then not normalised. A MIM
    method that wants MAE's normalised encoder tokens uses ``"token"``.

    Not supported (MAE pretraining does not use them either): dropout after the position
    embedding, patch dropout, gradient checkpointing, other input sizes than the built one.
    """

    has_cls_token = True

    def __init__(self, embed_dim: int, depth: int, num_heads: int, *, image_size: int = 224,
                 patch_size: int = 16, global_pool: str = "token", drop_path_rate: float = 0.0):
        super().__init__()
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:

            raise ConfigError("ViT backbones need timm; install it with "
                              "`pip install 'timm>=1.0,<2'`.") from None
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}.")
        # weight_init="skip": timm's init is replaced by MAE's below.
        timm_vit = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, class_token=True,
            global_pool=global_pool, num_classes=0, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), weight_init="skip")
        self.patch_embed = timm_vit.patch_embed
        self.cls_token = timm_vit.cls_token
        self.pos_embed = timm_vit.pos_embed
        self.blocks = timm_vit.blocks
        self.norm = timm_vit.norm
        self.fc_norm = timm_vit.fc_norm
        self.global_pool = global_pool
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self._init_like_mae()

    def _init_like_mae(self) -> None:
        # MAE, models_mae.py: MaskedAutoencoderViT.initialize_weights / _init_weights.
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_position_embedding(
                *self.grid_size, self.embed_dim, cls_token=True).unsqueeze(0))
        self.pos_embed.requires_grad_(False)
        # Xavier on the [D, C*p*p] view, as for the equivalent nn.Linear: on the 4-D conv
        # weight, fan_out would count the p*p receptive field too. The conv bias keeps
        # PyTorch's default, as in MAE.
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))
        # MAE: timm's trunc_normal_(std=.02) with cutoff 2 is effectively normal(0, .02).
        nn.init.normal_(self.cls_token, std=0.02)
        init_linear_and_norm_like_mae(self)

    # -- finetuning -----------------------------------------------------------------------
    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth (Huang et al. 2016) on every block's two residual branches, rising
        linearly from 0 at the first block to ``rate`` at the last: timm's and MAE's
        finetuning rule (``drop_path_rate``, ``models_vit.py``). No parameters change."""
        from timm.layers import DropPath

        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must lie in [0, 1), got {rate}.")
        for index, block in enumerate(self.blocks):
            block_rate = rate * index / max(self.depth - 1, 1)
            for name in ("drop_path1", "drop_path2"):
                setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())

    def set_global_pool(self, global_pool: str) -> None:
        """Switch the pooling after training, as MAE's finetuning does when it loads a
        pretrained encoder into ``global_pool=True`` (``main_finetune.py``, strict=False):
        for ``"avg"`` the pretrained final ``norm`` is dropped and a fresh ``fc_norm``
        (ones, zeros) follows the average of the patch tokens; for ``"token"`` the reverse
        (a fresh ``norm``, no ``fc_norm``). The same pooling is a no-op."""
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}.")
        if global_pool == self.global_pool:
            return
        fresh = nn.LayerNorm(self.embed_dim, eps=1e-6).to(self.cls_token.device)
        if global_pool == "avg":
            self.norm, self.fc_norm = nn.Identity(), fresh
        else:
            self.norm, self.fc_norm = fresh, nn.Identity()
        self.global_pool = global_pool

    # -- pieces ---------------------------------------------------------------------------
    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch tokens plus their position embeddings, without the cls token: [B, N, D].
        At another input size than the built one (DINO's local crops, ViTDet's larger
        inputs), any size the patch divides, the position embedding is resampled to the
        input's grid (bicubic, timm's ``resample_abs_pos_embed``; DINO's
        ``interpolate_pos_encoding`` and ViTDet, arXiv 2203.16527 sec. 4.1, do the same)."""
        if tuple(images.shape[-2:]) == tuple(self.patch_embed.img_size):
            return self.patch_embed(images) + self.pos_embed[:, 1:]
        from timm.layers import resample_abs_pos_embed

        grid = self.patch_embed.proj(images)
        patches = self.patch_embed.norm(grid.flatten(2).transpose(1, 2))
        position = resample_abs_pos_embed(self.pos_embed, list(grid.shape[-2:]),
                                          list(self.grid_size), num_prefix_tokens=1)
        return patches + position[:, 1:]

    def prepend_cls(self, patch_tokens: Tensor) -> Tensor:
        # The cls token's position embedding is the zero row; added anyway, as MAE and timm.
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        return torch.cat([cls, patch_tokens], dim=1)

    def pool(self, tokens: Tensor) -> Tensor:
        """[B, 1 + N, D] tokens (as the forward_* methods return them) -> [B, D]."""
        pooled = tokens[:, 0] if self.global_pool == "token" else tokens[:, 1:].mean(dim=1)
        return self.fc_norm(pooled)

    # -- entry points ---------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.forward_tokens(images))

    def forward_tokens(self, images: Tensor) -> Tensor:
        """All tokens after the blocks and ``norm``: [B, 1 + N, D] (cls first)."""
        return self.norm(self.blocks(self.prepend_cls(self.embed_patches(images))))

    def feature_map(self, images: Tensor) -> Tensor:
        """The patch tokens after the blocks and ``norm`` as a map [B, D, h, w], at any input
        size the patch divides (:meth:`embed_patches` resamples the position embedding)."""
        side_h, side_w = (side // self.patch_size for side in images.shape[-2:])
        tokens = self.forward_tokens(images)[:, 1:]
        return tokens.transpose(1, 2).reshape(len(images), self.embed_dim, side_h, side_w)

    @property
    def pooling_head(self) -> nn.Module:
        """The LayerNorm after average pooling (``fc_norm``; the identity for token
        pooling): what a method that never pools leaves without a gradient."""
        return self.fc_norm

    def forward_visible(self, images: Tensor, keep_indices: Tensor) -> Tensor:
        """MAE's encoder (arXiv 2111.06377, sec. 3 "MAE encoder"; ``forward_encoder``):
        position embeddings are added to all patches, then only ``keep_indices`` [B, K]
        (e.g. from :func:`mixmask.ops.token_masks.mae_random_masking`) are kept, in that order,
        behind the cls token: [B, 1 + K, D]."""
        visible = gather_tokens(self.embed_patches(images), keep_indices)
        return self.norm(self.blocks(self.prepend_cls(visible)))

    def forward_with_mask_token(self, images: Tensor, mask: Tensor, mask_token: Tensor,
                                layer: int = 0, *, replace: bool = False) -> Tensor:
        """All tokens [B, 1 + N, D], with ``mask_token`` [D] added to the masked patches'
        tokens (``mask`` [B, N] or [B, grid_h, grid_w], 1 = masked) just before block
        ``layer``: 0 = right after the patch and position embedding, ``depth`` = after the
        last block (before ``norm``).

        ``replace=True`` (``layer`` 0 only): SimMIM's token (Xie et al., arXiv 2111.09886,
        sec. 3.1; ``models/simmim.py: VisionTransformerForSimMIM.forward``), which takes the
        place of the masked patches' embeddings before the position embedding is added, so
        a masked patch keeps its position and nothing of its pixels.

        A2MIM (Li et al., arXiv 2205.13943) for ViTs, as its reference runs:
        openmixup ``SimMIMViT.forward_mask`` with ``replace=False`` (the A2MIM configs'
        "residual mask token", ``configs/selfsup/_base_/models/a2mim/vit_base.py``), i.e.
        ``x + m * token``: the token is added, the patch's features stay (SimMIM's default
        ``replace=True`` would overwrite them). ``mask_gamma`` is not applied (A2MIM's ViT
        configs leave ``mask_init`` at 0). The reference numbers the depth differently:
        its ``mask_layer=0`` adds the token before the position embedding and its
        ``mask_layer=l >= 1`` before block l - 1; since both sums are additions, its
        ``mask_layer=l`` equals ``layer=max(l - 1, 0)`` here (its ViT-B runs: 0 -> 0).
        """
        if not 0 <= layer <= self.depth:
            raise ValueError(f"layer must lie in 0..{self.depth}, got {layer}.")
        if replace and layer != 0:
            raise ValueError(f"replace=True puts the token at layer 0, got layer {layer}.")
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[1] != self.num_patches:
            raise ValueError(f"mask has {mask.shape[1]} positions; this ViT has "
                             f"{self.num_patches} patches.")
        if replace:
            patches = self.patch_embed(images)
            patches = torch.where(mask.bool()[..., None],
                                  mask_token.reshape(1, 1, -1).to(patches.dtype), patches)
            return self.norm(self.blocks(self.prepend_cls(patches + self.pos_embed[:, 1:])))
        tokens = self.prepend_cls(self.embed_patches(images))
        # No token on the cls position (the reference adds to x[:, 1:] only).
        weights = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
        token_update = weights.to(tokens.dtype)[..., None] * mask_token.reshape(1, 1, -1)
        for index, block in enumerate(self.blocks):
            if index == layer:
                tokens = tokens + token_update
            tokens = block(tokens)
        if layer == self.depth:
            tokens = tokens + token_update
        return self.norm(tokens)


def build_vit(name: str, *, image_size: int = 224, patch_size: int = 0,
              global_pool: str = "token", drop_path_rate: float = 0.0,
              ) -> tuple[ViTBackbone, int]:
    """Return ``(backbone, feature_dim)`` for ``name`` in :data:`VIT_ARCHS`;
    ``patch_size=0`` picks :func:`default_patch_size` for ``image_size``."""
    if name not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {name!r}; choose from {sorted(VIT_ARCHS)}")
    embed_dim, depth, num_heads = VIT_ARCHS[name]
    patch = resolve_patch_size(patch_size, image_size)
    if image_size % patch:
        raise ValueError(f"patch size {patch} does not divide the image size {image_size}.")
    model = ViTBackbone(embed_dim, depth, num_heads, image_size=image_size, patch_size=patch,
                        global_pool=global_pool, drop_path_rate=drop_path_rate)
    return model, embed_dim


def _vit_builder(name: str):
    def build(model_config, image_size: int | None = None) -> tuple[nn.Module, int]:
        size = 224 if image_size is None else image_size
        validate_vit(model_config, size)
        return build_vit(name, image_size=size, patch_size=model_config.patch_size,
                         global_pool=model_config.global_pool,
                         drop_path_rate=model_config.drop_path_rate)

    embed_dim, depth, num_heads = VIT_ARCHS[name]
    build.__doc__ = (f"{name}: width {embed_dim}, {depth} blocks, {num_heads} heads "
                     "(model.patch_size, model.global_pool, model.drop_path_rate).")
    return build


def _vit_token_stride(model_config, image_size: int) -> int:
    return resolve_patch_size(model_config.patch_size, image_size)


for _name, (_, _depth, _) in VIT_ARCHS.items():
    register_backbone(_name, BackboneTraits(tokens=True, blocks=_depth,
                                            token_stride=_vit_token_stride))(_vit_builder(_name))
