"""Smoke test of benchmarks/augment.py at toy sizes (a few seconds on CPU)."""

import json
import sys

import pytest
from scripts import load_script

TINY = ["--device", "cpu", "--data", "random", "--workers", "0", "--batch", "4",
        "--seconds", "0.01", "--warmup", "0", "--pil-rounds", "1"]


def load_benchmark():
    return load_script("benchmarks/augment.py")


def test_all_methods_at_both_sizes(tmp_path):
    pytest.importorskip("kornia")
    result = load_benchmark().main([*TINY, "--sizes", "32", "224", "--out", str(tmp_path)])
    methods = {(row["method"], row["size"]) for row in result["results"]}
    expected = ["torchvision PIL", "ours", "kornia (slice)", "kornia (resample)"]
    assert methods == {(m, s) for m in expected for s in (32, 224)}
    for row in result["results"]:
        assert row["images_per_s"] > 0 and row["views_per_s"] == 2 * row["images_per_s"]
        assert row["speedup_vs_torchvision_pil"] > 0
    assert [r["preset"] for r in result["results"] if r["method"] == "ours"] == ["cifar", "mocov2"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["versions"]["kornia"] and saved["machine"]["cpu_count"] >= 1


def test_without_kornia_skips_its_rows_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)  # `import kornia` raises ImportError
    result = load_benchmark().main([*TINY, "--sizes", "32", "--methods", "ours", "kornia",
                                    "--out", str(tmp_path)])
    assert [row["method"] for row in result["results"]] == ["ours"]
    assert result["results"][0]["speedup_vs_torchvision_pil"] is None
    assert "kornia is not installed" in result["notes"][0]
    assert result["versions"]["kornia"] is None
