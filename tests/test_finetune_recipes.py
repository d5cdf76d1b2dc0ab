"""The finetuning options of `mixmask finetune` beyond the Barlow Twins recipe: MAE's
main_finetune.py (AdamW, layer-wise lr decay, warm-up + cosine per step, drop-path, label
smoothing, Mixup / CutMix, RandAugment, RandomErasing, average pooling with a fresh
fc_norm), each checked against a hand computation."""

from __future__ import annotations

import json
import math
import shutil

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.errors import ConfigError, MixmaskError
from mixmask.eval.data import classifier_train_transform
from mixmask.eval.finetune import (
    Classifier,
    FinetuneStopped,
    mix_for_classification,
    parameter_groups,
)
from mixmask.eval.protocols import run_finetune
from mixmask.models.vit import ViTBackbone
from mixmask.train.loop import pretrain
from mixmask.train.schedule import warmup_cosine_lr


def test_warmup_cosine_lr_matches_maes_schedule_by_hand():
    # peak 1, floor 0.1, 2 warm-up epochs of 10.
    schedule = [warmup_cosine_lr(1.0, 0.1, epoch, warmup_epochs=2, epochs=10)
                for epoch in (0.0, 1.0, 2.0, 6.0, 10.0)]
    # linear warm-up: 0, 0.5; cosine: peak at its start, (1 + 0.1) / 2 half-way, floor at the end.
    assert schedule == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1])


def _tiny_vit() -> ViTBackbone:
    return ViTBackbone(32, 2, 2, image_size=16, patch_size=4)


