"""The documentation site: the API page's examples run, the generated configuration
reference covers every config field, and ``mkdocs build --strict`` succeeds."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT

DOCS = ROOT / "docs"


def _load_hook():
    # The hook is a file mkdocs loads by path, not a package module.
    spec = importlib.util.spec_from_file_location("docs_reference_hook",
                                                  DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_hook()


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


# --------------------------------------------------------------------------- (a) API page


def test_api_mixmask_step_runs_and_trains_the_backbone():
    blocks = _python_blocks(DOCS / "api.md")
    assert blocks, "docs/api.md has no ```python block"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS / "api.md"), "exec"), namespace)

    loss, mix = namespace["loss"], namespace["mix"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    # The MixMask loss recomputed from its terms (arXiv 2210.11456): each mix credited to
    # the two images by their pixel shares; the reversed partner makes 1 - lam[B-1-i].
    clean, mixed, switched = namespace["clean"], namespace["mixed"], namespace["switched"]
    expected = (clean + mix.lam * mixed + (1 - mix.lam.flip(0)) * switched).mean()
    torch.testing.assert_close(loss, expected)
    assert 0.0 < float(mix.lam[0]) < 1.0

    backbone = namespace["backbone"]
    grads = [parameter.grad for parameter in backbone.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert backbone.conv1.weight.grad.abs().sum() > 0  # the first layer: the whole way down
    # The key encoder is a frozen copy: no gradient may reach it.
    assert all(parameter.grad is None for parameter in namespace["target"].parameters())


def test_api_config_example_runs(monkeypatch, capsys):
    blocks = _python_blocks(DOCS / "api.md")
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)  # the example names configs/ relative to the repository
    for block in blocks[1:]:
        exec(compile(block, str(DOCS / "api.md"), "exec"), {})
    printed = capsys.readouterr().out
    assert "mocov2 none " in printed  # the override reached the typed config
    assert "Did you mean 'train.batch_size'?" in printed


# --------------------------------------------------------------------------- (b) config reference


def _expected_keys() -> set[str]:
    """Every dotted key, walked from the dataclasses independently of the generator."""
    from mixmask.config import Config, MethodConfig
    from mixmask.methods.registry import method_class, method_names

    def walk(cls: type, prefix: str) -> set[str]:
        hints = typing.get_type_hints(cls)
        keys = set()
        for item in dataclasses.fields(cls):
            kind = hints[item.name]
            if kind is MethodConfig:
                keys |= {"method.name"}
                for name in method_names():
                    axis = method_class(name).axis_config_class
                    if axis is not None:
                        keys |= walk(axis, "method.")
                    keys |= walk(method_class(name).config_class, f"method.{name}.")
            elif dataclasses.is_dataclass(kind):
                keys |= walk(kind, f"{prefix}{item.name}.")
            else:
                keys.add(prefix + item.name)
        return keys

    return walk(Config, "")


def _reference_rows() -> dict[str, list[str]]:
    rows = {}
    for line in reference.config_reference_markdown().splitlines():
        match = re.match(r"^\| `([\w.]+)` \|(.*)\|$", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} listed twice"
            # Cells split on pipes outside code spans, as the tables extension does.
            cells = re.split(r"(?<!\\)\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", match.group(2))
            rows[match.group(1)] = [cell.strip() for cell in cells]
    return rows


def test_reference_lists_every_config_field_once():
    rows = _reference_rows()
    expected = _expected_keys()
    assert len(expected) > 150  # the walk found the sections, not an empty Config
    assert set(rows) == expected


def test_reference_types_defaults_and_choices():
    from mixmask.config import DataConfig, TrainConfig
    from mixmask.methods.registry import method_names

    rows = _reference_rows()
    kind, default, allowed, _ = rows["train.batch_size"]
    assert (kind, default, allowed) == ("int", f"`{TrainConfig().batch_size}`", "")

    kind, default, allowed, description = rows["data.dataset"]
    choices = typing.get_args(typing.get_type_hints(DataConfig)["dataset"])
    assert kind == "str" and default == f"`{DataConfig().dataset}`"
    assert allowed == ", ".join(f"`{choice}`" for choice in choices)
    assert "tinyimagenet (the official folder layout)" in description

    # YAML spellings: a tuple default is a list, a string that YAML would read as a number
    # keeps its quotes, a bool is lower case.
    assert rows["train.betas"][:2] == ["[float, float]", "`[0.9, 0.999]`"]
    assert rows["eval.linear_milestones"][:2] == ["list[float]", "`[0.6, 0.8]`"]
    assert rows["train.precision"][1:3] == ["`auto`", "`auto`, `'32'`, `bf16`, `'16'`"]
    assert rows["data.download"][1] == "`false`"

    # Comments: the block above a field, and one on the field's own line.
    assert rows["data.subset"][3].startswith("Use only the first N training images (0 = all).")
    assert rows["train.max_steps"][3] == "0 = no cap"
    assert rows["method.name"][2] == ", ".join(f"`{name}`" for name in method_names())
    assert rows["method.masking"][2] == "`none`, `erase`, `mixmask`, `unmix`, `both`"
    assert rows["method.mae.mask_ratio"][1] == "`0.75`"


@dataclass
class _Commented:
    # Two lines
    # above.
    first: int = 1
    second: str = "x"  # on its line
    # A block separated by a blank line is not the next field's.

    third: float = 0.5
    fourth: bool = True


def test_field_comments_read_the_source():
    assert reference.field_comments(_Commented) == {"first": "Two lines above.",
                                                    "second": "on its line"}


def test_placeholders_are_replaced_and_a_misspelt_one_is_an_error():
    page = "# Config\n\n<!-- generated: config-reference -->\n"
    generated = reference.on_page_markdown(page)
    assert "<!--" not in generated and "| `train.batch_size` |" in generated
    api = reference.on_page_markdown("<!-- generated: api-index mixmask.ops.mixing -->")
    assert "| `weighted_mix_loss(" in api
    with pytest.raises(ValueError, match="unknown generated block"):
        reference.on_page_markdown("<!-- generated: config-refrence -->")


# --------------------------------------------------------------------------- (c) the site builds


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "train.batch_size" in page and "generated:" not in page
    assert not (tmp_path / "site" / "hooks").exists()  # the hook is not published
