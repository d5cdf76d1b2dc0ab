"""The seed papers' baselines (issue 28): SimCLR's and MoCo v3's losses against hand
computations on tiny tensors, their step on the Siamese base (every masking value),
`mixmask pretrain` of their recipes on real CIFAR-10 images; and every evaluation protocol
on a run of each new method (DINO, SimMIM and iBOT have their own files too)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, parameters_without_gradient, pretrain_recipe_briefly, real_view_pairs

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.methods import build_method
from mixmask.ops.losses.siamese import moco_v3_loss, nt_xent

MASKINGS = ("none", "erase", "mixmask", "unmix", "both")

# --------------------------------------------------------------------------- losses


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_nt_xent_is_the_hand_computed_value():
    """Two anchors on unit vectors, T = 0.5. Anchor z1 = (1, 0): candidates t1 (60 deg,
    cos 0.5), t2 (90 deg, 0) and z2 (90 deg, 0); z1 itself is left out."""
    online = torch.tensor([_unit(0), _unit(90)])
    target = torch.tensor([_unit(60), _unit(90)])
    found = nt_xent(online, target, temperature=0.5)
    first = math.log(math.exp(0.5 / 0.5) + math.exp(0.0) + math.exp(0.0)) - 0.5 / 0.5
    # z2: t1 cos 30 deg, t2 (the positive) 1, z1 0.
    cos30 = math.cos(math.radians(30))
    second = math.log(math.exp(cos30 / 0.5) + math.exp(1 / 0.5) + math.exp(0.0)) - 1 / 0.5
    torch.testing.assert_close(found, torch.tensor([first, second]))


def test_nt_xent_both_directions_averaged_is_simclrs_loss_over_the_2n_views():
    """SimCLR's eq. 1 written over the 2N views of a batch, each anchor against the other
    2N - 1 (a loop over Python floats), equals the mean of nt_xent in the two directions."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    views = [[[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in view.tolist()]
             for view in (first, second)]
    embeddings = views[0] + views[1]
    count, temperature, total = len(embeddings), 0.3, 0.0
    for i in range(count):
        positive = (i + 5) % count
        scores = [sum(a * b for a, b in zip(embeddings[i], embeddings[k], strict=True))
                  / temperature for k in range(count)]
        denominator = sum(math.exp(scores[k]) for k in range(count) if k != i)
        total += -math.log(math.exp(scores[positive]) / denominator)
    ours = 0.5 * (nt_xent(first, second, temperature).mean()
                  + nt_xent(second, first, temperature).mean())
    assert ours.item() == pytest.approx(total / count, rel=1e-5)


def test_moco_v3_loss_is_the_hand_computed_scaled_cross_entropy():
    """q1 = (1, 0), q2 = (0, 1); keys k1 = (1, 0), k2 = (0.6, 0.8); T = 0.5, scaled by 2T."""
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    found = moco_v3_loss(query, key, temperature=0.5)
    first = 2 * 0.5 * (math.log(math.exp(1 / 0.5) + math.exp(0.6 / 0.5)) - 1 / 0.5)
    second = 2 * 0.5 * (math.log(math.exp(0.0) + math.exp(0.8 / 0.5)) - 0.8 / 0.5)
    torch.testing.assert_close(found, torch.tensor([first, second]))
    # No gradient is asked of the keys: they come from the momentum encoder.
    query.requires_grad_(True)
    moco_v3_loss(query, key, 0.5).sum().backward()
    assert query.grad is not None and key.grad is None


def test_nt_xent_sends_gradients_to_both_views_and_refuses_a_bad_temperature():
    online = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3, requires_grad=True)
    nt_xent(online, target, 0.2).mean().backward()
    assert online.grad.abs().sum() > 0 and target.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature must be positive"):
        nt_xent(online, target, 0.0)


# --------------------------------------------------------------------------- methods

TINY = {"simclr": ["method.simclr.proj_hidden_dim=64", "method.simclr.proj_output_dim=32"],
        "mocov3": ["method.mocov3.proj_hidden_dim=64", "method.mocov3.proj_output_dim=32",
                   "method.mocov3.pred_hidden_dim=64"]}


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_every_trainable_parameter_gets_a_gradient_on_real_views(name, masking,
                                                                 cifar10_tarball):
    config = load_config(None, [f"method.name={name}", f"method.masking={masking}",
                                "model.width=0.125", "train.batch_size=16", *TINY[name]])
    torch.manual_seed(0)
    method = build_method(config)
    output = method.training_step(Batch.from_views(*real_view_pairs(cifar10_tarball, "simclr")),
                                  torch.Generator().manual_seed(0), 0.3)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert parameters_without_gradient(method) == []
    if name == "mocov3":  # the momentum encoder learns by EMA only
        assert all(not parameter.requires_grad
                   for parameter in method.target_backbone.parameters())


