"""Every Siamese base x every masking strategy (mixmask.methods.*): the shared step, the
loss assembly against hand-assembled terms, gradient routing, and collapse guards on real
CIFAR images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.methods import build_method, method_class, method_names
from mixmask.methods.common import cosine_momentum
from mixmask.methods.siamese.base import Embedding, SiameseMethod
from mixmask.ops.mixing import permutation_partner, sample_mixmask, sample_unmix
from mixmask.ops.optim import build_optimizer, param_groups_for_lars

BASES = ("mocov2", "byol", "simsiam", "barlow_twins", "vicreg", "simclr", "mocov3", "dino")
MASKINGS = ("none", "erase", "mixmask", "unmix", "both")
# Small heads so a step takes milliseconds.
TINY_HEADS = [f"method.{base}.{key}={dim}" for base, keys in {
    "mocov2": ("proj_hidden_dim", "proj_output_dim"),
    "byol": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
    "simsiam": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
    "barlow_twins": ("proj_hidden_dim", "proj_output_dim"),
    "vicreg": ("proj_hidden_dim", "proj_output_dim"),
    "simclr": ("proj_hidden_dim", "proj_output_dim"),
    "mocov3": ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"),
    "dino": ("proj_hidden_dim", "bottleneck_dim", "num_prototypes"),
}.items() for key, dim in zip(keys, (64, 32, 32), strict=False)]


def tiny_config(base: str, masking: str = "none", *overrides: str):
    return load_config(None, ["model.width=0.125", "train.batch_size=8",
                              "method.mocov2.queue_size=64", *TINY_HEADS,
                              f"method.name={base}", f"method.masking={masking}", *overrides])


def tiny_method(base: str, masking: str = "none", *overrides: str) -> SiameseMethod:
    torch.manual_seed(0)
    return build_method(tiny_config(base, masking, *overrides))


def random_views(batch: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=generator),
            torch.randn(batch, 3, 32, 32, generator=generator))


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("base", BASES)
def test_every_base_with_every_masking_trains_a_step(base, masking):
    method = tiny_method(base, masking)
    output = method.training_step(Batch.from_views(*random_views()),
                                  torch.Generator().manual_seed(0))
    assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    assert output.features.shape == (8, method.feature_dim)
    assert not output.features.requires_grad
    output.loss.backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    method.after_optimizer_step(output, 0.5)
    expected_logs = {"none": {"loss_clean"}, "erase": {"loss_erased"},
                     "mixmask": {"loss_clean", "loss_mixmask", "lambda_mixmask"},
                     "unmix": {"loss_clean", "loss_unmix", "lambda_unmix"},
                     "both": {"loss_clean", "loss_mixmask", "loss_unmix"}}[masking]
    assert expected_logs <= set(output.logs)


def test_the_registry_holds_every_base():
    assert set(BASES) <= set(method_names())
    assert all(issubclass(method_class(base), SiameseMethod) for base in BASES)


@pytest.mark.parametrize("base", ["mocov2", "byol"])
def test_target_network_gets_no_gradient_and_follows_the_ema(base):
    method = tiny_method(base, "mixmask")
    target_before = [p.clone() for p in method.target_backbone.parameters()]
    online_before = [p.clone() for p in method.backbone.parameters()]
    output = method.training_step(Batch.from_views(*random_views()),
                                  torch.Generator().manual_seed(0))
    output.loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())
    with torch.no_grad():
        for param in method.backbone.parameters():
            param.add_(1.0)  # a stand-in for the optimizer step
    progress = 0.25
    method.after_optimizer_step(output, progress)
    momentum = cosine_momentum(0.99, 1.0, progress) if base == "byol" else method.momentum
    for before, online, after in zip(target_before, online_before,
                                     method.target_backbone.parameters(), strict=True):
        torch.testing.assert_close(after, momentum * before + (1 - momentum) * (online + 1.0))


def test_moco_cosine_momentum_schedule():
    method = tiny_method("mocov2", "none", "method.mocov2.momentum_schedule=cosine",
                         "method.mocov2.momentum_end=0.999")
    target_before = [p.clone() for p in method.target_backbone.parameters()]
    with torch.no_grad():
        for param in method.backbone.parameters():
            param.add_(1.0)
    method.after_step([torch.zeros(0, 32)], 0.5)
    momentum = 0.9945  # halfway from 0.99 to 0.999 on the cosine
    for before, online, after in zip(target_before, method.backbone.parameters(),
                                     method.target_backbone.parameters(), strict=True):
        torch.testing.assert_close(after, momentum * before + (1 - momentum) * online)


def test_byol_momentum_schedule_end_points_and_midpoint():
    assert cosine_momentum(0.99, 1.0, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 1.0, 0.5) == pytest.approx(0.995)


@pytest.mark.parametrize(("base", "target_has_grad"),
                         [("simsiam", False), ("barlow_twins", True), ("vicreg", True)])
def test_shared_weight_targets_stop_gradients_where_the_method_says(base, target_has_grad):
    method = tiny_method(base)
    embedding = method.embed(random_views()[0])
    assert method.target_from_online(embedding).requires_grad is target_has_grad


def test_simsiam_gradient_reaches_the_backbone_only_through_the_predictor_side():
    """SimSiam's stop-gradient (eq. 3): with the predictor frozen at zero output weights, the
    prediction is constant, so no gradient may reach the backbone through the target."""
    method = tiny_method("simsiam")
    last = method.predictor[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)
    output = method.training_step(Batch.from_views(*random_views()),
                                  torch.Generator().manual_seed(0))
    output.loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.backbone.parameters())


class _Identity(SiameseMethod):
    """A transparent base: the embedding is the flattened image through one linear map and
    the loss a per-sample squared distance, so every term can be re-assembled by hand."""

    has_target_network = False

    def __init__(self, config, batch_level: bool = False):
        torch.manual_seed(0)
        super().__init__(config)
        self.backbone, self.feature_dim = nn.Flatten(), 3 * 8 * 8
        self.linear = nn.Linear(3 * 8 * 8, 4)
        self.batch_level_loss = batch_level

    def embed(self, images):
        features = self.backbone(images)
        projection = self.linear(features)
        return Embedding(features, projection, projection)

    def target_from_online(self, embedding):
        return embedding.projection.detach()

    def pair_loss(self, online, target):
        per_sample = ((online - target) ** 2).sum(dim=1)
        return per_sample.mean() * 3.0 if self.batch_level_loss else per_sample


# The formula tests re-draw the method's masks with the same seed: the device-side
# exact_count generator draws from the step's generator (BEiT's from the host one).
IDENTITY = ["model.width=0.125", "method.mask.generator=exact_count"]


def _views8(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(6, 3, 8, 8, generator=generator),
            torch.randn(6, 3, 8, 8, generator=generator))


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixmask_total_is_the_three_term_formula(per_sample):
    config = load_config(None, ["method.masking=mixmask", "method.mask.grid_size=4",
                                f"method.mask.per_sample={str(per_sample).lower()}",
                                "data.image_size=8", *IDENTITY])
    method = _Identity(config)
    view1, view2 = _views8()
    output = method.training_step(Batch.from_views(view1, view2), torch.Generator().manual_seed(3))
    # Re-draw the same mask and assemble the terms sample by sample.
    mix = sample_mixmask(view1, grid_size=4, mask_ratio=0.5, mode="block",
                         per_sample=per_sample, generator=torch.Generator().manual_seed(3),
                         block_generator="exact_count")
    with torch.no_grad():
        q, k = method.linear(view1.flatten(1)), method.linear(view2.flatten(1))
        q_mix = method.linear(mix.mixed_images.flatten(1))
    expected = 0.0
    for i in range(6):
        j = 5 - i  # image i is the partner in mix B-1-i
        expected += (((q[i] - k[i]) ** 2).sum() + mix.lam[i] * ((q_mix[i] - k[i]) ** 2).sum()
                     + (1 - mix.lam[j]) * ((q_mix[j] - k[i]) ** 2).sum())
    torch.testing.assert_close(output.loss, expected / 6)


def test_both_is_the_five_term_formula_with_a_permutation_partner():
    config = load_config(None, ["method.masking=both", "method.mask.grid_size=4",
                                "data.image_size=8", *IDENTITY])
    method = _Identity(config)
    view1, view2 = _views8()
    output = method.training_step(Batch.from_views(view1, view2), torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the draws in the method's order
    unmix = sample_unmix(view1, generator=generator)
    partner = permutation_partner(6, generator=generator)
    mix = sample_mixmask(view1, grid_size=4, generator=generator, partner_index=partner,
                         block_generator="exact_count")
    assert (partner != torch.arange(6)).all()
    with torch.no_grad():
        q, k = method.linear(view1.flatten(1)), method.linear(view2.flatten(1))
        q_unmix = method.linear(unmix.mixed_images.flatten(1))
        q_mix = method.linear(mix.mixed_images.flatten(1))
    expected = 0.0
    for i in range(6):
        u = 5 - i  # Un-Mix: reversed batch
        m = partner.tolist().index(i)  # MixMask: the mix in which image i is the partner
        expected += (((q[i] - k[i]) ** 2).sum()
                     + unmix.lam[i] * ((q_unmix[i] - k[i]) ** 2).sum()
                     + (1 - unmix.lam[u]) * ((q_unmix[u] - k[i]) ** 2).sum()
                     + mix.lam[i] * ((q_mix[i] - k[i]) ** 2).sum()
                     + (1 - mix.lam[m]) * ((q_mix[m] - k[i]) ** 2).sum())
    torch.testing.assert_close(output.loss, expected / 6)


def test_batch_level_switched_term_equals_the_loss_on_a_row_permuted_batch():
    """Barlow Twins with MixMask: the switched term L(flip(q_mix), k) is the loss of the
    mixed batch against the row-permuted targets, so a scalar lambda weights it exactly."""
    method = tiny_method("barlow_twins", "mixmask")
    generator = torch.Generator().manual_seed(0)
    q_mix, k = torch.randn(8, 32, generator=generator), torch.randn(8, 32, generator=generator)
    torch.testing.assert_close(method.pair_loss(q_mix.flip(0), k),
                               method.pair_loss(q_mix, k.flip(0)))
    config = load_config(None, ["method.masking=mixmask", "method.mask.grid_size=4",
                                "data.image_size=8", *IDENTITY])
    identity = _Identity(config, batch_level=True)
    view1, view2 = _views8()
    output = identity.training_step(Batch.from_views(view1, view2),
                                    torch.Generator().manual_seed(2))
    mix = sample_mixmask(view1, grid_size=4, generator=torch.Generator().manual_seed(2),
                         block_generator="exact_count")
    with torch.no_grad():
        q, k = identity.linear(view1.flatten(1)), identity.linear(view2.flatten(1))
        q_mix = identity.linear(mix.mixed_images.flatten(1))
    lam = mix.lam[0]
    expected = (identity.pair_loss(q, k) + lam * identity.pair_loss(q_mix, k)
                + (1 - lam) * identity.pair_loss(q_mix, k.flip(0)))
    torch.testing.assert_close(output.loss, expected)


def test_erase_replaces_the_online_view_and_keeps_the_target_clean():
    config = load_config(None, ["method.masking=erase", "method.mask.grid_size=4",
                                "data.image_size=8", *IDENTITY])
    method = _Identity(config)
    seen = []
    method.backbone.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    view1, view2 = _views8()
    method.training_step(Batch.from_views(view1, view2), torch.Generator().manual_seed(0))
    assert len(seen) == 2  # the clean target view and the erased online view, nothing else
    torch.testing.assert_close(seen[0], view2)
    erased = seen[1]
    changed = (erased != view1).float().mean().item()
    assert 0.3 < changed < 0.7  # half of the cells filled with noise


# DINO is left out: its loss starts at log K (a near-uniform teacher over K prototypes) and
# its normalised bottleneck narrows in the first steps before it spreads (centring and
# sharpening act over epochs: DINO, "Avoiding collapse", Fig. 7), so 12 steps cannot tell
# it from collapse; test_dino.py checks its teacher's centring and sharpening instead.
@pytest.mark.parametrize("base", [base for base in BASES if base != "dino"])
def test_a_few_steps_on_real_images_do_not_collapse(base, cifar10_tarball):
    """Collapse guard (SimSiam sec. 4.1's diagnostic): after 12 LARS steps on real CIFAR-10
    views, the per-dimension std of the L2-normalised projections stays well above 0 (a
    collapsed output has std 0; a healthy one about 1/sqrt(D)). Measured with this test's
    settings: 0.17-0.97 / sqrt(D) across the bases (MoCo v2 lowest); the floor is
    0.08 / sqrt(D)."""
    from mixmask.data import preset_views, view_transform
    from mixmask.data.splits import load_split

    batch = 16
    config = tiny_config(base, "none", f"data.root={cifar10_tarball}", "data.subset=64",
                         f"train.batch_size={batch}")
    image_set = load_split(config, "train", 64)
    first, second = (view_transform(view, image_set.mean, image_set.std)
                     for view in preset_views("cifar", 32))

    def two_views(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = image_set.load_pil(index)
        return first(image)[0], second(image)[0]

    torch.manual_seed(0)
    method = build_method(config)
    # LARS (the BYOL / Barlow Twins / VICReg optimiser) takes every base at one lr.
    optimizer = build_optimizer("lars", param_groups_for_lars(method.named_parameters()),
                                lr=0.5, momentum=0.9, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(0)
    steps = 12
    for step in range(steps):
        items = [two_views((step * batch + i) % 64) for i in range(batch)]
        view1 = torch.stack([item[0] for item in items])
        view2 = torch.stack([item[1] for item in items])
        output = method.training_step(Batch.from_views(view1, view2), generator, step / steps)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        method.after_optimizer_step(output, step / steps)
        assert torch.isfinite(output.loss)
    with torch.no_grad():
        projection = method.embed(view1).projection
    dims = projection.shape[1]
    std = torch.nn.functional.normalize(projection, dim=1).std(dim=0).mean().item()
    print(f"{base}: std x sqrt(D) = {std * dims ** 0.5:.3f}")
    assert std > 0.08 / dims ** 0.5, f"{base}: projection std {std:.4f} (collapse)"


@pytest.mark.parametrize(("base", "masking"), [("mocov2", "mixmask"), ("byol", "both"),
                                               ("simsiam", "unmix"), ("vicreg", "mixmask")])
def test_joint_online_forward_equals_separate_forwards_without_batch_statistics(base, masking):
    """With BN using running statistics (eval mode), one forward of the concatenated clean and
    mixed batches is the same function as one forward per batch: same loss, same gradients.
    The same draws are used (masks are drawn before any forward)."""
    overrides = ["method.mask.per_sample=false"] if base == "vicreg" else []
    results = []
    for mode in ("separate", "joint"):
        method = tiny_method(base, masking, f"method.online_forward={mode}", *overrides).eval()
        output = method.training_step(Batch.from_views(*random_views()),
                                      torch.Generator().manual_seed(4))
        output.loss.backward()
        results.append((output.loss.detach(), [p.grad.clone() for p in method.parameters()
                                               if p.grad is not None]))
    (separate_loss, separate_grads), (joint_loss, joint_grads) = results
    torch.testing.assert_close(joint_loss, separate_loss, rtol=1e-5, atol=1e-6)
    assert len(joint_grads) == len(separate_grads) > 0
    for joint_grad, separate_grad in zip(joint_grads, separate_grads, strict=True):
        torch.testing.assert_close(joint_grad, separate_grad, rtol=1e-4, atol=1e-6)


def test_joint_online_forward_runs_the_backbone_once_on_the_concatenated_batches():
    """In training mode the joint forward is one backbone call on clean + mixed images (BN
    statistics pooled over 2B samples); separate mode makes one call of B per batch."""
    calls = {}
    for mode in ("separate", "joint"):
        method = tiny_method("mocov2", "mixmask", f"method.online_forward={mode}",
                             "method.mocov2.symmetric=false")
        sizes = []
        method.backbone.register_forward_hook(
            lambda module, inputs, output, sizes=sizes: sizes.append(inputs[0].shape[0]))
        method.training_step(Batch.from_views(*random_views()), torch.Generator().manual_seed(0))
        calls[mode] = sizes
    assert calls == {"separate": [8, 8], "joint": [16]}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_symmetric_reduction_sums_or_averages_the_two_directions(reduction):
    """Hand case: with each view online once and target once, ``sum`` is
    L(q1, k2) + L(q2, k1) (Un-Mix / MoCo CIFAR code, BYOL eq. 4) and ``mean`` half of it
    (SimSiam eq. 2)."""
    config = load_config(None, ["data.image_size=8", *IDENTITY])
    method = _Identity(config)
    method.symmetric, method.symmetric_reduction = True, reduction
    view1, view2 = _views8()
    output = method.training_step(Batch.from_views(view1, view2), torch.Generator().manual_seed(0))
    with torch.no_grad():
        z1, z2 = method.linear(view1.flatten(1)), method.linear(view2.flatten(1))
    forward = sum(((z1[i] - z2[i]) ** 2).sum() for i in range(6)) / 6
    backward = sum(((z2[i] - z1[i]) ** 2).sum() for i in range(6)) / 6
    expected = forward + backward if reduction == "sum" else (forward + backward) / 2
    torch.testing.assert_close(output.loss, expected)


def test_recipes_reduce_the_symmetric_loss_as_their_sources():
    expected = {"mocov2_r18.yaml": "sum", "mocov2plus_r18.yaml": "mean", "byol_r18.yaml": "sum",
                "simsiam_r18.yaml": "mean"}
    for name, reduction in expected.items():
        config = load_config(f"configs/cifar100/{name}")
        assert config.method.params.symmetric_reduction == reduction, name
    assert load_config("configs/cifar10/mocov2_r18.yaml").method.params.symmetric_reduction == "sum"


def test_beit_masks_come_from_a_host_generator_kept_in_the_state_dict():
    """The reference's BEiT block masks are drawn on the host: lambda <= 1 - ratio (the
    blocks are kept), and the host generator's state travels with the method's state_dict,
    so a method restored from it draws the same masks."""
    method = tiny_method("mocov2", "mixmask", "method.mocov2.symmetric=false")
    assert method.mask_generator is not None
    lambdas = []
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        output = method.training_step(Batch.from_views(*random_views(seed=step)), generator)
        lambdas.append(float(output.logs["lambda_mixmask"]))
    assert all(value <= 0.5 for value in lambdas)
    state, generator_state = method.state_dict(), generator.get_state()
    expected = method.training_step(Batch.from_views(*random_views(seed=9)), generator)
    restored = tiny_method("mocov2", "mixmask", "method.mocov2.symmetric=false")
    restored.load_state_dict(state)
    generator.set_state(generator_state)
    again = restored.training_step(Batch.from_views(*random_views(seed=9)), generator)
    torch.testing.assert_close(again.loss, expected.loss)
    assert tiny_method("mocov2", "mixmask", "method.mask.generator=exact_count").mask_generator \
        is None
