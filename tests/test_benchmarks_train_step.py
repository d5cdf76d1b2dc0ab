"""Smoke test of benchmarks/train_step.py at toy sizes (a few seconds on CPU)."""

import json
import sys

import pytest
import torch
from scripts import load_script

TINY = ["--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0", "--width", "0.125",
        "--queue", "64", "--recipes"]


def load_benchmark():
    return load_script("benchmarks/train_step.py")


def test_without_lightly_skips_its_rows_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    result = load_benchmark().main([*TINY, "--out", str(tmp_path)])
    rows = result["results"]
    assert [row["row"] for row in rows] == ["ours mocov2", "ours mixmask"]
    assert all(row["images_per_s"] > 0 and row["state_mib"] > 0 for row in rows)
    assert rows[0]["mix_cost_vs_mocov2"] is None and rows[1]["mix_cost_vs_mocov2"] > 0
    assert all(row["ours_vs_lightly"] is None for row in rows)
    assert "lightly is not installed" in result["notes"][0]
    assert result["versions"]["lightly"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["cpu_count"] >= 1 and saved["settings"]["batch"] == 4


def test_all_rows_with_lightly(tmp_path):
    pytest.importorskip("lightly")
    result = load_benchmark().main([*TINY, "--out", str(tmp_path)])
    rows = {row["row"]: row for row in result["results"]}
    assert list(rows) == ["ours mocov2", "ours mixmask", "lightly mocov2", "lightly mixmask"]
    for name in ("ours mixmask", "lightly mixmask"):
        assert rows[name]["mix_cost_vs_mocov2"] > 0
    for name in ("ours mocov2", "ours mixmask"):
        assert rows[name]["ours_vs_lightly"] > 0
    assert result["versions"]["lightly"] and not result["notes"]


def test_mim_recipe_rows_step_their_recipes_beside_mocov2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)
    result = load_benchmark().main([*TINY, "mae", "a2mim_r18", "siameseim_r18", "--masking",
                                    "none", "--steps", "2", "--out", str(tmp_path)])
    rows = {row["row"]: row for row in result["results"]}
    assert list(rows) == ["ours mocov2", "ours mae", "ours a2mim_r18", "ours siameseim_r18"]
    assert "configs/cifar10/mae_vit_tiny.yaml" in rows["ours mae"]["description"]
    for name in ("ours mae", "ours a2mim_r18", "ours siameseim_r18"):
        assert rows[name]["images_per_s"] > 0 and rows[name]["state_mib"] > 0
        assert rows[name]["mix_cost_vs_mocov2"] > 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("masking", ["none", "mixmask"])
def test_lightly_rows_compute_ours_loss_and_enqueue_each_key_once(masking, symmetric):
    pytest.importorskip("lightly")
    bench = load_benchmark()
    lightly = bench.import_lightly()
    args = bench.parse_args([*TINY, "--batch", "6"] + (["--symmetric"] if symmetric else []))
    device = torch.device("cpu")
    views = bench.make_views(args, device)
    ours = bench.build_ours(masking, views, device, args)
    peer = bench.build_lightly(lightly, masking, views, device, args)
    for _ in range(2):  # same weights, queue and masks: the same loss, step by step
        torch.testing.assert_close(peer.step(), ours.step(), rtol=1e-4, atol=1e-5)
    keys = 2 * args.batch * (2 if symmetric else 1)
    assert int(ours.modules["method"].queue_pointer) == keys
    assert int(peer.modules["criterion"].memory_bank.bank_ptr) == keys