def _lr_and_decay(classifier: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    names = {id(param): name for name, param in classifier.named_parameters()}
    return {names[id(param)]: (group["base_lr"], group["weight_decay"])
            for group in groups for param in group["params"]}


def test_mae_groups_decay_the_lr_per_layer_and_skip_decay_on_norms_biases_and_tokens():
    classifier = Classifier(_tiny_vit(), 32, 10)
    groups = parameter_groups(classifier, lr_backbone=0.0, lr_head=1.0, recipe="mae",
                              weight_decay=0.05, layer_decay=0.5, min_lr=0.01)
    table = _lr_and_decay(classifier, groups)
    # depth 2: head and final norm at 0.5 ** 0, block 1 at 0.5, block 0 at 0.25, the
    # embeddings at 0.5 ** 3 (BEiT / MAE layer ids 3, 2, 1, 0).
    assert table["head.weight"] == (1.0, 0.05)
    assert table["head.bias"] == (1.0, 0.0)
    assert table["backbone.blocks.1.mlp.fc1.weight"] == (0.5, 0.05)
    assert table["backbone.blocks.0.attn.qkv.weight"] == (0.25, 0.05)
    assert table["backbone.blocks.0.norm1.weight"] == (0.25, 0.0)
    assert table["backbone.patch_embed.proj.weight"] == (0.125, 0.05)
    assert table["backbone.cls_token"] == (0.125, 0.0)
    assert table["backbone.norm.weight"] == (1.0, 0.0)
    assert "backbone.pos_embed" not in table  # fixed sin-cos: not trained
    floors = {group["base_lr"]: group["min_lr"] for group in groups}
    assert floors[0.125] == pytest.approx(0.01 * 0.125) and floors[1.0] == pytest.approx(0.01)


def test_sgd_groups_keep_barlow_twins_two_lrs_with_weight_decay_on_everything():
    classifier = Classifier(_tiny_vit(), 32, 10)
    table = _lr_and_decay(classifier, parameter_groups(
        classifier, lr_backbone=0.002, lr_head=0.5, weight_decay=1e-4))
    assert table["head.bias"] == (0.5, 1e-4)
    assert table["backbone.cls_token"] == (0.002, 1e-4)
    assert {lr for lr, _ in table.values()} == {0.5, 0.002}


def _constant_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Image i is the constant i, so every mixed pixel tells whose it is.
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    return images, torch.tensor([0, 1, 2, 3])


def test_mixup_mixes_pixels_and_smoothed_targets_with_the_reversed_batch():
    images, labels = _constant_batch()
    generator = torch.Generator().manual_seed(3)
    mixed, targets = mix_for_classification(images, labels, 4, mixup_alpha=0.8,
                                            cutmix_alpha=0.0, smoothing=0.1,
                                            generator=generator)
    # Mix 0 = lam * 0 + (1 - lam) * 3, the same value everywhere.
    lam = 1 - mixed[0].flatten()[0].item() / 3
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 3 * (1 - lam)))
    assert torch.allclose(mixed[1], torch.full_like(mixed[1], lam * 1 + (1 - lam) * 2))
    on, off = 1 - 0.1 + 0.025, 0.025
    expected = torch.tensor([lam * on + (1 - lam) * off, off, off, lam * off + (1 - lam) * on])
    assert torch.allclose(targets[0], expected, atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_cutmix_targets_weigh_each_label_by_its_share_of_the_pixels():
    images, labels = _constant_batch()
    generator = torch.Generator().manual_seed(5)
    mixed, targets = mix_for_classification(images, labels, 4, mixup_alpha=0.0,
                                            cutmix_alpha=1.0, smoothing=0.0,
                                            generator=generator)
    own = (mixed[1] == 1).float().mean().item()
    assert set(mixed[1].unique().tolist()) <= {1.0, 2.0}  # pasted, not blended
    assert targets[1, 1].item() == pytest.approx(own)
    assert targets[1, 2].item() == pytest.approx(1 - own)


def test_with_both_alphas_each_batch_is_mixup_or_cutmix():
    images, labels = _constant_batch()
    kinds = set()
    for seed in range(20):
        mixed, _ = mix_for_classification(images, labels, 4, mixup_alpha=0.8, cutmix_alpha=1.0,
                                          smoothing=0.0,
                                          generator=torch.Generator().manual_seed(seed))
        blended = bool(((mixed[0] != 0) & (mixed[0] != 3)).any())
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_drop_path_rises_linearly_over_the_blocks():
    backbone = ViTBackbone(32, 3, 2, image_size=16, patch_size=4)
    backbone.set_drop_path(0.2)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in backbone.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(backbone.blocks[0].drop_path2, nn.Identity)


def test_average_pooling_drops_the_final_norm_for_a_fresh_fc_norm():
    torch.manual_seed(0)
    backbone = _tiny_vit()
    with torch.no_grad():
        backbone.norm.weight.fill_(3.0)  # a "pretrained" final norm that must go
    images = torch.randn(2, 3, 16, 16)
    tokens = backbone.blocks(backbone.prepend_cls(backbone.embed_patches(images)))
    backbone.set_global_pool("avg")
    expected = F.layer_norm(tokens[:, 1:].mean(dim=1), (32,), eps=1e-6)
    assert torch.allclose(backbone(images), expected, atol=1e-5)
    assert isinstance(backbone.norm, nn.Identity)


def test_randaugment_and_random_erasing_are_seeded_and_change_the_image():
    image = PIL.Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    plain = classifier_train_transform(32, (0.5,) * 3, (0.25,) * 3)
    strong = classifier_train_transform(32, (0.5,) * 3, (0.25,) * 3,
                                        randaugment="rand-m9-mstd0.5-inc1", random_erasing=1.0)

    def draw(transform, seed):
        import random

        import numpy

        torch.manual_seed(seed)
        random.seed(seed)
        numpy.random.seed(seed)
        return transform(image)

    assert torch.equal(draw(strong, 1), draw(strong, 1))
    assert not torch.equal(draw(strong, 1), draw(plain, 1))
    # At magnitude 10, timm's increasing Posterize would keep 0 bits, which Pillow refuses.
    strongest = classifier_train_transform(32, (0.5,) * 3, (0.25,) * 3,
                                           randaugment="rand-m10-mstd0-inc1")
    for seed in range(200):
        draw(strongest, seed)
    with pytest.raises(MixmaskError, match="RandAugment"):
        classifier_train_transform(32, (0.5,) * 3, (0.25,) * 3, randaugment="rand-q9")


@pytest.mark.parametrize("override, message", [
    ("eval.finetune_recipe=lars", "finetune_recipe"),
    ("eval.finetune_layer_decay=0.65", "applies to ViT backbones"),
    ("eval.finetune_drop_path=0.1", "applies to ViT backbones"),
    ("eval.finetune_randaugment=autoaugment", "RandAugment policy"),
    ("eval.finetune_randaugment=rand-m9-zz", "RandAugment policy"),
    ("eval.finetune_label_smoothing=1.0", "finetune_label_smoothing"),
])
def test_finetune_option_mistakes_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/cifar10/mocov2_r18.yaml", [override])


FAST = ["eval.finetune_epochs=2", "eval.finetune_batch_size=4", "eval.finetune_warmup_epochs=1"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, cifar10_tarball_module):
    run = tmp_path_factory.mktemp("vit") / "run"
    pretrain(load_config("configs/cifar10/mae_vit_tiny.yaml", [
        "method.mae.decoder_depth=1", "method.mae.decoder_dim=64", "method.mae.decoder_heads=2",
        f"data.root={cifar10_tarball_module}", "data.subset=32", "data.eval_train_subset=100",
        "data.eval_test_subset=20", "data.num_workers=0", "train.batch_size=16",
        "train.epochs=1", "train.warmup_epochs=0", "train.progress_bar=false",
        "monitor.knn=false", "eval.knn=false", "eval.linear=false", f"out_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def cifar10_tarball_module():
    from conftest import CIFAR10_TARBALL

    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}")
    return CIFAR10_TARBALL


class _StopAfter:
    """Raise the stop flag once ``steps`` training steps have run."""

    def __init__(self, steps: int, patch):
        import mixmask.eval.finetune as finetune_module

        self.received, self.count = None, 0
        original = finetune_module.training_step

        def counting(*args, **kwargs):
            out = original(*args, **kwargs)
            self.count += 1
            if self.count == steps:
                self.received = "SIGTERM"
            return out

        patch.setattr(finetune_module, "training_step", counting)


def test_the_mae_recipe_runs_names_itself_and_resumes_exactly(vit_run, tmp_path, monkeypatch):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    shutil.copytree(vit_run, reference)
    shutil.copytree(vit_run, stopped)
    protocol = "configs/eval/cifar_finetune_mae.yaml"
    overrides = ["data.eval_train_subset=100", "data.eval_test_subset=20", *FAST]
    _, expected = run_finetune(reference, overrides, labels="10%", protocol_file=protocol)
    settings = expected["settings"]
    assert settings["recipe"] == "mae" and settings["global_pool"] == "avg"
    assert settings["lr"] == pytest.approx(5e-4 * 4 / 256)
    assert "MAE main_finetune.py" in expected["description"]
    assert "RandAugment rand-m9-mstd0.5-inc1" in settings["augmentation"]
    assert len(expected["history"]) == 2 and all(math.isfinite(row["top1"])
                                                 for row in expected["history"])
    # 10 images in batches of 4: 3 steps an epoch; stop mid-epoch 2 and continue.
    with monkeypatch.context() as patch:
        with pytest.raises(FinetuneStopped, match="after step 4 of 6"):
            run_finetune(stopped, overrides, labels="10%", protocol_file=protocol,
                         stop=_StopAfter(4, patch))
    _, resumed = run_finetune(stopped, overrides, labels="10%", protocol_file=protocol)
    assert resumed["history"] == expected["history"]
    final = torch.load(stopped / "eval" / "finetune_10pct" / "last.ckpt", weights_only=True)
    reference_state = torch.load(reference / "eval" / "finetune_10pct" / "last.ckpt",
                                 weights_only=True)
    for name, value in reference_state["classifier"].items():
        assert torch.equal(final["classifier"][name], value), name
    written = json.loads((stopped / "eval" / "finetune_10pct.json").read_text())
    assert written["settings"]["layer_decay"] == 0.65


def test_a_resnet_run_refuses_vit_only_finetune_options(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = load_config("configs/cifar10/mocov2_r18.yaml", ["data.root=/nonexistent"])
    from mixmask.config import save_config

    save_config(config, run / "config.yaml")
    code = main(["finetune", str(run), "--labels", "10%", "--from-scratch",
                 "eval.finetune_layer_decay=0.65"])
    assert code == 2
    assert "applies to ViT backbones" in capsys.readouterr().err
