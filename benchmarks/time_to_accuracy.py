"""Time to accuracy: MixMask (MoCo v2 base), ResNet-18, real CIFAR; wall time per epoch
and the kNN / online-probe top-1 reached within a time budget.

Runs `mixmask pretrain` with a kNN and online-probe monitor every epoch (or every
``--every`` epochs), then reads the run's metrics.csv: each epoch row holds the wall time
since the run started (training, monitors and checkpoints included; the data loading
before the first step is reported separately). Prints a table and writes JSON with the
machine, versions, settings and the per-epoch curve.

CPU scale (default; about 10 minutes on a 2-core CPU: the quickstart recipe)::

    python benchmarks/time_to_accuracy.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz

GPU scale (full CIFAR-10, ResNet-18 width 1, batch 512, bf16, data on the GPU)::

    python benchmarks/time_to_accuracy.py --scale gpu --budget-s 600 data.root=...

The GPU scale keeps the 200-epoch cosine schedule, so a 600 s budget may cut it before the
learning rate has decayed. For the best accuracy within a budget, shorten the schedule to
fit it: ``train.epochs=N`` with N about (budget - setup) / (seconds per epoch, monitors
included), the epoch time taken from benchmarks/epoch_time.py --scale gpu (``--every``
thins the monitors).

``data.dataset=cifar100 data.root=...`` measures CIFAR-100 where a copy is present.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from mixmask.config import load_config
from mixmask.engine import pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
SCALES = {
    "cpu": ["eval.linear=false", "eval.compare_random_init=false"],
    "gpu": ["data.subset=0", "data.eval_train_subset=0", "data.eval_test_subset=0",
            "model.width=1.0", "train.batch_size=512", "train.epochs=200",
            "train.device=cuda", "train.precision=bf16", "data.pipeline=device",
            "method.mocov2.proj_hidden_dim=2048", "eval.linear=false",
            "eval.compare_random_init=false", "train.checkpoint_every=50"],
}


def read_epochs(run_dir: Path) -> list[dict[str, float]]:
    """The epoch rows of metrics.csv (those with a wall time), as floats."""
    with (run_dir / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("wall_time_s")]
    return [{key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for the run")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--every", type=int, default=1, help="monitor every N epochs")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="report the accuracy reached within this wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/benchmarks/time_to_accuracy")
    args = parser.parse_args()

    out = Path(args.out)
    run_dir = out / f"{args.scale}_seed{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
    overrides = [*SCALES[args.scale], "monitor.knn=true", "monitor.online_probe=true",
                 f"monitor.knn_every={args.every}", *args.overrides, f"train.seed={args.seed}",
                 "train.progress_bar=false", f"out_dir={run_dir}"]
    config = load_config(CONFIG, overrides)
    started = time.perf_counter()
    summary = pretrain(config)
    command_wall = time.perf_counter() - started

    epochs = read_epochs(run_dir)
    setup_s = command_wall - summary["wall_time_s"]  # data loading and model building
    print(f"\n{config.data.dataset}, {config.model.backbone} width {config.model.width}, "
          f"batch {config.train.batch_size}, {summary['device']}")
    print(f"{'epoch':>5} {'wall s':>8} {'s/epoch':>8} {'img/s':>7} {'kNN':>6} {'probe':>6}")
    previous = 0.0
    for row in epochs:
        knn, probe = row.get("knn_top1"), row.get("probe_top1")
        print(f"{row['epoch']:5.0f} {row['wall_time_s']:8.1f} "
              f"{row['wall_time_s'] - previous:8.1f} {row.get('images_per_s', 0):7.0f} "
              f"{'-' if knn is None else f'{knn:6.2f}':>6} "
              f"{'-' if probe is None else f'{probe:6.2f}':>6}")
        previous = row["wall_time_s"]
    budget = args.budget_s
    within = [row for row in epochs if budget is None or row["wall_time_s"] + setup_s <= budget]
    measured = [row for row in within if "knn_top1" in row]
    reached = measured[-1] if measured else None
    if reached is not None:
        print(f"within {'the whole run' if budget is None else f'{budget:.0f} s'} (setup "
              f"{setup_s:.0f} s included): kNN {reached['knn_top1']:.2f}, online probe "
              f"{reached.get('probe_top1', float('nan')):.2f} at epoch {reached['epoch']:.0f}")
    result = {"scale": args.scale, "overrides": args.overrides, "config": str(CONFIG),
              "budget_s": budget, "setup_s": setup_s, "command_wall_s": command_wall,
              "device": summary["device"], "versions": summary["versions"],
              "seconds_per_epoch": (summary["wall_time_s"] / len(epochs)) if epochs else None,
              "reached": reached, "epochs": epochs, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.scale}_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
