"""The benchmarks' GPU-scale settings resolve to valid configs.

No GPU runs in CI, so a typo in a ``--scale gpu`` override list would only surface on a
lent GPU, after its start-up time is spent; these checks load each such config here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from scripts import load_script

from mixmask.config import load_config


def load_benchmark(name: str):
    return load_script(f"benchmarks/{name}.py")


@pytest.mark.parametrize("base", ["mocov2", "byol", "simsiam", "barlow_twins", "vicreg"])
@pytest.mark.parametrize("strategy", ["none", "erase", "mixmask", "unmix", "both"])
def test_masking_ablation_gpu_scale_is_a_valid_config(base, strategy):
    ablation = load_benchmark("masking_ablation")
    config = load_config(ablation.CONFIG, [*ablation.SCALES["gpu"], f"method.name={base}",
                                           *ablation.fragment_overrides(strategy)])
    assert config.method.name == base
    assert (config.train.device, config.train.precision) == ("cuda", "bf16")
    assert (config.train.batch_size, config.train.epochs) == (512, 200)
    assert (config.model.width, config.data.subset) == (1.0, 0)


@pytest.mark.parametrize("recipe", ["cifar10/simclr_r18", "cifar10/dino_r18"])
def test_time_to_accuracy_gpu_scale_takes_the_baselines_recipes(recipe):
    """The SimCLR anchor (500 epochs) and DINO at the GPU scale: full CIFAR-10, width 1,
    batch 512 on the device pipeline, the recipe's own method keys and optimizer."""
    benchmark = load_benchmark("time_to_accuracy")
    config = load_config(recipe, [*benchmark.SCALES["gpu"], "train.epochs=500"])
    assert config.method.name == recipe.split("/")[1].split("_")[0]
    assert (config.train.device, config.data.pipeline, config.train.optimizer) == (
        "cuda", "device", "lars")
    assert (config.train.batch_size, config.model.width, config.data.subset) == (512, 1.0, 0)


@pytest.mark.parametrize("base", ["simclr", "dino"])
@pytest.mark.parametrize("strategy", ["none", "erase", "mixmask"])
def test_masking_ablation_takes_simclr_and_dino_with_their_peer_recipes(base, strategy):
    ablation = load_benchmark("masking_ablation")
    config = load_config(ablation.CONFIG, [
        *ablation.SCALES["cpu"], *ablation.base_overrides(base, "cpu", []),
        *ablation.fragment_overrides(strategy)])
    assert (config.method.name, config.method.masking) == (base, strategy)
    recipe = ablation.PEER_RECIPES[base]
    assert config.data.augmentation == recipe.shared["data.augmentation"]
    section = getattr(config.method, base)
    for key, value in recipe.method_keys(config.train.epochs).items():
        assert getattr(section, key) == (tuple(value) if isinstance(value, list) else value)


def test_time_to_accuracy_gpu_scale_is_a_valid_config():
    benchmark = load_benchmark("time_to_accuracy")
    config = load_config(benchmark.CONFIG, [*benchmark.SCALES["gpu"], "monitor.knn=true",
                                            "monitor.online_probe=true"])
    assert (config.train.device, config.data.pipeline) == ("cuda", "device")
    assert (config.train.batch_size, config.model.width, config.data.subset) == (512, 1.0, 0)


def test_epoch_time_gpu_scale_is_a_valid_config():
    benchmark = load_benchmark("epoch_time")
    overrides, epochs, profile_start, profile_steps = benchmark.SCALES["gpu"]
    config = load_config(benchmark.CONFIG, [*benchmark.COMMON, *overrides,
                                            f"train.epochs={epochs}",
                                            f"train.profile_start_step={profile_start}",
                                            f"train.profile_steps={profile_steps}"])
    assert (config.method.masking, config.data.pipeline) == ("mixmask", "device")
    assert (config.train.batch_size, config.data.subset, config.model.width) == (512, 0, 1.0)
    steps_per_epoch = 50_000 // 512
    assert profile_start + profile_steps <= steps_per_epoch  # the profile stays in epoch 1


