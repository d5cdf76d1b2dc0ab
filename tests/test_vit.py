"""Tests for mixmask.models.vit and mixmask.ops.token_masks, each against an independent
calculation (hand-written numbers, timm's own forward, or position-coded inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import seeded

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.errors import ConfigError
from mixmask.methods import build_method
from mixmask.models import backbone_names, build_backbone
from mixmask.models.vit import (
    VIT_ARCHS,
    build_vit,
    default_patch_size,
    patchify,
    sincos_2d_position_embedding,
    unpatchify,
)
from mixmask.ops.token_masks import gather_tokens, mae_random_masking, num_kept, unshuffle

timm = pytest.importorskip("timm")



@pytest.fixture(scope="module")
def tiny():
    """vit_tiny at 32 px, patch 4 (8x8 = 64 patches), in eval mode, with an input."""
    torch.manual_seed(0)
    model, dim = build_vit("vit_tiny", image_size=32)
    images = torch.randn(2, 3, 32, 32, generator=seeded(1))
    return model.eval(), dim, images


# -- position embeddings ------------------------------------------------------------------
def test_sincos_matches_a_hand_computed_2x2_grid_of_dim_8():
    embedding = sincos_2d_position_embedding(2, 2, 8, cls_token=True)
    assert embedding.shape == (5, 8) and embedding.dtype == torch.float32
    assert torch.equal(embedding[0], torch.zeros(8))
    # dim 8: two frequencies per half, 1 and 10000^(-1/2) = 0.01. Tokens row-major; MAE's
    # first half encodes the column index, the second the row index.
    expected = []
    for row in range(2):
        for col in range(2):
            expected.append([math.sin(col), math.sin(0.01 * col), math.cos(col),
                             math.cos(0.01 * col), math.sin(row), math.sin(0.01 * row),
                             math.cos(row), math.cos(0.01 * row)])
    assert torch.allclose(embedding[1:], torch.tensor(expected), atol=1e-7)


def test_sincos_non_square_grid_orders_tokens_row_major():
    embedding = sincos_2d_position_embedding(2, 3, 4, cls_token=False)
    assert embedding.shape == (6, 4)
    # dim 4: one frequency (1) per half: [sin(col), cos(col), sin(row), cos(row)].
    token = 1 * 3 + 2  # row 1, column 2
    expected = torch.tensor([math.sin(2), math.cos(2), math.sin(1), math.cos(1)])
    assert torch.allclose(embedding[token], expected, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_embedding(2, 2, 6)


def test_the_model_holds_the_frozen_sincos_embedding(tiny):
    model, _, _ = tiny
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.shape == (1, 65, 192)
    assert torch.equal(model.pos_embed[0], sincos_2d_position_embedding(8, 8, 192))
    assert "pos_embed" not in {name for name, p in model.named_parameters() if p.requires_grad}


def test_mae_initialisation():
    model, _ = build_vit("vit_tiny", image_size=32)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    fc1 = model.blocks[0].mlp.fc1
    assert torch.equal(fc1.bias, torch.zeros_like(fc1.bias))
    # Xavier uniform: bound sqrt(6 / (fan_in + fan_out)); the patch embedding counts as a
    # Linear of 3*4*4 inputs and 192 outputs.
    assert fc1.weight.abs().max() <= math.sqrt(6 / (192 + 768))
    assert fc1.weight.abs().max() > 0.9 * math.sqrt(6 / (192 + 768))
    proj = model.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6 / (48 + 192))
    assert proj.abs().max() > 0.9 * math.sqrt(6 / (48 + 192))
    assert 0.015 < model.cls_token.std() < 0.025


# -- patches ------------------------------------------------------------------------------
def test_patchify_hand_case_and_inverse():
    # A 2-channel 4x4 image with value 100*c + 10*row + col; patch 2.
    image = torch.tensor([[[100 * c + 10 * y + x for x in range(4)] for y in range(4)]
                          for c in range(2)], dtype=torch.float32)[None]
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 8)
    # Patch 1 is the top-right one (rows 0-1, columns 2-3); inside, (row, column, channel).
    assert patches[0, 1].tolist() == [2, 102, 3, 103, 12, 112, 13, 113]
    assert patches[0, 2].tolist() == [20, 120, 21, 121, 30, 130, 31, 131]
    assert torch.equal(unpatchify(patches, 2), image)
    images = torch.randn(2, 3, 8, 12, generator=seeded())
    assert torch.equal(unpatchify(patchify(images, 4), 4, grid_size=(2, 3)), images)
    with pytest.raises(ValueError, match="square"):
        unpatchify(patchify(images, 4), 4)


# -- building -----------------------------------------------------------------------------
def test_every_vit_is_registered_and_builds_at_32px(tiny):
    assert set(VIT_ARCHS) <= set(backbone_names())
    model, dim, _ = tiny
    assert (dim, model.embed_dim, model.depth, model.patch_size) == (192, 192, 12, 4)
    assert model.num_patches == 64 and len(model.blocks) == 12
    assert model.blocks[0].attn.num_heads == 3
    for name, (width, heads) in {"vit_small": (384, 6), "vit_base": (768, 12)}.items():
        config = load_config(None, [f"model.backbone={name}"])
        model, dim = build_backbone(config.model, image_size=32)
        assert dim == width and model.num_patches == 64
        assert model.blocks[0].attn.num_heads == heads and len(model.blocks) == 12


def test_default_patch_size_and_its_validation():
    assert [default_patch_size(s) for s in (32, 64, 96, 224)] == [4, 8, 8, 16]
    config = load_config(None, ["model.backbone=vit_tiny", "data.image_size=64"])
    assert build_backbone(config.model, image_size=64)[0].patch_size == 8
    with pytest.raises(ConfigError, match=r"'model.patch_size' \(5\) must divide"):
        load_config(None, ["model.backbone=vit_tiny", "model.patch_size=5"])
    with pytest.raises(ConfigError, match="picks 16"):
        load_config(None, ["model.backbone=vit_tiny", "data.image_size=232"])
    with pytest.raises(ConfigError, match="'model.patch_size' must be 0 or more"):
        load_config(None, ["model.patch_size=-4"])
    with pytest.raises(ConfigError, match="'model.drop_path_rate' must lie in"):
        load_config(None, ["model.drop_path_rate=1.0"])
    with pytest.raises(ConfigError, match="model.global_pool"):
        load_config(None, ["model.global_pool=max"])
    # A ResNet ignores the patch size.
    load_config(None, ["model.patch_size=5"])


def test_vit_tiny_parameter_count_at_224_patch_16():
    model, _ = build_vit("vit_tiny", image_size=224)
    width, blocks = 192, 12
    per_block = 12 * width**2 + 13 * width  # qkv, proj, fc1, fc2 with biases; 2 LayerNorms
    embed = width * 3 * 16 * 16 + width
    expected = blocks * per_block + embed + width + 197 * width + 2 * width  # cls, pos, norm
    count = sum(p.numel() for p in model.parameters())
    assert count == expected == 5_524_416
    # With timm's 1000-class head that is timm's ~5.72M for vit_tiny_patch16_224.
    assert count + width * 1000 + 1000 == 5_717_416


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_state_dict_is_timms_and_the_pooled_forward_matches_timm(pool):
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model, _ = build_vit("vit_tiny", image_size=32, global_pool=pool)
    reference = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12,
                                  num_heads=3, global_pool=pool, num_classes=0,
                                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    reference.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32, generator=seeded(2))
    with torch.no_grad():
        features = model.eval()(images)
        assert features.shape == (2, 192)
        assert torch.allclose(features, reference.eval()(images), atol=1e-5)
        assert torch.allclose(model.forward_tokens(images),
                              reference.forward_features(images), atol=1e-5)


def test_global_pool_avg_and_token_differ(tiny):
    model, _, images = tiny
    avg, _ = build_vit("vit_tiny", image_size=32, global_pool="avg")
    # The same weights; the final LayerNorm is `norm` before pooling for token, `fc_norm`
    # after it for avg (timm's layout).
    weights = {key.replace("norm.", "fc_norm.") if key.startswith("norm.") else key: value
               for key, value in model.state_dict().items()}
    avg.load_state_dict(weights, strict=True)
    with torch.no_grad():
        token_features, avg_features = model(images), avg.eval()(images)
    assert avg_features.shape == token_features.shape == (2, 192)
    assert not torch.allclose(avg_features, token_features, atol=1e-3)


# -- MAE masking --------------------------------------------------------------------------
def test_num_kept_truncates_like_mae():
    assert [num_kept(n, 0.75) for n in (64, 196, 256)] == [16, 49, 64]
    assert [round(0.25 * n) for n in (64, 196, 256)] == [16, 49, 64]
    assert num_kept(64, 0.6) == 25  # int(25.6), where round() would give 26
    with pytest.raises(ValueError):
        num_kept(4, 0.9)


def test_mae_random_masking_counts_and_noise_order():
    keep, mask, restore = mae_random_masking(4, 64, 0.75, seeded(3))
    assert keep.shape == (4, 16) and mask.shape == restore.shape == (4, 64)
    assert keep.dtype == restore.dtype == torch.long and mask.dtype == torch.float32
    noise = torch.rand(4, 64, generator=seeded(3))  # the same draw
    for row in range(4):
        assert len(set(keep[row].tolist())) == 16
        kept_noise = noise[row, keep[row]]
        assert torch.all(kept_noise[1:] > kept_noise[:-1])  # in ascending noise order
        masked = mask[row].bool()
        assert int(masked.sum()) == 48 and not masked[keep[row]].any()
        assert kept_noise.max() < noise[row, masked].min()  # the 16 smallest are kept
    again = mae_random_masking(4, 64, 0.75, seeded(3))
    assert all(torch.equal(a, b) for a, b in zip((keep, mask, restore), again, strict=True))
    assert not torch.equal(keep, mae_random_masking(4, 64, 0.75, seeded(4))[0])


def test_keep_mask_tokens_and_unshuffle_restore_patch_order():
    batch, patches, dim = 3, 64, 2
    keep, mask, restore = mae_random_masking(batch, patches, 0.75, seeded(5))
    # Each token holds its patch index (twice, to carry a feature dimension).
    coded = torch.arange(patches, dtype=torch.float32)[None, :, None].expand(batch, -1, dim)
    kept = gather_tokens(coded, keep)
    assert torch.equal(kept[..., 0], keep.float())
    mask_tokens = torch.full((batch, patches - keep.shape[1], dim), -1.0)
    restored = unshuffle(torch.cat([kept, mask_tokens], dim=1), restore)
    expected = torch.where(mask.bool(), -1.0, torch.arange(patches, dtype=torch.float32))
    assert torch.equal(restored[..., 0], expected) and torch.equal(restored[..., 1], expected)


# -- token entry points -------------------------------------------------------------------
def test_forward_visible_with_every_token_equals_forward_tokens(tiny):
    model, _, images = tiny
    with torch.no_grad():
        tokens = model.forward_tokens(images)
        assert tokens.shape == (2, 65, 192)
        in_order = torch.arange(64).expand(2, -1)
        assert torch.allclose(model.forward_visible(images, in_order), tokens, atol=1e-5)
        # Shuffled: attention is permutation-equivariant, so the same tokens, permuted.
        shuffled = torch.argsort(torch.rand(2, 64, generator=seeded(6)), dim=1)
        visible = model.forward_visible(images, shuffled)
        assert torch.allclose(visible[:, 0], tokens[:, 0], atol=1e-5)
        assert torch.allclose(visible[:, 1:], gather_tokens(tokens[:, 1:], shuffled), atol=1e-5)
        keep, _, _ = mae_random_masking(2, 64, 0.5, seeded(7))
        assert model.forward_visible(images, keep).shape == (2, 33, 192)


def test_forward_with_a_zero_mask_equals_forward_tokens(tiny):
    model, _, images = tiny
    token = torch.randn(192, generator=seeded(8))
    with torch.no_grad():
        tokens = model.forward_tokens(images)
        for layer in (0, 5, 12):
            out = model.forward_with_mask_token(images, torch.zeros(2, 64), token, layer)
            assert torch.allclose(out, tokens, atol=1e-5)
    with pytest.raises(ValueError, match="0..12"):
        model.forward_with_mask_token(images, torch.zeros(2, 64), token, 13)


@pytest.mark.parametrize("layer", [0, 3, 12])
def test_mask_token_is_added_to_the_masked_positions_only(tiny, layer):
    model, _, images = tiny
    token = torch.randn(192, generator=seeded(9))
    mask = (torch.rand(2, 8, 8, generator=seeded(10)) < 0.6).float()
    # What enters block `layer` (or the final norm at layer 12), with and without a mask.
    target = model.blocks[layer] if layer < 12 else model.norm
    seen = []
    hook = target.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            clean = model.forward_with_mask_token(images, torch.zeros_like(mask), token, layer)
            masked = model.forward_with_mask_token(images, mask, token, layer)
    finally:
        hook.remove()
    difference = seen[1] - seen[0]
    flat = mask.flatten(1).bool()
    assert torch.allclose(difference[:, 0], torch.zeros(2, 192))  # cls untouched
    assert torch.allclose(difference[:, 1:][flat], token.expand(int(flat.sum()), -1), atol=1e-5)
    assert torch.allclose(difference[:, 1:][~flat], torch.zeros(1, 192), atol=1e-6)
    assert not torch.allclose(masked, clean, atol=1e-3)
    if layer == 0:  # the very first block mixes the token into every output position
        assert not torch.allclose(masked[:, 1:][~flat], clean[:, 1:][~flat], atol=1e-3)


# -- through a method ---------------------------------------------------------------------
def test_a_siamese_method_runs_on_vit_tiny():
    torch.manual_seed(0)
    config = load_config(None, [
        "model.backbone=vit_tiny", "method.name=byol", "method.masking=mixmask",
        "method.mask.grid_size=4", "method.byol.proj_hidden_dim=64",
        "method.byol.proj_output_dim=32", "method.byol.pred_hidden_dim=32"])
    method = build_method(config)
    images = torch.randn(4, 3, 32, 32, generator=seeded(11))
    with torch.no_grad():
        assert method.eval().features(images).shape == (4, 192)
    method.train()
    views = (images, torch.randn(4, 3, 32, 32, generator=seeded(12)))
    output = method.training_step(Batch.from_views(*views), seeded(0))
    assert torch.isfinite(output.loss) and output.features.shape == (4, 192)
    output.loss.backward()
    trainable = [p for p in method.backbone.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert method.backbone.pos_embed.grad is None
    method.after_optimizer_step(output, 0.5)
    # The EMA leaves the frozen embedding alone: the target's stays bit-identical.
    assert torch.equal(method.target_backbone.pos_embed, method.backbone.pos_embed)
