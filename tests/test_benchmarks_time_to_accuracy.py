"""Smoke tests of benchmarks/time_to_accuracy.py on tiny runs, and of its --peer lightly
comparisons, MoCo v2 and (--peer-method) SimCLR and DINO (the lightly parts skip where
lightly, a benchmark-only package, is absent)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import PIL.Image
import pytest
from helpers import ROOT
from scripts import load_script

from mixmask.config import load_config
from mixmask.data.views import preset_views
from mixmask.train.fabric import native_bf16


def test_time_to_accuracy_writes_the_per_epoch_curve(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "time_to_accuracy.py"),
               "data.dataset=synthetic", "data.subset=32", "train.epochs=2", "model.width=0.125",
               "train.batch_size=16", "data.eval_train_subset=32", "data.eval_test_subset=16",
               "data.num_workers=0", "method.mocov2.proj_hidden_dim=32",
               "--budget-s", "1e6", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "within 1000000 s" in completed.stdout
    result = json.loads((tmp_path / "cpu_seed0.json").read_text())
    assert [row["epoch"] for row in result["epochs"]] == [1.0, 2.0]
    walls = [row["wall_time_s"] for row in result["epochs"]]
    assert 0 < walls[0] < walls[1]
    assert all(0 <= row["knn_top1"] <= 100 for row in result["epochs"])
    assert result["reached"]["epoch"] == 2.0


# --------------------------------------------------------------------------- --peer lightly

TINY = ["model.width=0.125", "train.batch_size=16", "method.mocov2.queue_size=64",
        "method.mocov2.proj_hidden_dim=32", "data.num_workers=0", "train.device=cpu"]


def test_peer_lightly_without_lightly_exits_2_with_one_sentence(monkeypatch, capsys):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    monkeypatch.setattr(sys, "argv", ["time_to_accuracy.py", "--peer", "lightly"])
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message == benchmark.LIGHTLY_MISSING and "pip install" in message
    assert "\n" not in message


def test_lightly_moco_v2_trains_a_few_steps_on_real_cifar_and_measures_knn(cifar10_tarball):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    config = load_config(benchmark.CONFIG, [*TINY, f"data.root={cifar10_tarball}",
                                            "data.subset=64", "data.eval_train_subset=64",
                                            "data.eval_test_subset=32"])
    row = benchmark.lightly_moco_v2(config, budget_s=1e6, max_steps=3, num_workers=0)
    assert row["pipeline"] == "lightly MoCo v2"
    assert row["steps"] == 3 and row["epochs"] == pytest.approx(3 / 4)  # 64 images / 16
    assert math.isfinite(row["knn_top1"]) and 0 <= row["knn_top1"] <= 100
    assert row["images_per_s"] > 0 and math.isfinite(row["last_loss"])
    assert 0 < row["train_s"] <= row["wall_s"]


def test_a_budget_stops_a_mixmask_run_at_a_step_boundary_with_its_checkpoint(tmp_path):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    config = load_config(benchmark.CONFIG, [
        *TINY, *benchmark.PEER_TRAINING_ONLY, "data.dataset=synthetic", "data.subset=64",
        "data.eval_train_subset=32", "data.eval_test_subset=16", "train.epochs=50",
        "train.progress_bar=false", f"out_dir={tmp_path / 'run'}"])
    handler_before = signal.getsignal(signal.SIGTERM)
    # A zero budget: the stop is sent as soon as the engine's handler is in place.
    row = benchmark.mixmask_run(config, "mixmask MixMask", budget_s=0.0)
    assert row["stopped_by_budget"] is True
    assert 1 <= row["steps"] < 50 * 4  # stopped long before the schedule's end
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert math.isfinite(row["knn_top1"]) and row["images_per_s"] > 0
    # The process's SIGTERM handler is back to what it was.
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_peer_lightly_prints_the_table_and_writes_the_json(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setattr(sys, "argv", [
        "time_to_accuracy.py", "--peer", "lightly", "--budget-s", "1e6", "--out", str(tmp_path),
        *TINY, "data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
        "data.eval_test_subset=16", "train.max_steps=2"])
    benchmark.main()
    shown = capsys.readouterr().out
    result = json.loads((tmp_path / "lightly_seed0.json").read_text())
    pipelines = ["lightly MoCo v2", "mixmask MoCo v2", "mixmask MixMask"]
    assert [row["pipeline"] for row in result["rows"]] == pipelines
    assert result["peer_method"] == "mocov2"  # the default
    assert all(name in shown for name in pipelines) and "kNN top-1" in shown
    assert all(row["steps"] == 2 and row["epochs"] == 1.0 for row in result["rows"])
    assert all(math.isfinite(row["knn_top1"]) for row in result["rows"])
    # One epoch of two steps: one point per kNN curve, at the final weights' kNN; lightly
    # in fp32, ours as train.precision=auto resolved it here.
    assert all(len(row["curve"]) == 1 and row["curve"][0]["knn_top1"] == row["knn_top1"]
               for row in result["rows"])
    expected = [("32", "bf16" if native_bf16("cpu") else "32")[pipeline != pipelines[0]]
                for pipeline in pipelines]
    assert [row["precision"] for row in result["rows"]] == expected
    assert result["comparison"]["target_knn"] == min(
        result["rows"][0]["knn_top1"], result["rows"][1]["knn_top1"])
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert result["machine"]["versions"]["lightly"]
    assert result["settings"]["knn"] == {"k": 200, "temperature": 0.1, "bank_images": 32,
                                         "test_images": 16}


def test_the_peer_comparison_reads_both_curves_as_the_hand_values():
    """Time to the kNN both reach (the lower final kNN, first epoch at or above it) and
    lightly's kNN after ours' training time, on hand-made curves."""
    benchmark = load_script("benchmarks/time_to_accuracy.py")

    def row(name, points, precision):
        return {"pipeline": name, "precision": precision,
                "curve": [{"epoch": i + 1.0, "train_s": t, "knn_top1": k}
                          for i, (t, k) in enumerate(points)]}
    lightly = row("lightly MoCo v2", [(100, 20.0), (200, 30.0), (300, 35.0), (400, 36.0)], "32")
    ours = row("mixmask MoCo v2", [(70, 21.0), (140, 29.0), (210, 34.0), (280, 35.5)], "bf16")
    found = benchmark.peer_comparison([lightly, ours])
    # Both reach 35.5: lightly at its 4th epoch (400 s), ours at its 4th (280 s).
    assert found["target_knn"] == 35.5
    assert (found["lightly_s"], found["ours_s"]) == (400, 280)
    assert found["speedup"] == pytest.approx(400 / 280)
    # After ours' 280 s lightly had finished 2 epochs: kNN 30.
    assert found["lightly_knn_at_ours_time"] == 30.0 and found["ours_precision"] == "bf16"
    assert benchmark.peer_comparison([lightly]) is None


def test_summarise_tabulates_every_seed_with_mean_and_spread(tmp_path):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    for seed, (speedup, knn) in enumerate([(1.4, 35.0), (1.6, 37.0)]):
        rows = [{"pipeline": "lightly MoCo v2", "precision": "32", "images_per_s": 100.0,
                 "knn_top1": knn, "train_s": 200.0}]
        comparison = {"target_knn": knn, "lightly_s": 140.0 * speedup, "ours_s": 140.0,
                      "speedup": speedup, "ours_knn": knn, "lightly_knn_at_ours_time": None}
        (tmp_path / f"lightly_seed{seed}.json").write_text(json.dumps(
            {"settings": {"seed": seed}, "rows": rows, "comparison": comparison}))
    table = benchmark.summarise_peer(tmp_path)
    assert "| lightly MoCo v2 | 32 | 100.00 ± 0.00 | 36.00 ± 1.41 | 200.00 ± 0.00 |" in table
    assert "| speed-up at equal kNN (lightly time / ours) | 1.50 ± 0.14 |" in table
    assert "| lightly: kNN after as much training time | - |" in table


# ------------------------------------------------- --peer lightly --peer-method simclr|dino

SMALL = ["model.width=0.125", "train.batch_size=16", "data.num_workers=0", "train.device=cpu",
         "data.dataset=synthetic", "data.eval_train_subset=32", "data.eval_test_subset=16"]


def small_recipe(benchmark, name, **changes):
    """The method's recipe with test-sized heads (and any ``changes``), everything else as
    the benchmark has it."""
    recipe = benchmark.PEER_RECIPES[name]
    heads = ({"proj_hidden_dim": 32, "proj_output_dim": 16} if name == "simclr" else
             {"proj_hidden_dim": 32, "bottleneck_dim": 16, "num_prototypes": 64})
    return dataclasses.replace(recipe, method={**recipe.method, **heads, **changes})


def spy_on(monkeypatch, module, name, calls):
    """Replace ``module.name`` (a class) by a subclass that records its arguments."""
    original = getattr(module, name)

    class Spy(original):
        def __init__(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, name, Spy)


def test_simclr_views_map_to_simclr_transform_parameter_by_parameter():
    """Our "simclr" preset (solo-learn's symmetric CIFAR views) as SimCLRTransform's
    arguments, written out by hand; the one thing it cannot match is the blur's kernel."""
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    arguments, differences = benchmark.lightly_simclr_views(preset_views("simclr", 32), None)
    assert arguments == {"input_size": 32, "cj_prob": 0.8, "cj_strength": 1.0, "cj_bright": 0.8,
                         "cj_contrast": 0.8, "cj_sat": 0.8, "cj_hue": 0.2, "min_scale": 0.08,
                         "random_gray_scale": 0.2, "gaussian_blur": 0.5, "sigmas": (0.1, 2.0),
                         "vf_prob": 0.0, "hf_prob": 0.5, "rr_prob": 0.0, "normalize": None}
    assert len(differences) == 1 and differences[0].startswith("blur")
    assert "13x13" in differences[0] and "radius=sigma" in differences[0]


def test_dino_views_map_to_dino_transform_parameter_by_parameter():
    """solo-learn's asymmetric CIFAR views (byol_cifar) with DINO's keys as DINOTransform's
    arguments: its default jitter at strength 0.5 (0.4, 0.4, 0.2, 0.1), no blur, the
    second view solarized with p 0.2, crop scale 0.08-1, no local crops; the one thing it
    cannot match is the bicubic crop."""
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    keys = benchmark.PEER_RECIPES["dino"].method_keys(10)
    arguments, differences = benchmark.lightly_dino_views(preset_views("byol_cifar", 32), keys,
                                                          None)
    assert arguments == {"global_crop_size": 32, "global_crop_scale": (0.08, 1.0),
                         "n_local_views": 0, "hf_prob": 0.5, "vf_prob": 0.0, "rr_prob": 0.0,
                         "cj_prob": 0.8, "cj_strength": 0.5, "cj_bright": 0.8,
                         "cj_contrast": 0.8, "cj_sat": 0.4, "cj_hue": 0.2,
                         "random_gray_scale": 0.2, "gaussian_blur": (0.0, 0.0, 0.0),
                         "sigmas": (0.1, 2.0), "solarization_prob": 0.2, "normalize": None}
    assert differences == ["crop resampling: lightly's is bicubic, ours bilinear "
                           "(data.augmentation's preset)"]
    # The global crops take method.dino.global_crop_scale over the preset's, as ours do.
    wider = benchmark.lightly_dino_views(preset_views("byol_cifar", 32),
                                         {**keys, "global_crop_scale": [0.4, 1.0]}, None)
    assert wider[0]["global_crop_scale"] == (0.4, 1.0) and wider[1] == differences
    # 50 of solo-learn's 1000 epochs: at least 1 epoch of 10, 10 of 200.
    assert keys["warmup_teacher_temperature_epochs"] == 1
    assert benchmark.PEER_RECIPES["dino"].method_keys(200)[
        "warmup_teacher_temperature_epochs"] == 10
    pytest.importorskip("lightly")
    from lightly.transforms import DINOTransform
    views = DINOTransform(**arguments)(PIL.Image.new("RGB", (32, 32)))
    assert [tuple(view.shape) for view in views] == [(3, 32, 32), (3, 32, 32)]


def test_lightly_simclr_trains_a_few_steps_and_measures_knn(monkeypatch):
    pytest.importorskip("lightly")
    import lightly.loss
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    recipe = small_recipe(benchmark, "simclr")
    config = load_config(benchmark.CONFIG, [*SMALL, "data.subset=64",
                                            *recipe.shared_overrides()])
    calls = []
    spy_on(monkeypatch, lightly.loss, "NTXentLoss", calls)
    row = benchmark.lightly_simclr(config, budget_s=1e6, max_steps=3, num_workers=0,
                                   recipe=recipe)
    assert row["pipeline"] == "lightly SimCLR" and row["precision"] == "32"
    assert row["steps"] == 3 and row["epochs"] == pytest.approx(3 / 4)  # 64 images / 16
    assert math.isfinite(row["knn_top1"]) and 0 <= row["knn_top1"] <= 100
    assert row["images_per_s"] > 0 and math.isfinite(row["last_loss"])
    assert calls == [("NTXentLoss", (), {"temperature": 0.2})]  # the recipe's, no memory bank


def test_lightly_dino_trains_past_its_frozen_first_epoch(monkeypatch):
    """Three steps of two per epoch: the last layer's gradients are cancelled in epoch 0
    (steps 0 and 1) and not in epoch 1; the teacher temperature warms up per epoch."""
    pytest.importorskip("lightly")
    import lightly.models.modules
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    recipe = small_recipe(benchmark, "dino")
    config = load_config(benchmark.CONFIG, [*SMALL, "data.subset=32",
                                            *recipe.shared_overrides()])
    epochs_seen = []
    cancel = lightly.models.modules.DINOProjectionHead.cancel_last_layer_gradients

    def recording_cancel(head, current_epoch):
        epochs_seen.append(current_epoch)
        frozen = current_epoch < head.freeze_last_layer
        cancel(head, current_epoch)
        assert (head.last_layer.weight_v.grad is None) == frozen

    monkeypatch.setattr(lightly.models.modules.DINOProjectionHead,
                        "cancel_last_layer_gradients", recording_cancel)
    row = benchmark.lightly_dino(config, budget_s=1e6, max_steps=3, num_workers=0,
                                 recipe=recipe)
    assert epochs_seen == [0, 0, 1]
    assert row["pipeline"] == "lightly DINO" and row["steps"] == 3
    assert [point["epoch"] for point in row["curve"]] == [1.0]
    assert math.isfinite(row["knn_top1"]) and math.isfinite(row["last_loss"])


@pytest.mark.parametrize("layers,batch_norm", [(2, True), (3, False), (1, False)])
def test_lightly_dino_mlp_has_our_heads_layers(layers, batch_norm):
    """lightly's DINO MLP for any proj_layers (its CIFAR benchmark swaps in 2 layers with BN)
    has our DINOHead's Linear shapes and BN places."""
    pytest.importorskip("lightly")
    from torch import nn

    from mixmask.models.heads import DINOHead
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    keys = {"proj_layers": layers, "proj_hidden_dim": 24, "bottleneck_dim": 8,
            "use_bn_in_head": batch_norm}
    theirs = benchmark._lightly_mlp(16, keys)
    ours = DINOHead(16, hidden_dim=24, bottleneck_dim=8, num_prototypes=5, num_layers=layers,
                    batch_norm=batch_norm).mlp

    def shape(mlp):
        return [(type(m).__name__, tuple(m.weight.shape)) for m in mlp
                if isinstance(m, (nn.Linear, nn.BatchNorm1d))]

    assert shape(theirs) == shape(ours)
    assert sum(isinstance(m, nn.Linear) for m in theirs) == layers


def test_the_recipe_is_the_one_place_both_sides_read(tmp_path, monkeypatch):
    """A value changed in PEER_RECIPES reaches lightly's loss and head and our config alike;
    lightly's transform takes its arguments from our config's views."""
    pytest.importorskip("lightly")
    import lightly.loss
    import lightly.models.modules
    import lightly.transforms
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    recipes = {"simclr": small_recipe(benchmark, "simclr", temperature=0.3),
               "dino": small_recipe(benchmark, "dino", teacher_temperature=0.05,
                                    student_temperature=0.2, center_momentum=0.8)}
    for name, recipe in recipes.items():
        monkeypatch.setitem(benchmark.PEER_RECIPES, name, recipe)
    calls = []
    for module, name in [(lightly.loss, "NTXentLoss"), (lightly.loss, "DINOLoss"),
                         (lightly.models.modules, "SimCLRProjectionHead"),
                         (lightly.models.modules, "DINOProjectionHead"),
                         (lightly.transforms, "SimCLRTransform"),
                         (lightly.transforms, "DINOTransform")]:
        spy_on(monkeypatch, module, name, calls)
    chosen = {"simclr": ["lightly SimCLR", "mixmask SimCLR"],
              "dino": ["lightly DINO", "mixmask DINO"]}
    for name in ("simclr", "dino"):
        configs = benchmark.peer_configs(name, scale="cpu",
                                         overrides=[*SMALL, "data.subset=32"], seed=0,
                                         run_root=tmp_path / name, chosen=chosen[name])
        benchmark.LIGHTLY_PIPELINES[name](configs[chosen[name][0]], budget_s=1e6,
                                          max_steps=1, num_workers=0)
        if len(configs) == 2:  # ours: method.<name>.* as the recipe has them
            ours = configs[chosen[name][1]]
            assert ours.method.name == name and ours.method.masking == "none"
            for key, value in recipes[name].method_keys(ours.train.epochs).items():
                got = getattr(ours.method.params, key)
                assert (list(got) if isinstance(got, tuple) else got) == value, key
            assert ours.data.augmentation == configs[chosen[name][0]].data.augmentation
    made = {name: (args, kwargs) for name, args, kwargs in calls}
    assert made["NTXentLoss"][1] == {"temperature": 0.3}
    assert made["SimCLRProjectionHead"][0][1:] == (32, 16)
    assert made["DINOLoss"][1] == {"output_dim": 64, "warmup_teacher_temp": 0.04,
                                   "teacher_temp": 0.05, "warmup_teacher_temp_epochs": 1,
                                   "student_temp": 0.2, "center_momentum": 0.8}
    assert made["DINOProjectionHead"][0][1:] == (32, 16, 64)
    simclr_view = preset_views("simclr", 32)[0]
    transform = made["SimCLRTransform"][1]
    assert (transform["min_scale"], transform["cj_bright"], transform["gaussian_blur"]) == (
        simclr_view.scale[0], simclr_view.brightness, simclr_view.blur_p)
    assert made["DINOTransform"][1]["solarization_prob"] == preset_views("byol_cifar", 32)[
        1].solarize_p


def run_peer(benchmark, monkeypatch, tmp_path, *flags):
    monkeypatch.setattr(sys, "argv", [
        "time_to_accuracy.py", *SMALL, "data.subset=32", "train.max_steps=2", "--peer", "lightly",
        "--budget-s", "1e6", "--out", str(tmp_path), *flags])
    benchmark.main()


def test_peer_method_simclr_writes_its_json_and_summarises_per_method(tmp_path, monkeypatch,
                                                                       capsys):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setitem(benchmark.PEER_RECIPES, "simclr", small_recipe(benchmark, "simclr"))
    run_peer(benchmark, monkeypatch, tmp_path, "--peer-method", "simclr")
    shown = capsys.readouterr().out
    assert not (tmp_path / "lightly_seed0.json").exists()  # MoCo v2's name stays its own
    result = json.loads((tmp_path / "lightly_simclr_seed0.json").read_text())
    pipelines = ["lightly SimCLR", "mixmask SimCLR"]
    assert result["peer_method"] == "simclr"
    assert [row["pipeline"] for row in result["rows"]] == pipelines
    assert all(name in shown for name in pipelines) and "differ from ours in" in shown
    assert all(row["steps"] == 2 and row["epochs"] == 1.0 for row in result["rows"])
    assert all(len(row["curve"]) == 1 and math.isfinite(row["knn_top1"])
               for row in result["rows"])
    assert result["comparison"]["target_knn"] == min(row["knn_top1"] for row in result["rows"])
    settings = result["settings"]
    assert settings["recipe"]["method"]["temperature"] == 0.2
    assert settings["recipe"]["shared"]["data.augmentation"] == "simclr"
    assert settings["lightly_transform"].startswith("SimCLRTransform(input_size=32, ")
    assert [d.split(" ")[0] for d in settings["view_differences"]] == ["blur"]
    resolved = settings["resolved_config"]["mixmask SimCLR"]["method"]
    assert resolved["name"] == "simclr" and resolved["simclr"]["proj_hidden_dim"] == 32

    monkeypatch.setattr(sys, "argv", ["time_to_accuracy.py", "--peer", "lightly", "--peer-method",
                                      "simclr", "--summarise", "--out", str(tmp_path)])
    benchmark.main()
    table = capsys.readouterr().out
    assert "| lightly SimCLR | 32 |" in table and "| mixmask SimCLR |" in table
    assert "| comparison (lightly SimCLR vs mixmask SimCLR) | value |" in table


def test_peer_method_dino_runs_lightly_alone(tmp_path, monkeypatch):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setitem(benchmark.PEER_RECIPES, "dino", small_recipe(benchmark, "dino"))
    run_peer(benchmark, monkeypatch, tmp_path, "--peer-method", "dino", "--pipelines",
             "lightly")
    result = json.loads((tmp_path / "lightly_dino_seed0.json").read_text())
    assert result["peer_method"] == "dino" and result["comparison"] is None
    assert [row["pipeline"] for row in result["rows"]] == ["lightly DINO"]
    assert result["settings"]["recipe"]["method"]["warmup_teacher_temperature_epochs"] == 1
    assert result["settings"]["lightly_transform"].startswith("DINOTransform(")


def test_peer_method_dino_writes_both_rows(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    monkeypatch.setitem(benchmark.PEER_RECIPES, "dino", small_recipe(benchmark, "dino"))
    # 48 images: 3 steps an epoch; 4 steps cross the frozen first epoch on both sides (ours
    # counts epochs as progress x train.epochs: steps 2 and 3 are its epoch 1).
    run_peer(benchmark, monkeypatch, tmp_path, "--peer-method", "dino", "data.subset=48",
             "train.max_steps=4", "train.epochs=2")
    result = json.loads((tmp_path / "lightly_dino_seed0.json").read_text())
    assert [row["pipeline"] for row in result["rows"]] == ["lightly DINO", "mixmask DINO"]
    assert all(row["steps"] == 4 and math.isfinite(row["knn_top1"])
               and math.isfinite(row["last_loss"]) for row in result["rows"])
    assert result["comparison"] is not None
    resolved = result["settings"]["resolved_config"]["mixmask DINO"]
    assert resolved["method"]["dino"]["global_crop_scale"] == [0.08, 1.0]
    assert resolved["data"]["augmentation"] == "byol_cifar"
    assert "| mixmask DINO |" in benchmark.summarise_peer(tmp_path, "dino")


@pytest.mark.parametrize("flags, said", [
    (["--peer-method", "simclr", "method.simclr.temperature=0.5"],
     "method.simclr.temperature=0.5 would change mixmask's SimCLR only"),
    (["--peer-method", "simclr", "--pipelines", "mixmask"],
     "--pipelines mixmask: not a pipeline of --peer-method simclr"),
    (["--peer-method", "simclr", "train.optimizer=lars"], "torch.optim.SGD"),
])
def test_peer_method_refuses_what_would_split_the_recipe(tmp_path, monkeypatch, capsys, flags,
                                                         said):
    pytest.importorskip("lightly")
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    with pytest.raises(SystemExit) as exit_info:
        run_peer(benchmark, monkeypatch, tmp_path, *flags)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert said in message and "\n" not in message
    assert not list(tmp_path.glob("*.json"))


def test_summarise_keeps_each_method_to_its_own_files(tmp_path):
    benchmark = load_script("benchmarks/time_to_accuracy.py")
    for stem, name, seeds in [("lightly_seed", "lightly MoCo v2", [0]),
                              ("lightly_simclr_seed", "lightly SimCLR", [0, 1, 2])]:
        for seed in seeds:
            rows = [{"pipeline": name, "precision": "32", "images_per_s": 100.0 + seed,
                     "knn_top1": 30.0, "train_s": 200.0}]
            (tmp_path / f"{stem}{seed}.json").write_text(json.dumps(
                {"settings": {"seed": seed}, "rows": rows, "comparison": None}))
    simclr = benchmark.summarise_peer(tmp_path, "simclr")
    assert simclr.startswith("seeds: 0, 1, 2")
    assert "| lightly SimCLR | 32 | 101.00 ± 1.00 | 30.00 ± 0.00 |" in simclr
    assert "MoCo" not in simclr
    moco = benchmark.summarise_peer(tmp_path)
    assert moco.startswith("seeds: 0\n") and "SimCLR" not in moco
    with pytest.raises(SystemExit, match="lightly_dino_seed.*--peer-method dino"):
        benchmark.summarise_peer(tmp_path, "dino")