def test_epoch_time_reports_epochs_and_the_profiled_busy_share(tmp_path):
    benchmark = load_benchmark("epoch_time")
    result = benchmark.main(["data.dataset=synthetic", "data.subset=64", "train.batch_size=16",
                             "model.width=0.125", "method.mocov2.proj_hidden_dim=32",
                             "data.num_workers=0", "--epochs", "2", "--profile-start", "1",
                             "--profile-steps", "2", "--out", str(tmp_path)])
    assert result["images_per_epoch"] == 64 and len(result["epoch_seconds"]) == 2
    assert all(seconds > 0 for seconds in result["epoch_seconds"])
    assert result["steady_epoch_seconds"] == result["epoch_seconds"][1]
    assert result["profile"]["steps"] == 2 and 0 < result["profile"]["busy_fraction"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["epoch_seconds"] == \
        result["epoch_seconds"]


def test_eval_protocols_benchmark_runs_the_contract_commands_with_valid_overrides():
    import argparse
    from pathlib import Path

    from mixmask.cli import _parser

    benchmark = load_benchmark("eval_protocols")
    options = argparse.Namespace(linear_epochs=30, moco_epochs=10, finetune_epochs=20,
                                 finetune_epochs_full=5)
    commands = benchmark.protocol_commands(Path("RUN"), options)
    assert [command[0] for command in commands] == ["knn", "linear", "linear", *["finetune"] * 6]
    flags = [" ".join(item for item in command[2:] if "=" not in item) for command in commands]
    assert flags == ["", "--protocol cached", "--protocol moco", "--labels 1%",
                     "--labels 1% --from-scratch", "--labels 10%", "--labels 10% --from-scratch",
                     "--labels 100%", "--labels 100% --from-scratch"]
    for command in commands:  # each parses as the CLI's contract form, overrides included
        args, extra = _parser().parse_known_args([*command, *benchmark.EVALUATION])
        assert args.run == "RUN" and all("=" in item for item in extra)
        load_config(benchmark.CONFIG, [*benchmark.PRETRAIN, *benchmark.EVALUATION,
                                       *[item for item in command if "=" in item]])


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_mim_ablation_variants_are_valid_configs(scale):
    benchmark = load_benchmark("mim_ablation")
    for name, (recipe, variant, family) in benchmark.VARIANTS.items():
        config = load_config(benchmark.CONFIGS / recipe, [*benchmark.SCALES[scale], *variant,
                                                          *benchmark.EVALUATION[scale]])
        assert config.method.name in ("mae", "a2mim", "mocov2", "siameseim", "simmim",
                                      "ibot"), name
        # The finetune command's protocol file and overrides over this variant's run config.
        finetune = benchmark.FINETUNE[family][scale]
        layers = finetune[1:2] if finetune else []
        tuned = load_config(benchmark.CONFIGS / recipe, [
            *benchmark.SCALES[scale], *variant, *benchmark.EVALUATION[scale],
            *finetune[2:]], layers=layers)
        transformer = "vit" in recipe or "convmae" in recipe
        assert tuned.eval.finetune_recipe == ("mae" if transformer else "sgd"), name
    pixmim = load_config(benchmark.CONFIGS / "pixmim_vit_tiny.yaml",
                         benchmark.VARIANTS["pixmim_clean"][1])
    assert (pixmim.method.mae.target, pixmim.method.mae.lowpass_mode) == ("lowpass", "clean")


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_siameseim_claims_variants_and_evaluations_are_valid_configs(scale):
    benchmark = load_benchmark("siameseim_claims")
    assert {"siameseim_vit", "siameseim_r18", "mae", "mocov2_r18"} <= set(benchmark.RECIPES)
    for name, (recipe, variant, _) in benchmark.RECIPES.items():
        config = load_config(benchmark.CONFIGS / recipe, [*benchmark.SCALES[scale], *variant,
                                                          *benchmark.EVALUATION[scale]])
        assert config.scenarios.robustness_test_images == (200 if scale == "cpu" else 0), name


SUITE_STEPS = ["gpu_checks", "augment", "train_step", "epoch_time", "time_to_accuracy"]


def _suite(destination: Path, timeout: int, **environment: str):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(destination)], cwd=root,
                          env={**os.environ, **environment}, capture_output=True, text=True,
                          timeout=timeout)


