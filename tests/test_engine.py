"""End-to-end pretraining on real CIFAR-10 images: run folder, resume, bad input."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data import EpochBatchSampler
from mixmask.data.batch import Batch
from mixmask.errors import CheckpointError, ConfigError
from mixmask.methods import build_method
from mixmask.train.loop import TrainingDiverged, pretrain
from mixmask.train.schedule import learning_rate

TINY = ["model.width=0.125", "method.mocov2.proj_hidden_dim=64", "method.mocov2.queue_size=256",
        "train.batch_size=32", "data.num_workers=0", "train.progress_bar=false",
        "method.masking=mixmask", "method.mocov2.symmetric=false", "eval.linear_epochs=2",
        "data.eval_train_subset=200", "data.eval_test_subset=100", "train.log_every=1",
        "train.checkpoint_every=1", "eval.compare_random_init=true", "eval.linear=true"]


def tiny_config(tmp_path, root, *overrides):
    return load_config(None, [*TINY, f"data.root={root}", "data.subset=128",
                              f"out_dir={tmp_path / 'run'}", *overrides])


def read_metrics(run):
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_real_pretrain_writes_a_complete_run_folder_and_resumes(tmp_path, cifar10_tarball):
    config = tiny_config(tmp_path, cifar10_tarball, "train.epochs=2")
    summary = pretrain(config)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt",
                 "checkpoints/epoch=1.ckpt", "checkpoints/epoch=2.ckpt"):
        assert (run / name).is_file(), name
    assert not (run / "profile").exists()  # train.profile_steps=0: no profiler
    assert load_config(run / "config.yaml") == config
    saved = json.loads((run / "summary.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init",
                "wall_time_s", "images_per_s", "versions", "device", "probe_top1"):
        assert key in saved, key
    assert saved["steps"] == summary["steps"] == 8  # 128 images / batch 32 x 2 epochs
    assert 0 <= saved["knn_top1"] <= 100 and saved["versions"]["torch"] == torch.__version__
    rows = read_metrics(run)
    losses = [float(row["loss"]) for row in rows if row.get("loss")]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert any(row.get("knn_top1") for row in rows)
    epoch_walls = [float(row["wall_time_s"]) for row in rows if row.get("wall_time_s")]
    assert len(epoch_walls) == 2 and 0 < epoch_walls[0] < epoch_walls[1]

    # Offline evaluation of the finished run from the command line.
    assert main(["knn", str(run)]) == 0
    offline = json.loads((run / "eval" / "knn.json").read_text())
    assert offline["top1"] == pytest.approx(saved["knn_top1"]) and offline["pretrain_step"] == 8
    assert main(["linear", str(run), "--protocol", "cached", "eval.linear_epochs=1"]) == 0
    assert 0 <= json.loads((run / "eval" / "linear_cached.json").read_text())["top1"] <= 100

    # Extend the finished run to 3 epochs: it continues from step 8, not from 0.
    resumed = pretrain(tiny_config(tmp_path, cifar10_tarball, "train.epochs=3", "resume=auto"))
    assert resumed["steps"] == 12 and resumed["epochs"] == 3
    steps = [int(row["step"]) for row in read_metrics(run) if row.get("loss")]
    assert steps == list(range(1, 13))


def large_image_folder(folder: Path, tarball: Path, count: int = 128) -> Path:
    """The first `count` CIFAR-10 train images upscaled to 100 px PNGs in train/<class>/:
    above load_image_set's in-memory limit (96 px), so they are read as files on disk."""
    from PIL import Image

    from mixmask.data import load_image_set

    image_set = load_image_set("imagefolder", str(tarball), "train", subset=count)
    for index, (image, label) in enumerate(zip(image_set.images, image_set.labels, strict=True)):
        path = folder / "train" / image_set.classes[label] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((100, 100)).save(path)
    assert load_image_set("imagefolder", str(folder), "train").paths is not None
    return folder


@pytest.mark.parametrize("pipeline", ["cpu", "device", "device-files"])
def test_resume_matches_an_uninterrupted_run(tmp_path, cifar10_tarball, pipeline):
    """Stopping at step 3 (mid-epoch) and resuming gives the weights of a straight run,
    with views made by DataLoader workers (cpu), on the device (device), or cropped from
    files by workers and finished on the device (device-files)."""
    root = cifar10_tarball
    if pipeline == "device-files":
        root, pipeline = large_image_folder(tmp_path / "files", cifar10_tarball), "device"
    quiet = ("monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
             "eval.linear=false", f"data.pipeline={pipeline}")
    straight = tiny_config(tmp_path / "a", root, "train.epochs=2", *quiet)
    pretrain(straight)
    first = tiny_config(tmp_path / "b", root, "train.epochs=2", "train.max_steps=3", *quiet)
    pretrain(first)
    second = tiny_config(tmp_path / "b", root, "train.epochs=2", "resume=auto", *quiet)
    assert pretrain(second)["steps"] == 8
    weights_a = torch.load(tmp_path / "a/run/checkpoints/last.ckpt", weights_only=True)["method"]
    weights_b = torch.load(tmp_path / "b/run/checkpoints/last.ckpt", weights_only=True)["method"]
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, msg=name)


