"""DistributedDataParallel (Fabric's ``strategy="ddp"``, ``find_unused_parameters=False``)
fails on the second step when a trainable parameter gets no gradient. So one training
step of every CIFAR-10 recipe must reach every parameter that requires a gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT

from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.datasets import load_image_set
from mixmask.methods import PixelStats, build_method

RECIPES = sorted(path.stem for path in (ROOT / "configs" / "cifar10").glob("*.yaml"))
SMALL = {"vit": ["model.backbone=vit_tiny"], "r18": ["model.width=0.25"],
         "convnext": [], "convmae": []}  # ConvNeXt-Atto / ConvViT-Tiny already


VIT_RECIPES = [recipe for recipe in RECIPES if "vit" in recipe]


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_step_reaches_every_trainable_parameter(recipe):
    _one_step_reaches_every_trainable_parameter(recipe)


# iBOT distils the cls token and refuses avg pooling (tests/test_ibot.py checks the sentence).
VIT_POOLINGS = [(recipe, pool) for recipe in VIT_RECIPES for pool in ("token", "avg")
                if not (recipe.startswith("ibot") and pool == "avg")]


@pytest.mark.parametrize("recipe, pool", VIT_POOLINGS)
def test_every_vit_pooling_reaches_every_trainable_parameter(recipe, pool):
    # MAE and A2MIM with avg pooling, SiameseIM with token pooling each left one
    # LayerNorm without a gradient (DDP's second step fails on it).
    _one_step_reaches_every_trainable_parameter(recipe, f"model.global_pool={pool}")


def _one_step_reaches_every_trainable_parameter(recipe: str, *extra: str) -> None:
    overrides = ["data.dataset=synthetic", "train.batch_size=8", *extra]
    overrides += SMALL[next((kind for kind in ("vit", "convnext", "convmae") if kind in recipe),
                            "r18")]
    config = load_config(ROOT / "configs" / "cifar10" / f"{recipe}.yaml", overrides)
    images = load_image_set("synthetic", "", "train", subset=8)
    torch.manual_seed(0)
    method = build_method(config, PixelStats(tuple(images.mean), tuple(images.std)))
    loader = build_train_loader(images, EpochBatchSampler(len(images), 8, seed=0),
                                method.view_configs(), pipeline="cpu",
                                device=torch.device("cpu"), seed=0)
    batch = next(iter(loader))
    output = method.training_step(batch, torch.Generator().manual_seed(0), 0.0)
    output.loss.backward()
    unreached = [name for name, parameter in method.named_parameters()
                 if parameter.requires_grad and parameter.grad is None]
    assert unreached == []