def test_the_gpu_suite_dry_run_lists_its_steps_parses_their_flags_and_writes_nothing(
        tmp_path):
    destination = tmp_path / "suite"
    listing = _suite(destination, 60, DRY_RUN="1", MIXMASK_DATA=str(tmp_path / "nowhere"))
    assert listing.returncode == 0, listing.stderr
    assert not destination.exists()  # a dry run changes nothing
    steps = [line for line in listing.stdout.splitlines() if line.startswith("== ")]
    assert [line.split()[1] for line in steps] == SUITE_STEPS
    commands = {line.split()[1]: line.split(": ", 1)[1].split() for line in steps}
    args = load_benchmark("train_step").parse_args(commands["train_step"][2:])
    assert args.gpu and args.burst and args.libraries == ["ours"]
    for name, command in commands.items():  # every step writes under the destination
        assert str(destination / name) in command, (name, command)
        assert "timeout" not in command  # the limit is the suite's, printed in the header


def test_the_gpu_suite_without_its_data_stops_at_once_with_one_line(tmp_path):
    done = _suite(tmp_path / "suite", 60, MIXMASK_DATA=str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no CIFAR-10 tarball" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "suite").exists()


@pytest.mark.slow
def test_the_gpu_suite_on_the_cpu_at_toy_sizes_writes_every_json(tmp_path, cifar10_tarball):
    destination = tmp_path / "suite"
    done = _suite(destination, 900, CPU_SMOKE="1", MIXMASK_DATA=str(cifar10_tarball.parent),
                  TOTAL_S="900")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {name: sorted(path.name for path in (destination / name).glob("*.json"))
               for name in SUITE_STEPS}
    assert written == {"gpu_checks": ["results.json"], "augment": ["results.json"],
                       "train_step": ["results.json"], "epoch_time": ["results.json"],
                       "time_to_accuracy": ["cpu_seed0.json"]}, done.stdout[-3000:]
    checks = json.loads((destination / "gpu_checks" / "results.json").read_text())
    assert checks["passed"] == len(checks["checks"]) == 5, checks


def test_a_benchmark_stopped_by_its_time_limit_writes_what_it_measured(tmp_path):
    # TERM while the training step benchmark times its rows: the JSON still comes.
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "train_step"
    process = subprocess.Popen(
        [sys.executable, "benchmarks/train_step.py", "--device", "cpu", "--batch", "8",
         "--steps", "100000", "--warmup", "1", "--width", "0.125", "--libraries", "ours",
         "--masking", "none", "--recipes", "--out", str(out)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the rows are being timed
        line = process.stdout.readline()
        if "warm-up done" in line:
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    result = json.loads((out / "results.json").read_text())
    assert result["stopped"] == "stopped by SIGTERM"
    assert result["results"] and len(result["results"][0]["step_seconds"]) >= 1


def test_mim_ablation_markdown_table_reads_each_run_and_its_floor(tmp_path):
    benchmark = load_benchmark("mim_ablation")

    def write(path, **values):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    write(tmp_path / "mae" / "summary.json", backbone="vit_tiny", wall_time_s=99.6)
    write(tmp_path / "mae" / "eval" / "finetune_10pct.json", top1=17.2, best_top1=19.9)
    write(tmp_path / "mae" / "eval" / "finetune_10pct_scratch.json", top1=19.6, best_top1=21.2)
    write(tmp_path / "mae" / "eval" / "knn.json", top1=28.25)
    # Not pretrained yet: no row.
    (tmp_path / "a2mim_vit").mkdir()
    lines = benchmark.markdown_table([tmp_path / "mae", tmp_path / "a2mim_vit"]).splitlines()
    assert lines[2:] == [
        "| mae | vit_tiny | 17.20 (19.90) | - | 28.25 | 100 s |",
        "| from scratch (floor; mae's finetune recipe) | vit_tiny | 19.60 (21.20) | - | - | - |"]


def test_finetune_diagnosis_scores_both_batchnorm_modes_and_keeps_the_running_statistics():
    from torch import nn

    from mixmask.eval.finetune import Classifier

    diagnosis = load_benchmark("finetune_diagnosis")
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    classifier = Classifier(backbone, 4, 3)
    # Running statistics far from the data's: eval mode and batch statistics then differ.
    backbone[1].running_mean.fill_(5.0)
    saved = backbone[1].running_mean.clone()
    images = torch.randn(10, 3, 8, 8)
    test_set = list(zip(images, torch.arange(10) % 3, strict=True))
    scores, labels = diagnosis.scores_of(classifier, test_set, batch_statistics=False)
    with torch.no_grad():
        torch.testing.assert_close(scores, classifier.eval().scores(images))
        normalised = backbone[0](images)
        mean = normalised.mean(dim=(0, 2, 3), keepdim=True)
        var = normalised.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        by_hand = classifier.head(((normalised - mean) / (var + 1e-5).sqrt()
                                   * backbone[1].weight.view(1, -1, 1, 1)
                                   + backbone[1].bias.view(1, -1, 1, 1)).mean(dim=(2, 3)))
    batch_scores, _ = diagnosis.scores_of(classifier, test_set, batch_statistics=True)
    torch.testing.assert_close(batch_scores, by_hand, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, torch.arange(10) % 3)
    assert torch.equal(backbone[1].running_mean, saved)


@pytest.mark.parametrize("variant", ["mixmask_mocov2_r18", "mocov2_r18", "a2mim_r18", "mae_vit",
                                     "mae_vit_vitdet"])
def test_dense_transfer_gpu_scale_is_a_valid_config_with_the_real_datasets(variant):
    benchmark = load_benchmark("dense_transfer")
    chosen = benchmark.VARIANTS[variant]
    for task in chosen.tasks(list(benchmark.TASKS)):
        command = benchmark.transfer_commands(Path("run"), "gpu", [task], 0, False, [],
                                              chosen)
        gpu_protocol, = (argv[argv.index("--config") + 1] for argv in command.values())
        config = load_config(benchmark.CONFIGS / chosen.recipe,
                             [*benchmark.PRETRAIN["gpu"], "transfer.root=/data/x"],
                             layers=[benchmark.ROOT / "configs" / f"{gpu_protocol}.yaml"])
        expected = ("ade20k" if task != "boxes" else "coco" if chosen.detect_recipe
                    else "voc")
        assert config.transfer.dataset == expected
        assert (config.train.device, config.train.precision) == ("cuda", "bf16")
        command = benchmark.transfer_commands(Path("run"), "cpu", [task], 0, False, [],
                                              chosen)
        cpu_protocol, = (argv[argv.index("--config") + 1] for argv in command.values())
        cpu = load_config(benchmark.CONFIGS / chosen.recipe, benchmark.PRETRAIN["cpu"],
                          layers=[benchmark.ROOT / "configs" / f"{cpu_protocol}.yaml"])
        assert cpu.transfer.dataset == "mosaic" and cpu.data.subset == 2000
        if chosen.detect_recipe:  # ViTDet's optimizer on the proxy too
            assert (cpu.transfer.optimizer, cpu.transfer.layer_decay) == ("adamw", 0.7)


def test_dense_transfer_commands_name_each_seed_and_its_floor():
    benchmark = load_benchmark("dense_transfer")
    commands = benchmark.transfer_commands(Path("run"), "cpu", ["boxes", "uper"], 1, True,
                                           ["x.y=1"])
    assert sorted(commands) == ["detect_boxes_scratch_seed1", "detect_boxes_seed1",
                                "segment_uper_scratch_seed1", "segment_uper_seed1"]
    assert commands["detect_boxes_scratch_seed1"][-1] == "--from-scratch"
    assert commands["segment_uper_seed1"][:6] == ["segment", "run", "--head", "uper",
                                                  "--config", "transfer/mosaic"]
    table = benchmark.markdown_table(
        {"mocov2_r18": {"detect_boxes_seed0": {"box_ap": 10.0, "wall_time_s": 5.0,
                                               "backbone": "resnet18"},
                        "detect_boxes_seed1": {"box_ap": 12.0, "wall_time_s": 7.0,
                                               "backbone": "resnet18"}}}, ["boxes"])
    assert "| mocov2_r18 | resnet18 | 11.00 ± 1.41 | 2 | 5 s |" in table
