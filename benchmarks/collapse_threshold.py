"""Where the collapse threshold comes from: the logged spread of healthy and collapsed runs.

Trains short runs on real CIFAR-10 (the quickstart recipe, quarter-width ResNet-18 or
ViT-Tiny/4) with every step logged, and prints, for each, the logged ``feature_std``
(backbone features) and ``embedding_std`` (projector output) as ratios to 1/sqrt(d),
the spread of uniformly spread embeddings (:mod:`mixmask.eval.collapse`). The collapsed case
is issue 22's: two steps of Barlow Twins with MixMask at batch 32. Writes
runs/benchmarks/collapse_threshold/collapse_threshold.json.

    python benchmarks/collapse_threshold.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path

from mixmask.config import load_config
from mixmask.eval.collapse import COLLAPSE_RATIO, healthy_std
from mixmask.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.log_every=1", "train.plots=none", "eval.knn=true", "eval.linear=false",
          "eval.compare_random_init=true", "monitor.knn=false", "monitor.online_probe=false",
          "train.progress_bar=false", "data.num_workers=0"]
# name -> (overrides, what it stands for)
CASES = {
    "barlow_twins_mixmask_2_steps": (
        ["method.name=barlow_twins", "method.masking=mixmask", "data.subset=256",
         "train.batch_size=32", "train.max_steps=2", "model.width=0.125"],
        "issue 22's collapse: two steps, batch 32"),
    "random_init_r18_quarter": (
        ["data.subset=512", "train.batch_size=64", "train.max_steps=1", "train.lr=1e-30",
         "method.masking=none"],
        "the random init (lr 1e-30: one step that changes nothing)"),
    "mocov2_mixmask_2_epochs": (
        ["data.subset=1024", "train.batch_size=64", "train.epochs=2",
         "method.mocov2.queue_size=512"],
        "quickstart MixMask + MoCo v2, 32 steps"),
    "byol_2_epochs": (
        ["method.name=byol", "method.masking=none", "data.subset=1024", "train.batch_size=64",
         "train.epochs=2"], "BYOL, 32 steps"),
    "simsiam_2_epochs": (
        ["method.name=simsiam", "method.masking=none", "data.subset=1024",
         "train.batch_size=64", "train.epochs=2"], "SimSiam, 32 steps"),
    # VICReg diverges at the quickstart's lr 0.06 (its recipe is LARS at 0.3 x batch / 256).
    "vicreg_2_epochs": (
        ["method.name=vicreg", "method.masking=none", "data.subset=1024",
         "train.batch_size=64", "train.epochs=2", "train.lr=0.01"], "VICReg, 32 steps, lr 0.01"),
}


def ratios(run: Path, name: str, dim: int) -> list[float]:
    with (run / "metrics.csv").open(newline="") as handle:
        values = [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]
    return [value / healthy_std(dim) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="e.g. data.root=... (applied to every run)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "collapse_threshold"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for name, (overrides, about) in CASES.items():
        started = time.perf_counter()
        run = out / name
        config = load_config(ROOT / "configs" / "quickstart.yaml",
                             [*COMMON, *args.overrides, *overrides, f"out_dir={run}",
                              "resume=none"])
        reused = (run / "summary.json").is_file()  # measured by an earlier call: kept
        summary = (json.loads((run / "summary.json").read_text()) if reused
                   else pretrain(config))
        dims = summary.get("collapse_dims", {})
        row = {"about": about,
               "wall_s": None if reused else round(time.perf_counter() - started, 1),
               "collapsed": summary.get("collapsed")}
        for metric, dim in dims.items():
            if metric == "test_feature_std":  # one value, at the end (and the random init's)
                row[metric] = {"dim": dim, "ratio": summary[metric] / healthy_std(dim),
                               "random_init_ratio": summary[f"{metric}_random_init"]
                               / healthy_std(dim)}
                continue
            values = ratios(run, metric, dim)
            row[metric] = {"dim": dim, "min_ratio": min(values), "last_ratio": values[-1],
                           "median_ratio": statistics.median(values)}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    print(f"\nratios to 1/sqrt(d); collapsed below {COLLAPSE_RATIO}")
    print("| run | feature_std: min, last | embedding_std: min, last | test_feature_std "
          "(random init) | collapsed |\n| --- | ---: | ---: | ---: | --- |")
    for name, row in rows.items():
        cells = []
        for metric in ("feature_std", "embedding_std"):
            part = row.get(metric)
            cells.append(f"{part['min_ratio']:.3g}, {part['last_ratio']:.3g}" if part else "-")
        test = row.get("test_feature_std")
        cells.append(f"{test['ratio']:.3g} ({test['random_init_ratio']:.3g})" if test else "-")
        print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {row['collapsed']} |")
    result = {"threshold_ratio": COLLAPSE_RATIO, "machine": platform.processor()
              or platform.machine(), "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse_threshold.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'collapse_threshold.json'}")


if __name__ == "__main__":
    main()