def test_simclrs_projector_ends_in_a_scale_only_batch_norm_unless_asked_not_to():
    """The reference's last linear_layer: no bias, then BN with center=False (a learnt scale,
    no shift); solo-learn's CIFAR projector ends on a plain Linear."""
    torch.manual_seed(0)
    base = ["method.name=simclr", "model.width=0.125", *TINY["simclr"]]
    projector = build_method(load_config(None, base)).projector
    last_linear, norm = projector[-2], projector[-1]
    assert last_linear.bias is None and isinstance(norm, torch.nn.BatchNorm1d)
    assert norm.weight.requires_grad and not norm.bias.requires_grad
    assert not norm.bias.any()
    solo = build_method(load_config(None, [*base, "method.simclr.output_batch_norm=false"]))
    assert isinstance(solo.projector[-1], torch.nn.Linear) and solo.projector[-1].bias is not None


def test_mocov3_momentum_follows_the_cosine_to_one_and_the_vit_patch_projection_stays():
    config = load_config(ROOT / "configs" / "cifar10" / "mocov3_vit_tiny.yaml",
                         ["train.batch_size=8", *TINY["mocov3"]])
    torch.manual_seed(0)
    method = build_method(config)
    assert not any(p.requires_grad for p in method.backbone.patch_embed.parameters())
    online = [p.detach().clone() for p in method.backbone.blocks.parameters()]
    with torch.no_grad():
        for parameter in method.backbone.blocks.parameters():
            parameter.add_(1.0)
    before = [p.detach().clone() for p in method.target_backbone.blocks.parameters()]
    method.after_step([], progress=0.5)  # m = 1 - (1 - 0.99) * (cos(pi / 2) + 1) / 2
    momentum = 1 - 0.01 * 0.5
    for old, start, new in zip(before, online, method.target_backbone.blocks.parameters(),
                               strict=True):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * (start + 1.0))


@pytest.mark.parametrize("recipe", ["simclr_r18", "mocov3_r18", "mocov3_vit_tiny"])
def test_the_recipes_pretrain_on_real_cifar(recipe, tmp_path, cifar10_tarball):
    """`mixmask pretrain` of each CIFAR-10 recipe, a few steps of 16 real images."""
    small = ["model.width=0.125"] if "r18" in recipe else []
    name = recipe.split("_")[0]
    summary = pretrain_recipe_briefly(recipe, cifar10_tarball, tmp_path / "run", *small,
                                      *TINY[name])
    assert summary["steps"] == 3 and summary["method"] == name
    assert 0 <= summary["knn_top1"] <= 100


# --------------------------------------------------------------------------- evaluation

EVALUATED = {  # recipe -> test-sized overrides
    "simclr_r18": ["model.width=0.125", *TINY["simclr"]],
    "mocov3_vit_tiny": TINY["mocov3"],
    "dino_vit_tiny": ["method.dino.proj_hidden_dim=64", "method.dino.bottleneck_dim=16",
                      "method.dino.num_prototypes=32"],
    "simmim_r18": ["model.width=0.125"],
    "ibot_vit_tiny": ["method.ibot.proj_hidden_dim=64", "method.ibot.bottleneck_dim=16",
                      "method.ibot.num_prototypes=32"],
}


@pytest.mark.parametrize("recipe", sorted(EVALUATED))
def test_every_protocol_evaluates_the_baselines_runs(recipe, tmp_path, cifar10_tarball):
    """Each issue-28 method's run folder through `mixmask knn`, `linear` (the MoCo
    protocol) and `finetune` (1% of the labels): each writes its JSON with its protocol."""
    from mixmask.cli import main

    run = tmp_path / "run"
    pretrain_recipe_briefly(recipe, cifar10_tarball, run, *EVALUATED[recipe])
    assert main(["knn", str(run), "eval.knn_k=20"]) == 0
    assert main(["linear", str(run), "--protocol", "moco", "eval.linear_epochs=1"]) == 0
    assert main(["finetune", str(run), "--labels", "1%", "eval.finetune_epochs=1",
                 "eval.finetune_batch_size=8"]) == 0
    for name in ("knn", "linear_moco", "finetune_1pct"):
        result = json.loads((run / "eval" / f"{name}.json").read_text())
        assert result["protocol"] == name and 0 <= result["top1"] <= 100
