"""The method protocol is open: every registered method runs through the engine's one step
function, and a method written here (one view, a pixel reconstruction) registers itself
and pretrains through `mixmask pretrain` with no edit outside this file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.splits import load_split
from mixmask.errors import ConfigError
from mixmask.methods import Method, PixelStats, StepOutput, build_method, method_names
from mixmask.methods.registry import register_method
from mixmask.ops.optim import build_optimizer
from mixmask.train.step import training_step


@dataclass
class ToyReconstructionConfig:
    """A toy one-view method: reconstruct an 8x8 thumbnail of the view from its features."""

    decoder_dim: int = 32


@register_method("toy_reconstruction")
class ToyReconstruction(Method):
    config_class = ToyReconstructionConfig
    num_views = 1

    def __init__(self, config, pixel_stats=None):
        super().__init__(config, pixel_stats)
        hidden = config.method.params.decoder_dim
        self.decoder = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 3 * 8 * 8))

    def training_step(self, batch, generator, progress=0.0):
        assert batch.num_views == 1
        images = batch.views[0]
        features = self.backbone(images)
        thumbnail = F.adaptive_avg_pool2d(images, 8).flatten(1)
        loss = F.mse_loss(self.decoder(features), thumbnail)
        return StepOutput(loss, {"loss": loss.detach()}, features.detach())


# Small heads, so every method's step takes a fraction of a second.
SMALL = ["model.width=0.125", "train.batch_size=16", "method.mocov2.queue_size=64",
         "method.mocov2.proj_hidden_dim=64", "method.byol.proj_hidden_dim=64",
         "method.byol.pred_hidden_dim=64", "method.simsiam.proj_hidden_dim=64",
         "method.simsiam.pred_hidden_dim=16", "method.barlow_twins.proj_hidden_dim=64",
         "method.barlow_twins.proj_output_dim=64", "method.vicreg.proj_hidden_dim=64",
         "method.vicreg.proj_output_dim=64"]


# Methods that need another backbone than SMALL's ResNet (a ViT for MIM), made small.
NEEDS = {"mae": ["model.backbone=vit_tiny", "method.mae.decoder_depth=1",
                 "method.mae.decoder_dim=64", "method.mae.decoder_heads=2"],
         "ibot": ["model.backbone=vit_tiny", "method.ibot.proj_hidden_dim=64",
                  "method.ibot.bottleneck_dim=16", "method.ibot.num_prototypes=32"]}


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_every_registered_method_trains_a_real_batch_through_the_step_function(
        name, optimizer_name, cifar10_tarball):
    config = load_config(None, [*SMALL, f"method.name={name}", f"data.root={cifar10_tarball}",
                                "data.subset=64", f"train.optimizer={optimizer_name}",
                                "train.lr=0.01", *NEEDS.get(name, [])])
    image_set = load_split(config, "train", 64)
    torch.manual_seed(0)
    method = build_method(config, PixelStats(image_set.mean, image_set.std))
    views = method.view_configs()
    assert len(views) == method.num_views
    loader = build_train_loader(image_set, EpochBatchSampler(64, 16, seed=0), views,
                                pipeline="cpu", device=torch.device("cpu"), seed=0)
    batch = next(iter(loader))
    assert batch.num_views == method.num_views and batch.size == 16
    optimizer = build_optimizer(optimizer_name, method.parameter_groups(optimizer_name),
                                lr=0.01, weight_decay=1e-4)
    gradients = {}

    def record(optimizer, args, kwargs):  # the gradients the step applies
        for group in optimizer.param_groups:
            for param_name, param in zip(group["param_names"], group["params"], strict=True):
                gradients[param_name] = None if param.grad is None else param.grad.clone()

    optimizer.register_step_pre_hook(record)
    before = {key: value.clone() for key, value in method.state_dict().items()
              if torch.is_tensor(value)}
    output = training_step(method, optimizer, batch, torch.Generator().manual_seed(0), 0.0)
    assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    assert all(torch.isfinite(value).all() for value in output.logs.values())
    frozen = {key for key, param in method.named_parameters() if not param.requires_grad}
    backbone_grads = [grad for key, grad in gradients.items()
                      if key.startswith("backbone.") and key not in frozen]
    assert backbone_grads and all(g is not None and torch.isfinite(g).all()
                                  for g in backbone_grads)
    assert sum(g.abs().sum() for g in backbone_grads) > 0
    # The gradients were applied, then freed.
    assert all(param.grad is None for param in method.parameters())
    changed = [key for key, value in method.state_dict().items()
               if key in before and not torch.equal(value, before[key])]
    assert any(key.startswith("backbone.") for key in changed)
    assert output.features is None or output.features.shape == (16, method.feature_dim)


def test_a_one_view_method_defined_in_a_test_pretrains_through_the_cli(tmp_path, capsys,
                                                                       cifar10_tarball):
    config_path = tmp_path / "toy.yaml"
    config_path.write_text(yaml.safe_dump({
        "method": {"name": "toy_reconstruction", "toy_reconstruction": {"decoder_dim": 16}},
        "data": {"dataset": "cifar10", "root": str(cifar10_tarball), "subset": 128,
                 "eval_train_subset": 128, "eval_test_subset": 64, "num_workers": 0},
        "model": {"width": 0.125},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3,
                  "weight_decay": 0.05, "betas": [0.9, 0.95], "progress_bar": False,
                  "log_every": 1, "plots": "curves"},
        "eval": {"linear": False},
        "out_dir": str(tmp_path / "run"),
    }))
    assert main(["pretrain", str(config_path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "toy_reconstruction" and summary["steps"] == 8
    assert 0.0 <= summary["knn_top1"] <= 100.0 and "probe_top1" in summary
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == {"name": "toy_reconstruction",
                               "toy_reconstruction": {"decoder_dim": 16}}
    assert saved["train"]["betas"] == [0.9, 0.95]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(key.startswith("decoder.") for key in checkpoint["method"])
    # AdamW over the method's groups: biases and norms undecayed.
    groups = checkpoint["optimizer"]["param_groups"]
    assert sorted(group["weight_decay"] for group in groups) == [0.0, 0.05]
    # The evaluation commands work on its run folder too.
    assert main(["knn", str(run)]) == 0
    assert "knn_top1" in capsys.readouterr().out


def test_the_masking_axis_belongs_to_the_siamese_methods(tmp_path, capsys):
    with pytest.raises(ConfigError, match="belongs to the masking axis of the Siamese methods"):
        load_config(None, ["method.name=toy_reconstruction", "method.masking=mixmask"])
    with pytest.raises(ConfigError, match="'method.mask' belongs to the masking axis"):
        load_config(None, ["method.name=toy_reconstruction", "method.mask.grid_size=4"])
    # "masking: none" is true of every method, so recipes that say it can switch methods.
    config = load_config(None, ["method.name=toy_reconstruction", "method.masking=none"])
    assert config.method.axis is None and "masking" not in config.method.to_dict()
    # Switching a recipe to such a method on the command line drops the axis keys the file
    # set for its own method (and says so); axis keys given on the command line stay errors.
    switched = load_config("configs/quickstart.yaml", ["method.name=toy_reconstruction"])
    assert switched.method.ignored_keys == ["method.masking", "method.mask"]
    assert switched.method.axis is None and switched.data.subset == 5000
    code = main(["pretrain", "configs/quickstart.yaml", "method.name=toy_reconstruction",
                 "method.masking=mixmask", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "'method.masking' belongs to the masking axis" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_method_sections_switch_and_unknown_sections_are_named():
    config = load_config(None, ["method.name=byol", "method.mocov2.queue_size=128"])
    assert config.method.params.momentum_start == 0.99  # byol's own defaults
    assert config.method.mocov2.queue_size == 128  # parsed and validated all the same
    assert "mocov2" not in config.method.to_dict()  # the resolved config: the active one
    with pytest.raises(ConfigError, match=r"'method.mocov2.queue'.*'method.mocov2.queue_size'"):
        load_config(None, ["method.mocov2.queue=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'method.byl'.*'method.byol'"):
        load_config(None, ["method.byl.momentum_start=0.9"])


def test_adamw_groups_of_a_method_leave_biases_and_norms_undecayed():
    config = load_config(None, ["model.width=0.125", "method.mocov2.proj_hidden_dim=32"])
    method = build_method(config)
    groups = method.parameter_groups("adamw")
    undecayed = {name for group in groups if group.get("weight_decay") == 0.0
                 for name in group["param_names"]}
    trainable = {name for name, param in method.named_parameters() if param.requires_grad}
    expected = {name for name in trainable
                if name.endswith(".bias") or ".bn" in name or "downsample.1" in name}
    assert undecayed == expected
    assert "backbone.conv1.weight" not in undecayed and "projector.0.weight" not in undecayed
    # The EMA key encoder is not trained: in no group.
    assert not any(name.startswith("target_") for group in groups
                   for name in group["param_names"])
    # sgd: one group, every trainable parameter decayed (MoCo's reference).
    (sgd_group,) = method.parameter_groups("sgd")
    assert set(sgd_group["param_names"]) == trainable and "weight_decay" not in sgd_group


def test_backbone_registry_names_the_valid_choices():
    with pytest.raises(ConfigError, match=r"'model.backbone' must be one of.*resnet18.*"
                                          r"Did you mean 'resnet50'"):
        load_config(None, ["model.backbone=resnet05"])


PLUGIN = '''
from dataclasses import dataclass

import torch.nn.functional as F

from mixmask.methods import Method, StepOutput, register_method


@dataclass
class FilePluginConfig:
    weight: float = 1.0


@register_method("file_plugin")
class FilePlugin(Method):
    config_class = FilePluginConfig
    num_views = 1

    def training_step(self, batch, generator, progress=0.0):
        features = self.backbone(batch.views[0])
        loss = self.params.weight * F.mse_loss(features, features.detach() * 0.5)
        return StepOutput(loss, {"loss": loss.detach()}, features.detach())
'''


def test_a_method_in_a_users_file_is_imported_by_the_command_line(tmp_path, capsys):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(PLUGIN)
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump({
        "method": {"name": "file_plugin", "file_plugin": {"weight": 2.0}},
        "data": {"dataset": "synthetic", "subset": 64, "num_workers": 0},
        "model": {"width": 0.125},
        "train": {"epochs": 1, "batch_size": 32, "progress_bar": False},
        "monitor": {"knn": False, "online_probe": False},
        "eval": {"knn": False, "linear": False},
        "out_dir": str(tmp_path / "run")}))
    assert main(["--import", str(plugin), "pretrain", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "file_plugin" and summary["steps"] == 2
    capsys.readouterr()
    assert main(["--import", "no_such_module_here", "pretrain", str(config)]) == 2
    assert "--import no_such_module_here" in capsys.readouterr().err
