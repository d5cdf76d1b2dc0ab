"""Epoch time and device-busy share of MixMask training, data pipeline included.

The speed issue's target: on one H100, a CIFAR-size ResNet-18 MixMask epoch (50,000
images at 32 px, all three passes) in under 5 s, with the GPU busy > 90% of the step.

Runs ``pretrain`` (the CIFAR-10 MixMask + MoCo v2 recipe, configs/cifar10/
mixmask_mocov2_r18.yaml: ResNet-18 CIFAR stem, queue 4096, one mask per batch) with
``data.pipeline=device``, the asymmetric loss, and every monitor, evaluation and mid-run
checkpoint off, so an epoch is the training loop alone: making both views, the three
passes, the optimizer, the EMA and queue update, logging. Per-epoch wall times come from
the run's metrics.csv.
The first epoch carries cuDNN autotuning (and compilation with ``train.compile=true``),
so the table's "steady" figure is the mean of the later epochs.

Busy share: ``train.profile_steps`` profiles ``--profile-steps`` steps of the first epoch
(from step ``--profile-start``), out of the timed epochs, and reports the share of that
window during which the device ran work (mixmask.train.profiling; on the CPU: the share spent
inside torch operators, the rest being Python overhead).

CPU scale (default; a 2,048-image subset, batch 64, 2 epochs: a few minutes on 2 cores)::

    python benchmarks/epoch_time.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz

GPU scale (all 50,000 training images, batch 512, bf16, channels_last, 3 epochs)::

    python benchmarks/epoch_time.py --scale gpu data.root=... [train.compile=true]

Extra ``section.key=value`` overrides apply to the run (e.g. method.online_forward=joint).
Prints a table and writes OUT/results.json with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time
from pathlib import Path

from mixmask.config import load_config
from mixmask.train.loop import RunStopped, pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment import machine_info, resolve_device, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10" / "mixmask_mocov2_r18.yaml"
# Asymmetric MoCo loss: each image takes the three passes the target counts (online clean,
# online mixed, target), as in benchmarks/train_step.py.
COMMON = ["method.mocov2.symmetric=false", "data.pipeline=device", "monitor.knn=false",
          "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
          "eval.compare_random_init=false", "train.checkpoint_every=0",
          "train.progress_bar=false", "train.plots=none"]
SCALES = {
    # scale: (overrides, epochs, profile start step, profiled steps)
    "cpu": (["data.subset=2048", "train.batch_size=64", "train.device=cpu",
             "train.channels_last=true"], 2, 5, 10),
    "gpu": (["data.subset=0", "train.batch_size=512", "train.device=cuda",
             "train.precision=bf16", "train.channels_last=true"], 3, 10, 30),
}


def epoch_walls(run_dir: Path) -> list[float]:
    """Wall seconds of each epoch: differences of metrics.csv's cumulative wall_time_s."""
    with (run_dir / "metrics.csv").open() as handle:
        cumulative = [float(row["wall_time_s"]) for row in csv.DictReader(handle)
                      if row.get("wall_time_s")]
    return [later - earlier
            for earlier, later in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for the run")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs to run (default: cpu 2, gpu 3; the first is warm-up)")
    parser.add_argument("--profile-start", type=int, default=None,
                        help="first profiled step (default: cpu 5, gpu 10)")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="profiled steps, 0 for none (default: cpu 10, gpu 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/benchmarks/epoch_time")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the flags
    scale_overrides, epochs, profile_start, profile_steps = SCALES[args.scale]
    epochs = args.epochs or epochs
    profile_start = profile_start if args.profile_start is None else args.profile_start
    profile_steps = profile_steps if args.profile_steps is None else args.profile_steps
    if epochs < 2:
        parser.error("--epochs must be 2 or more: the first epoch is warm-up")

    out = Path(args.out)
    run_dir = out / f"{args.scale}_seed{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
    overrides = [*COMMON, *scale_overrides, f"train.epochs={epochs}",
                 f"train.profile_start_step={profile_start}",
                 f"train.profile_steps={profile_steps}", *args.overrides,
                 f"train.seed={args.seed}", f"out_dir={run_dir}"]
    config = load_config(CONFIG, overrides)
    started = time.perf_counter()
    machine = machine_info(resolve_device(config.train.device))
    try:
        summary, stopped = pretrain(config), None
    except RunStopped as stop:  # a time limit: the epochs done so far are kept
        summary, stopped = None, str(stop)
        print(f"note: {stopped}", flush=True)
    command_wall = time.perf_counter() - started

    walls = epoch_walls(run_dir) if (run_dir / "metrics.csv").is_file() else []
    steps_per_epoch = (summary["steps"] // len(walls) if summary and walls
                       else config.data.subset // config.train.batch_size
                       if config.data.subset else None)
    images_per_epoch = steps_per_epoch * config.train.batch_size if steps_per_epoch else None
    steady = statistics.mean(walls[1:]) if len(walls) > 1 else None
    profile = summary.get("profile") if summary else None
    busy = profile["busy_fraction"] if profile else None
    device = summary["device"] if summary else machine["gpu"] or machine["device"]
    print(f"\n{config.data.dataset} {images_per_epoch or '?'} images per epoch at "
          f"{config.data.image_size} px, {config.model.backbone} width {config.model.width}, "
          f"batch {config.train.batch_size}, precision {config.train.precision}, {device}")
    print(f"{'epoch':>5} {'seconds':>8} {'images/s':>9}")
    for epoch, seconds in enumerate(walls, start=1):
        rate = f"{images_per_epoch / seconds:9,.0f}" if images_per_epoch else f"{'?':>9}"
        print(f"{epoch:5d} {seconds:8.2f} {rate}" + ("  (warm-up)" if epoch == 1 else ""))
    if steady is not None:
        print(f"steady epoch (mean of epochs 2-{len(walls)}): {steady:.2f} s"
              + (f", {images_per_epoch / steady:,.0f} images/s" if images_per_epoch else ""))
    if profile:
        print(f"busy: {'n/a' if busy is None else f'{100 * busy:.1f}%'} of "
              f"{profile['steps']} profiled steps from step {profile['first_step']} "
              f"({profile['busy_of']}; trace: {run_dir / 'profile' / profile['trace']})")
    result = {
        "benchmark": "epoch_time", "scale": args.scale, "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides, "machine": machine,
        "versions": summary["versions"] if summary else None, "device": device,
        "stopped": stopped, "images_per_epoch": images_per_epoch, "epoch_seconds": walls,
        "steady_epoch_seconds": steady,
        "steady_images_per_s": images_per_epoch / steady if steady and images_per_epoch
        else None,
        "setup_seconds": command_wall - summary["wall_time_s"] if summary else None,
        "profile": profile,
    }
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
