"""Pretrained vs randomly initialised backbone: kNN / linear top-1 over seeds.

Runs `mixmask pretrain CONFIG` (with eval.compare_random_init=true) once per seed, then
prints a table and writes JSON with the machine, versions and every run's summary. Used
for the quickstart numbers in docs/results.md and to calibrate the CI accuracy test:

    python benchmarks/pretrain_vs_random.py configs/quickstart.yaml --seeds 0 \\
        data.root=../shared/data/cifar10_jpeg_q75.tar.gz
    python benchmarks/pretrain_vs_random.py --regression-test --seeds 0 1 2 \\
        data.root=../shared/data/cifar10_jpeg_q75.tar.gz
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from mixmask.config import load_config
from mixmask.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="pretrain config (YAML)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--regression-test", action="store_true",
                        help="use the settings of tests/test_accuracy_regression.py")
    parser.add_argument("--seeds", nargs="+", default=["0"],
                        help="seeds; overrides may follow them")
    parser.add_argument("--out", default="runs/benchmarks/pretrain_vs_random")
    args = parser.parse_intermixed_args()
    # `--seeds 0 1 data.root=...`: the list takes what follows it; overrides go back.
    args.overrides += [item for item in args.seeds if "=" in item]
    args.seeds = [int(item) for item in args.seeds if "=" not in item]
    if args.regression_test:
        from test_accuracy_regression import REGRESSION_CONFIG, REGRESSION_OVERRIDES

        config_path, base_overrides = REGRESSION_CONFIG, list(REGRESSION_OVERRIDES)
        if args.config:  # with no config to name, the first override lands in `config`
            args.overrides.insert(0, args.config)
    elif args.config:
        config_path, base_overrides = args.config, []
    else:
        parser.error("give a config or --regression-test")
    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        shutil.rmtree(out / f"seed{seed}", ignore_errors=True)  # a benchmark starts afresh
        overrides = [*base_overrides, *args.overrides, f"train.seed={seed}",
                     "eval.compare_random_init=true", f"out_dir={out / f'seed{seed}'}",
                     "train.progress_bar=false"]
        started = time.perf_counter()
        summary = pretrain(load_config(config_path, overrides))
        summary["command_wall_s"] = time.perf_counter() - started
        runs.append(summary)
    keys = [k for k in ("knn_top1", "linear_top1") if k in runs[0]]
    print(f"\n{'seed':>5} " + " ".join(f"{k:>14} {k + '_rand':>14}" for k in keys)
          + f" {'wall s':>8}")
    for seed, summary in zip(args.seeds, runs, strict=True):
        cells = " ".join(f"{summary[k]:14.2f} {summary[k + '_random_init']:14.2f}" for k in keys)
        print(f"{seed:>5} {cells} {summary['wall_time_s']:8.0f}")
    for key in keys:
        gaps = [s[key] - s[key + "_random_init"] for s in runs]
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        print(f"{key}: pretrained - random = {statistics.mean(gaps):.2f} "
              f"(min {min(gaps):.2f}, std {spread:.2f}) over {len(gaps)} seed(s)")
    result = {"config": str(config_path), "regression_test": args.regression_test,
              "overrides": args.overrides, "seeds": args.seeds, "device": runs[0]["device"],
              "versions": runs[0]["versions"], "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
