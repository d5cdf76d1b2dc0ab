"""What mixmask reads besides checkpoints (docs/design.md, "What mixmask trusts"): YAML is
read with ``safe_load``, so a config or recipe that names a Python object runs nothing;
the HTML report escapes every string it takes from a run folder. (Archives: the 'data'
tar filter, tests/test_data.py::test_archive_escaping_its_folder_is_refused; checkpoints:
tests/test_checkpoint.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixmask.cli import main
from mixmask.config import load_config, save_config

TINY = ["data.dataset=synthetic", "data.subset=64", "model.width=0.125", "train.epochs=1"]


def _evil_yaml(marker: Path) -> str:
    return f"!!python/object/apply:os.system ['touch {marker}']\n"


def test_a_config_that_names_a_python_object_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "owned"
    config = tmp_path / "evil.yaml"
    config.write_text(_evil_yaml(marker))
    assert main(["pretrain", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # The same inside a section, and as the config.yaml of a run folder.
    config.write_text(f"train:\n  lr: {_evil_yaml(marker)}")
    assert main(["pretrain", str(config)]) == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_evil_yaml(marker))
    assert main(["knn", str(run)]) == 2
    assert not marker.exists()


def test_the_report_escapes_what_a_run_folder_says_and_runs_no_recipe(tmp_path):
    marker = tmp_path / "owned"
    run = tmp_path / "<b onmouseover=alert('run')>run"
    run.mkdir()
    save_config(load_config(None, [*TINY, f"out_dir={run}"]), run / "config.yaml")
    (run / "recipe.yaml").write_text(_evil_yaml(marker))
    hostile = "<script>alert(1)</script>"
    (run / "summary.json").write_text(json.dumps({"knn_top1": 12.5, hostile: hostile,
                                                   "note": "<img src=x onerror=alert(2)>"}))
    (run / "eval").mkdir()
    (run / "eval" / "knn.json").write_text(json.dumps({
        "protocol": hostile, "description": "<img src=x onerror=alert(3)>", "top1": 1.0,
        "top5": 5.0, "train_images": 1, "test_images": 1}))
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b on" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b onmouseover=alert(&#x27;run&#x27;)&gt;run" in page  # the run's name, as text
    assert not marker.exists()


def test_safe_load_refuses_python_tags(tmp_path):
    # The guarantee the two tests above lean on, stated on its own.
    marker = tmp_path / "owned"
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(_evil_yaml(marker))
    assert not marker.exists()