def test_loss_decreases_on_a_repeated_real_batch(cifar10_tarball):
    from mixmask.data import load_image_set, preset_views, view_transform

    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=64)
    first, second = (view_transform(view, image_set.mean, image_set.std)
                     for view in preset_views("cifar", 32))
    torch.manual_seed(0)
    items = []
    for index in range(64):  # view 1 then view 2 of each image, from one RNG stream
        image = image_set.load_pil(index)
        items.append((first(image)[0], second(image)[0]))
    view1 = torch.stack([item[0] for item in items])
    view2 = torch.stack([item[1] for item in items])
    config = load_config(None, [*TINY, "method.mocov2.queue_size=64", "train.batch_size=64"])
    method = build_method(config)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        output = method.training_step(Batch.from_views(view1, view2), generator)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        method.after_optimizer_step(output, 0.0)
        losses.append(output.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # Step 1 sees a queue of random unit vectors (an easy task); from step 2 the queue holds
    # real keys, and the loss must fall from there.
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[1:4]) / 3, losses


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, cifar10_tarball):
    config = tiny_config(tmp_path, cifar10_tarball, "train.epochs=2", "monitor.knn=false",
                         "eval.knn=false", "eval.linear=false")
    pretrain(config)
    checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    before = checkpoint.read_bytes()
    exploding = tiny_config(tmp_path, cifar10_tarball, "train.epochs=4", "resume=auto",
                            "train.lr=1e30", "monitor.knn=false")
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        pretrain(exploding)
    assert checkpoint.read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, cifar10_tarball):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        pretrain(tiny_config(tmp_path, cifar10_tarball, f"resume={bad}"))


