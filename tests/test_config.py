from pathlib import Path

import pytest
import yaml

from mixmask.cli import main
from mixmask.config import Config, load_config, save_config
from mixmask.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    config = load_config(None, ["train.epochs=3", "method.masking=mixmask", "train.precision=16",
                                "method.mask.mask_ratio=0.25", "eval.linear_milestones=[0.5]"])
    assert isinstance(config, Config)
    assert config.train.epochs == 3
    assert config.method.masking == "mixmask"
    assert config.train.precision == "16"
    assert config.method.mask.mask_ratio == 0.25
    assert config.eval.linear_milestones == (0.5,)
    assert config.data.dataset == "cifar10"


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'train.epoch'.*Did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'method.mask.grid'.*'method.mask.grid_size'"):
        load_config(None, ["method.mask.grid=4"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="'train.lr' must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="'data.download' must be true or false"):
        load_config(None, ["data.download=3"])
    with pytest.raises(ConfigError, match="'method.masking' must be one of.*'mixmask'"):
        load_config(None, ["method.masking=mixmsk"])
    with pytest.raises(ConfigError, match="'train' must be a section"):
        load_config(None, ["train=3"])


def test_invalid_combinations():
    with pytest.raises(ConfigError, match=r"mask_ratio' must lie in \(0, 1\)"):
        load_config(None, ["method.mask.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="must divide data.image_size"):
        load_config(None, ["method.masking=mixmask", "method.mask.grid_size=7"])
    with pytest.raises(ConfigError, match="must be even"):
        load_config(None, ["method.masking=mixmask", "train.batch_size=33"])


def test_base_inheritance_and_round_trip(tmp_path):
    config = load_config(CONFIGS / "cifar100" / "mixmask_mocov2_r18.yaml")
    assert config.method.masking == "mixmask"
    assert config.data.dataset == "cifar100"  # inherited from the base file
    assert config.method.mocov2.queue_size == 4096
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_imagenet_config_is_the_reference_recipe():
    config = load_config(CONFIGS / "imagenet" / "mixmask_mocov2_r50.yaml")
    moco = config.method.mocov2
    model = config.model
    assert (model.backbone, model.stem, config.train.epochs) == ("resnet50", "imagenet", 200)
    train = config.train
    assert (train.batch_size, train.lr, train.weight_decay) == (256, 0.03, 1e-4)
    assert (moco.queue_size, moco.momentum, moco.temperature) == (65536, 0.999, 0.2)
    assert (moco.proj_hidden_dim, moco.proj_output_dim) == (2048, 128)
    assert config.method.mask.grid_size == 8 and config.data.augmentation == "mocov2"


def test_cli_config_errors_exit_2(tmp_path, capsys):
    assert main(["pretrain", str(CONFIGS / "quickstart.yaml"), "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epoch'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"batch_size": "big"}}))
    assert main(["pretrain", str(bad)]) == 2
    assert "'train.batch_size' must be an integer" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
