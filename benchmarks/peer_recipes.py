"""The CPU-scale recipes of SimCLR and DINO that both sides of a comparison read: lightly's
pipelines and ours in ``time_to_accuracy.py --peer lightly --peer-method simclr|dino``, and
ours in ``masking_ablation.py --base simclr|dino`` (the quickstart's data budget, width
and schedule; one place, so the benchmarks cannot drift apart)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PEER_RECIPES", "QUICKSTART_SGD", "PeerRecipe"]


@dataclass(frozen=True)
class PeerRecipe:
    """One method's recipe for both pipelines of ``--peer lightly --peer-method NAME``, in
    one place so that they cannot drift apart.

    ``shared`` (the views' preset and the optimizer) goes into both pipelines' configs as
    overrides, and lightly's loop reads its ``train.*`` and derives its transform's
    arguments from there. ``method`` holds our ``method.<name>.*`` keys: our run gets them
    as overrides (and refuses a command line that changes one: it would reach our side
    only), lightly's heads, loss and momentum read them here. ``epoch_shares``: keys
    counted in epochs, given as a share of ``train.epochs`` (at least 1 epoch), so the
    quickstart's 10 epochs and a longer ``train.epochs=N`` both keep the reference's
    proportion.
    """

    name: str  # method.name of ours
    label: str  # the rows' "lightly <label>" and "mixmask <label>"
    shared: dict[str, Any]
    method: dict[str, Any]
    epoch_shares: dict[str, float] = field(default_factory=dict)

    def method_keys(self, epochs: int) -> dict[str, Any]:
        """The ``method.<name>.*`` values for a schedule of ``epochs`` epochs."""
        scaled = {key: max(1, round(share * epochs)) for key, share in self.epoch_shares.items()}
        return {**self.method, **scaled}

    def shared_overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.shared.items()]

    def method_overrides(self, epochs: int) -> list[str]:
        return [f"method.name={self.name}", "method.masking=none",
                *(f"method.{self.name}.{key}={json.dumps(value)}"
                  for key, value in self.method_keys(epochs).items())]


# The quickstart's optimizer for every method: plain SGD with every parameter decayed, what
# lightly's examples write (torch.optim.SGD(model.parameters(), lr=0.06)) and what
# train.optimizer=sgd does (mixmask.ops.optim.pretraining_groups), cosine to 0 per step.
QUICKSTART_SGD = {"train.optimizer": "sgd", "train.lr": 0.06, "train.momentum": 0.9,
                  "train.weight_decay": 5.0e-4, "train.warmup_epochs": 0.0}
# SimCLR's projector has the quickstart's hidden width (its MoCo v2 projector at width
# 0.25: 512, where the width-1 recipes have 2048) and solo-learn's CIFAR output
# (scripts/pretrain/cifar/simclr.yaml); DINO's head is lightly's CIFAR-10 benchmark's.
PEER_RECIPES = {
    "simclr": PeerRecipe(
        "simclr", "SimCLR",
        # SimCLR's symmetric views (solo-learn's augmentations/symmetric.yaml).
        shared={"data.augmentation": "simclr", **QUICKSTART_SGD},
        # Temperature 0.2: solo-learn's CIFAR recipe (lightly's NTXentLoss defaults to 0.5,
        # SimCLR's CIFAR setting). NTXentLoss averages over the 2N anchors: "mean".
        method={"proj_hidden_dim": 512, "proj_output_dim": 256, "proj_layers": 2,
                "output_batch_norm": True, "temperature": 0.2,
                "symmetric_reduction": "mean"}),
    "dino": PeerRecipe(
        "dino", "DINO",
        # solo-learn's CIFAR DINO: two global crops of its asymmetric views
        # (augmentations/asymmetric.yaml: byol_cifar, crop scale 0.08-1), no local crops.
        shared={"data.augmentation": "byol_cifar", **QUICKSTART_SGD},
        # The head is lightly's CIFAR-10 benchmark's (benchmarks/cifar10_benchmark.py:
        # DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True) with its MLP cut to 2
        # layers): solo-learn's (3 layers, no BN, 4,096 prototypes) sat at ln(4096), a
        # uniform student, from the first epochs on both sides at this budget (stop 27),
        # where BN in the head learns (stop 28: docs/results.md, "DINO's head at the
        # quickstart budget").
        method={"proj_hidden_dim": 2048, "bottleneck_dim": 256, "num_prototypes": 2048,
                "proj_layers": 2, "use_bn_in_head": True, "norm_last_layer": True,
                "student_temperature": 0.1, "teacher_temperature": 0.07,
                "warmup_teacher_temperature": 0.04, "center_momentum": 0.9,
                # The quickstart's short-schedule momentum (its MoCo v2's 0.99), rising to 1
                # on a cosine: solo-learn's 0.9995 is for 1000 epochs, and in 10 epochs
                # (1560 steps) its teacher would barely leave its initial weights.
                "momentum": 0.99, "momentum_end": 1.0,
                "freeze_last_layer_epochs": 1,  # DINO's and lightly's first epoch
                "local_crops": 0, "local_crop_size": 0,
                "global_crop_scale": [0.08, 1.0], "local_crop_scale": [0.05, 0.4]},
        # solo-learn's 50 warm-up epochs of 1000: 1 epoch of the quickstart's 10.
        epoch_shares={"warmup_teacher_temperature_epochs": 50 / 1000}),
}