def test_missing_dataset_exits_2_with_instructions(tmp_path, capsys):
    code = main(["pretrain", "configs/quickstart.yaml", f"data.root={tmp_path / 'nothing'}",
                 "data.download=false", f"out_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "Traceback" not in err


def test_unlabeled_folder_pretrains_and_skips_label_monitors(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(32):
        pixels = torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    config = tiny_config(tmp_path, folder, "data.dataset=imagefolder", "train.epochs=1")
    summary = pretrain(config)
    assert summary["steps"] == 1 and "knn_top1" not in summary
    assert "monitors are skipped" in capsys.readouterr().out


def test_epoch_sampler_is_deterministic_and_resumable():
    sampler = EpochBatchSampler(100, 20, seed=3)
    sampler.set_epoch(2)
    full = [[index for index, epoch in batch] for batch in sampler]
    sampler.set_epoch(2, start_batch=3)
    assert [[index for index, _ in batch] for batch in sampler] == full[3:]
    assert len(sampler) == 2
    assert sorted(i for batch in full for i in batch) == list(range(100))
    shards = [list(EpochBatchSampler(100, 20, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    sampler.set_epoch(0)
    assert [a + b for a, b in zip(*shards, strict=True)] == list(EpochBatchSampler(100, 20, seed=3))


def test_learning_rate_warmup_then_cosine():
    config = load_config(None, ["train.lr=1.0", "train.epochs=10", "train.warmup_epochs=1"])
    assert learning_rate(config, 0, 10) == pytest.approx(0.1)
    assert learning_rate(config, 9, 10) == pytest.approx(1.0)
    assert learning_rate(config, 55, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert learning_rate(config, 100, 10) == pytest.approx(0.0)


def test_learning_rate_step_and_cosine_to_a_floor():
    step = load_config(None, ["train.lr=1.0", "train.epochs=4", "train.schedule=step",
                              "train.lr_milestones=[2, 3]", "train.lr_gamma=0.1"])
    # 10 steps an epoch: x0.1 from epoch 2 (step 20), x0.01 from epoch 3 (step 30).
    assert [learning_rate(step, index, 10) for index in (0, 19, 20, 29, 30, 39)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    floor = load_config(None, ["train.lr=1.0", "train.epochs=1", "train.min_lr=0.1"])
    assert learning_rate(floor, 5, 10) == pytest.approx(0.1 + 0.9 * 0.5)  # cos(pi / 2) = 0
    assert learning_rate(floor, 10, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("override, message", [
    ("train.schedule=step", "needs train.lr_milestones"),
    ("train.lr_milestones=[500]", "lr_milestones"),
    ("train.grad_clip=-1", "grad_clip"),
])
def test_schedule_mistakes_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.epochs=10", override])


class _Linear(torch.nn.Module):
    """A 'method' whose loss 10 * sum(w) has the gradient 10 in each of 3 coordinates."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def forward(self, batch, generator, progress):
        from mixmask.methods.protocol import StepOutput

        loss = 10 * self.weight.sum()
        return StepOutput(loss, {"loss": loss.detach()})


def test_gradient_clipping_bounds_the_update_and_logs_the_norm_before_it():
    from mixmask.data.batch import Batch
    from mixmask.train.step import training_step

    method = _Linear()
    optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
    output = training_step(
        method, optimizer, Batch.from_views(torch.zeros(1, 3, 2, 2)), torch.Generator(), 0.0,
        clip_gradients=lambda: torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0))
    # |g| = 10 sqrt(3) is clipped to 1: each coordinate moves by 1 / sqrt(3).
    assert output.logs["grad_norm"].item() == pytest.approx(10 * 3 ** 0.5)
    assert torch.allclose(method.weight.detach(), torch.full((3,), -1 / 3 ** 0.5))


def test_a_run_with_gradient_clipping_logs_grad_norm(tmp_path):
    config = load_config(None, [*TINY, "data.dataset=synthetic", "data.subset=64",
                                "train.epochs=1", "train.grad_clip=0.5", "eval.linear=false",
                                "eval.compare_random_init=false", "monitor.knn=false",
                                "eval.knn=false", f"out_dir={tmp_path / 'run'}"])
    pretrain(config)
    norms = [float(row["grad_norm"]) for row in read_metrics(tmp_path / "run")
             if row.get("grad_norm")]
    assert len(norms) == 2 and all(norm > 0 and math.isfinite(norm) for norm in norms)


def test_a_new_run_never_overwrites_an_existing_one(tmp_path, cifar10_tarball):
    config = tiny_config(tmp_path, cifar10_tarball, "train.epochs=1", "monitor.knn=false",
                         "eval.knn=false", "eval.linear=false")
    pretrain(config)
    with pytest.raises(ConfigError, match="already holds a run.*resume=auto"):
        pretrain(config)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    config = load_config(None, [*TINY, "data.dataset=synthetic", "data.subset=64",
                                "train.epochs=1", "train.precision=bf16", "eval.linear=false",
                                "eval.compare_random_init=false", f"out_dir={tmp_path / 'run'}"])
    summary = pretrain(config)
    losses = [float(row["loss"]) for row in read_metrics(tmp_path / "run") if row.get("loss")]
    assert summary["steps"] == 2 and len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))


def test_ddp_two_cpu_processes(tmp_path):
    """`train.devices=2` launches two DDP processes (gloo on the CPU): gradients, the key
    queue (gathered from both) and shuffle-BN run across processes."""
    command = [str(Path(sys.executable).with_name("mixmask")), "pretrain",
               "configs/quickstart.yaml", *TINY, "data.dataset=synthetic", "data.subset=128",
               "train.epochs=1", "train.devices=2", "train.device=cpu", "eval.linear=false",
               "method.mocov2.shuffle_bn=true", f"out_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4  # 128 / global batch 32
    assert result.stdout.count("result (top-1 %") == 1  # only rank 0 reports
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    # 4 steps x 16 keys per process x 2 processes: the queue holds keys from both.
    assert int(checkpoint["method"]["queue_pointer"]) == 128
    # Each process's random streams are saved (device generator, BEiT's host generator),
    # so a resume on two processes continues both exactly.
    first, second = checkpoint["rank_states"]
    assert not torch.equal(first["generator"], second["generator"])
    host = "mask_generator"
    assert first["modules"][host]["seeded"] and second["modules"][host]["seeded"]
    assert not torch.equal(first["modules"][host]["state"], second["modules"][host]["state"])


@pytest.mark.parametrize("recipe", ["byol_erase_r18", "barlow_twins_both_r18", "simsiam_unmix_r18",
                                    "vicreg_mixmask_r18"])
def test_matrix_recipes_run_through_the_engine_with_their_optimizer(tmp_path, recipe):
    """The shipped base x masking configs (LARS or SGD, warm-up, each base's heads) train
    end to end, on synthetic images and tiny heads so this takes seconds."""
    base = recipe.rsplit("_", 2)[0]
    small_heads = [f"method.{base}.{key}=32" for key in ("proj_hidden_dim", "proj_output_dim")]
    if base in ("byol", "simsiam"):
        small_heads.append(f"method.{base}.pred_hidden_dim=16")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar100"
                         / f"{recipe}.yaml",
                         ["data.dataset=synthetic", "data.subset=64", "data.num_workers=0",
                          "model.width=0.125", "train.batch_size=16", "train.epochs=2",
                          "train.warmup_epochs=1", "train.progress_bar=false",
                          "monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
                          "eval.linear=false", f"out_dir={tmp_path / 'run'}", *small_heads])
    summary = pretrain(config)
    assert summary["steps"] == 8 and summary["method"] == base
    rows = read_metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(float(row["loss"]))) for row in rows if row.get("loss"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    expected_optimizer = "lars" if base in ("byol", "barlow_twins", "vicreg") else "sgd"
    assert checkpoint["config"]["train"]["optimizer"] == expected_optimizer


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_channels_last_trains_the_same_model(tmp_path, pipeline):
    """train.channels_last changes the memory layout only: after one step every weight,
    buffer and queue entry matches the default layout's to float tolerance (measured: at
    most 1e-5 apart; later steps amplify such rounding differences, as any reordering of
    float sums does), and a channels_last run resumes."""
    common = ["data.dataset=synthetic", "data.subset=64", "data.num_workers=0",
              "model.width=0.125", "method.mocov2.proj_hidden_dim=32",
              "method.mocov2.queue_size=64", "train.batch_size=16", "train.epochs=1",
              "method.masking=mixmask", "train.progress_bar=false", "monitor.knn=false",
              "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
              f"data.pipeline={pipeline}",
              # fp32: bf16 (auto on a CPU with native bf16) rounds each layout's sums
              # differently by more than this float tolerance.
              "train.precision=32"]
    weights = {}
    first_step = ["train.max_steps=1"]
    for layout in ("false", "true"):
        pretrain(load_config(None, [*common, *first_step, f"train.channels_last={layout}",
                                    f"out_dir={tmp_path / layout}"]))
        checkpoint = tmp_path / layout / "checkpoints" / "last.ckpt"
        weights[layout] = torch.load(checkpoint, weights_only=True)["method"]
    for name, value in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], value, atol=1e-4, rtol=1e-4, msg=name)
    resumed = pretrain(load_config(None, [*common, "train.channels_last=true", "train.epochs=2",
                                          "resume=auto", f"out_dir={tmp_path / 'true'}"]))
    assert resumed["steps"] == 8


@pytest.mark.parametrize("setting", [
    ("train.compile=true", "train.compile_backend=aot_eager"),
    ("train.fused_optimizer=false",),
    ("train.optimizer=lars", "train.compile=true", "train.compile_backend=aot_eager"),
])
def test_compiled_networks_and_optimizer_implementations_train_the_same_model(tmp_path,
                                                                              setting):
    """torch.compile (traced through dynamo and AOTAutograd; the aot_eager backend keeps
    this test fast, inductor only changes the kernels) and the foreach vs fused SGD update
    change how a step runs, not what it computes: after two steps every weight, buffer and
    queue entry matches the default run's, and checkpoints keep their keys."""
    common = ["data.dataset=synthetic", "data.subset=32", "data.num_workers=0",
              "model.width=0.125", "method.mocov2.proj_hidden_dim=32",
              "method.mocov2.queue_size=64", "train.batch_size=16", "train.epochs=1",
              "method.masking=mixmask", "train.progress_bar=false", "monitor.knn=false",
              "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
              # fp32: bf16 (auto on a CPU with native bf16) rounds a compiled graph's
              # fused sums differently by more than this float tolerance.
              "train.precision=32"]
    if "train.optimizer=lars" in setting:
        common.append("train.optimizer=lars")
    weights = {}
    for name, extra in (("default", ()), ("setting", setting)):
        pretrain(load_config(None, [*common, *extra, f"out_dir={tmp_path / name}"]))
        checkpoint = tmp_path / name / "checkpoints" / "last.ckpt"
        weights[name] = torch.load(checkpoint, weights_only=True)["method"]
    assert weights["setting"].keys() == weights["default"].keys()
    for name, value in weights["default"].items():
        torch.testing.assert_close(weights["setting"][name], value, atol=1e-4, rtol=1e-4,
                                   msg=name)


def test_an_unknown_compile_backend_is_a_clear_error(tmp_path):
    config = load_config(None, [*TINY, "data.dataset=synthetic", "data.subset=64",
                                "train.compile=true", "train.compile_backend=inductr",
                                f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="compile_backend='inductr'.*inductor"):
        pretrain(config)
