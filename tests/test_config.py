from pathlib import Path

import pytest
import yaml
from scripts import load_script

from mixmask.cli import main
from mixmask.config import Config, load_config, save_config
from mixmask.errors import ConfigError

CONFIGS = (Path(__file__).resolve().parents[1] / "configs").resolve()  # the packaged folder


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
    with pytest.raises(ConfigError, match="must be at least 2 and divide data.image_size"):
        load_config(None, ["method.masking=mixmask", "method.mask.grid_size=7"])
    with pytest.raises(ConfigError, match="must be even"):
        load_config(None, ["method.masking=mixmask", "train.batch_size=33"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.masking=erase", "method.mask.grid_size=64"], "must be at least 2 and divide"),
    (["method.masking=both", "method.mask.grid_size=1"], "must be at least 2 and divide"),
    (["method.masking=mixmask", "method.mask.mask_ratio=0"], r"must lie in \(0, 1\)"),
    (["method.masking=unmix", "train.batch_size=34", "train.devices=2"], "per-device batch"),
    (["method.masking=both", "train.batch_size=9"], "must be even"),
    (["method.name=barlow_twins", "method.masking=mixmask", "method.mask.per_sample=true"],
     "one mask.*per batch"),
    (["method.masking=unmix", "method.unmix.p_mixup=1.5"], r"p_mixup' must lie in \[0, 1\]"),
    (["method.masking=unmix", "method.unmix.alpha=0"], "alpha' must be positive"),
    (["method.masking=erase", "method.erase.noise_std=-1"], "noise_std' must be 0 or more"),
    (["method.masking=erase", "method.erase.fill=black"], "must be one of 'noise'"),
    (["method.name=supervised"], "must be one of 'mocov2'"),
    (["method.name=byol", "method.byol.momentum_end=1.5"], r"must lie in \[0, 1\]"),
])
def test_impossible_mask_and_method_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_focal_erase_and_unmix_need_no_grid_that_divides_the_image():
    load_config(None, ["method.masking=erase", "method.erase.shape=focal",
                       "method.mask.grid_size=7"])
    load_config(None, ["method.masking=unmix", "method.mask.grid_size=7"])


def test_switching_the_method_keeps_each_methods_defaults():
    config = load_config(CONFIGS / "cifar100" / "mocov2_r18.yaml", ["method.name=vicreg"])
    assert config.method.vicreg.sim_weight == 25.0
    assert config.method.byol.pred_hidden_dim == 4096


def test_the_base_by_masking_matrix_is_complete_and_composed():
    make_matrix = load_script("configs/make_matrix.py")
    expected = make_matrix.matrix()
    assert len(expected) == 25
    for base in make_matrix.BASES:
        for masking in make_matrix.MASKINGS:
            path = CONFIGS / "cifar100" / f"{base}_{masking}_r18.yaml"
            assert path.read_text() == expected[path], (
                f"{path} is stale: run python configs/make_matrix.py")
            check_composed(path, base, masking)


def check_composed(path, base, masking):
    config = load_config(path)
    recipe = load_config(CONFIGS / "cifar100" / f"{base}_r18.yaml")
    assert (config.method.name, config.method.masking) == (base, masking)
    # The recipe is unchanged apart from the masking section and the run folder.
    assert config.train == recipe.train and config.data == recipe.data
    assert getattr(config.method, base) == getattr(recipe.method, base)
    assert config.out_dir == f"runs/cifar100/{path.stem}"


def test_list_of_bases_later_ones_win(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 5, lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 7}\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\ntrain: {batch_size: 64}\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.train.epochs, config.train.lr, config.train.batch_size) == (7, 0.1, 64)
    (tmp_path / "d.yaml").write_text("base: {a: 1}\n")
    with pytest.raises(ConfigError, match="'base' must be a file name or a list"):
        load_config(tmp_path / "d.yaml")


def test_base_inheritance_and_round_trip(tmp_path):
    config = load_config(CONFIGS / "cifar100" / "mixmask_mocov2_r18.yaml")
    assert config.method.masking == "mixmask"
    assert config.data.dataset == "cifar100"  # inherited from the base file
    assert config.method.mocov2.queue_size == 4096
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# configs/transfer/detectron2/ holds detectron2's configs, not ours.
@pytest.mark.parametrize("path", sorted(path for path in CONFIGS.rglob("*.yaml")
                                        if "detectron2" not in path.parts), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.parent.name == "transfer":
        # A transfer protocol file layers over a pretrained run's config.
        load_config(CONFIGS / "quickstart.yaml", layers=[path])
    elif path.parent.name == "eval" and "finetune_mae" in path.name:
        # MAE's finetuning options (layer decay, drop-path, pooling) are for ViT runs: the
        # protocol file layers over a ViT run's config.
        load_config(CONFIGS / "cifar10" / "mae_vit_tiny.yaml", layers=[path])
    else:
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
    assert "is neither a file nor a recipe name" in capsys.readouterr().err


def test_the_slurm_script_runs_a_valid_config_with_matching_task_counts():
    import re
    import shlex

    script = (CONFIGS / "cluster" / "slurm.sbatch").read_text()
    command = shlex.split(script[script.rindex("\nsrun ") + 1:].replace("\\\n", " "))
    assert command[:3] == ["srun", "mixmask", "pretrain"]
    config = load_config(Path(__file__).resolve().parents[1] / command[3], command[4:])
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", script).group(1))
    tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script).group(1))
    assert (config.train.num_nodes, config.train.devices) == (nodes, tasks)
    assert config.resume == "auto" and "#SBATCH --signal=TERM@" in script


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.mocov2.temperature=0"], "'method.mocov2.temperature' must be positive"),
    (["method.name=byol", "method.byol.pred_hidden_dim=0"], "'method.byol.pred_hidden_dim'"),
    (["data.num_views=3"], "takes 2 view"),
    (["data.num_views=-1"], "'data.num_views' must be 0 or more"),
])
def test_method_sections_and_view_counts_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
