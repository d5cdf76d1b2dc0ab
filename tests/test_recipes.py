"""The recipes ship inside the package and run by name (issue 29)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from mixmask import __version__
from mixmask.cli import main
from mixmask.config import RECIPES_DIR, load_config, recipe_names, resolve_recipe
from mixmask.config.catalog import pretraining_recipes, protocol_files
from mixmask.errors import ConfigError


def test_the_checkouts_configs_folder_is_the_packaged_one():
    assert (ROOT / "configs").resolve() == RECIPES_DIR


def test_the_recipe_list_is_every_config_file():
    on_disk = {path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
               for path in RECIPES_DIR.rglob("*.yaml")}
    mixmask_files = {name for name in on_disk if not name.startswith("transfer/detectron2/")}
    assert set(recipe_names()) == mixmask_files
    listed = {row["name"] for row in pretraining_recipes()}
    # Every file of the pretraining folders is a recipe except the shared base of the
    # CIFAR-100 ResNet recipes (no method of its own); masking/ holds fragments.
    bases = {"cifar100/common_r18"}
    expected = {name for name in mixmask_files
                if name.rpartition("/")[0] in ("", "cifar10", "cifar100", "imagenet")} - bases
    assert listed == expected and "quickstart" in listed
    assert {row["name"] for row in protocol_files()} == {
        name for name in mixmask_files if name.startswith(("eval/", "transfer/"))}
    assert all(row["about"] for row in pretraining_recipes())


def test_a_name_resolves_from_any_folder_and_a_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("quickstart") == RECIPES_DIR / "quickstart.yaml"
    assert resolve_recipe("configs/cifar10/mae_vit_tiny.yaml") == (
        RECIPES_DIR / "cifar10" / "mae_vit_tiny.yaml")  # as the docs write it
    assert resolve_recipe("knn", protocol=True) == RECIPES_DIR / "eval" / "knn.yaml"
    (tmp_path / "quickstart").write_text("train: {epochs: 3}\n")
    assert resolve_recipe("quickstart") == Path("quickstart")  # a file of that name wins
    assert load_config("quickstart").train.epochs == 3


@pytest.mark.parametrize("given, hint", [
    ("quickstrat", "Did you mean 'quickstart'?"),
    ("mocov2_mixmask_r1", "Did you mean 'cifar100/mocov2_mixmask_r18'?"),
    ("eval/../quickstart", ""),  # names only: no path through the folder
    ("transfer/detectron2/Base-RCNN-C4-BN", ""),  # detectron2's, not a mixmask config
])
def test_an_unknown_name_is_one_sentence_with_the_closest_recipe(given, hint, capsys):
    with pytest.raises(ConfigError, match="is neither a file nor a recipe name"):
        resolve_recipe(given)
    assert main(["pretrain", given]) == 2
    err = capsys.readouterr().err
    assert hint in err and len(err.strip().splitlines()) == 1


def test_a_copied_recipe_stands_alone_and_reads_as_the_original(tmp_path, capsys):
    for name in ("quickstart", "cifar100/byol_erase_r18"):  # a plain file; one with bases
        assert main(["recipes", name, "--copy", str(tmp_path)]) == 0
        copy = tmp_path / f"{name.split('/')[-1]}.yaml"
        assert "base" not in yaml.safe_load(copy.read_text())
        assert load_config(copy).to_dict() == load_config(name).to_dict()
    assert main(["recipes", "quickstart", "--copy", str(tmp_path)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_evaluation_protocol_files_by_name():
    by_name = load_config("quickstart", layers=["semisup_10pct"]).to_dict()
    by_path = load_config(RECIPES_DIR / "quickstart.yaml",
                          layers=[RECIPES_DIR / "eval" / "semisup_10pct.yaml"]).to_dict()
    assert by_name == by_path


def test_the_listing_version_and_module_entry_point(tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(row["name"] in out for row in pretraining_recipes())
    done = subprocess.run([sys.executable, "-m", "mixmask", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"mixmask {__version__}"


def test_every_file_the_wheel_must_carry_is_in_its_package_data():
    # pyproject's package-data patterns (the wheel itself is built and run by .ci/run).
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["mixmask.config"]
    package = RECIPES_DIR.parent
    carried = {path for pattern in patterns for path in package.glob(pattern)}
    needed = {path for path in RECIPES_DIR.rglob("*") if path.suffix in (".yaml", ".sbatch")}
    assert needed and needed <= carried
