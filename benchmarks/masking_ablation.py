"""Masking ablation: one Siamese base pretrained with each masking strategy, same budget.

The MixMask paper's claim is that filling masked cells from another image (MixMask) beats
erasing them (MSCN) for Siamese ConvNets. This pretrains one base with ``none``, ``erase``
and ``mixmask`` (or the strategies given) on real CIFAR-10 with identical data, schedule
and seed, then reports kNN and linear-probe top-1 on the test set; prints a table and
writes JSON with the machine, versions and every run's summary.

CPU scale (default; the quickstart recipe: quarter-width ResNet-18, 5,000 images,
10 epochs, about 8-10 minutes per run on a 2-core CPU)::

    python benchmarks/masking_ablation.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz

GPU scale (full CIFAR-10, ResNet-18, batch 512, 200 epochs, bf16)::

    python benchmarks/masking_ablation.py --scale gpu --base byol data.root=...

SimCLR and DINO (``--base simclr|dino``) run with their recipes of
``benchmarks/peer_recipes.py`` (views, heads, temperatures, momentum: the ones their
lightly comparison in ``time_to_accuracy.py`` uses) on the quickstart's budget::

    python benchmarks/masking_ablation.py --base dino --strategies none erase mixmask \
        --seeds 0 1 2 data.root=...

Extra ``section.key=value`` overrides apply to every run (e.g. ``train.epochs=4``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from mixmask.config import load_config
from mixmask.train.loop import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_recipes import PEER_RECIPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
SCALES = {
    # The quickstart recipe without its per-epoch monitors (they do not change training).
    "cpu": ["monitor.knn=false", "monitor.online_probe=false"],
    "gpu": ["data.subset=0", "data.eval_train_subset=0", "data.eval_test_subset=0",
            "model.width=1.0", "train.batch_size=512", "train.epochs=200", "train.lr=0.06",
            "train.device=cuda", "train.precision=bf16", "data.num_workers=8",
            "method.mocov2.proj_hidden_dim=2048", "eval.linear_epochs=100",
            "monitor.knn_every=20"],
}


def fragment_overrides(strategy: str) -> list[str]:
    """configs/masking/STRATEGY.yaml as overrides: each strategy runs with the settings of
    the base x masking config matrix (e.g. erase: per-sample discrete masks)."""
    fragment = yaml.safe_load((ROOT / "configs" / "masking" / f"{strategy}.yaml").read_text())

    def flatten(node: dict, prefix: str) -> list[str]:
        items = []
        for key, value in node.items():
            if isinstance(value, dict):
                items += flatten(value, f"{prefix}{key}.")
            else:
                items.append(f"{prefix}{key}={json.dumps(value)}")
        return items

    return flatten(fragment, "")


def base_overrides(base: str, scale: str, overrides: list[str]) -> list[str]:
    """``method.name=BASE``; for SimCLR and DINO also their comparison recipe
    (benchmarks/peer_recipes.py: views, optimizer, method keys), the masking left to the
    strategy's fragment."""
    if base not in PEER_RECIPES:
        return [f"method.name={base}"]
    recipe = PEER_RECIPES[base]
    epochs = load_config(CONFIG, [*SCALES[scale], *overrides]).train.epochs
    return [*recipe.shared_overrides(), *(item for item in recipe.method_overrides(epochs)
                                          if not item.startswith("method.masking="))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    parser.add_argument("--base", default="mocov2",
                        choices=["mocov2", "byol", "simsiam", "barlow_twins", "vicreg",
                                 *PEER_RECIPES])
    parser.add_argument("--strategies", nargs="+", default=["none", "erase", "mixmask"],
                        choices=["none", "erase", "mixmask", "unmix", "both"])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", nargs="+", default=["0"],
                        help="seeds; overrides may follow them")
    parser.add_argument("--out", default="runs/benchmarks/masking_ablation")
    args = parser.parse_args()
    # `--seeds 0 1 data.root=...`: the list takes what follows it; overrides go back.
    args.overrides += [item for item in args.seeds if "=" in item]
    args.seeds = [int(item) for item in args.seeds if "=" not in item]

    out = Path(args.out)
    base = base_overrides(args.base, args.scale, args.overrides)
    runs = []
    for seed in args.seeds:
        for strategy in args.strategies:
            run_dir = out / f"{args.base}_{strategy}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
            overrides = [*SCALES[args.scale], *base,
                         *fragment_overrides(strategy), *args.overrides, f"train.seed={seed}",
                         "eval.knn=true", "eval.linear=true", "eval.compare_random_init=false",
                         "train.progress_bar=false", f"out_dir={run_dir}"]
            started = time.perf_counter()
            summary = pretrain(load_config(CONFIG, overrides))
            summary["command_wall_s"] = time.perf_counter() - started
            summary["strategy"] = strategy
            runs.append(summary)
            print(f"{strategy} seed {seed}: kNN {summary['knn_top1']:.2f}, "
                  f"linear {summary['linear_top1']:.2f}, {summary['wall_time_s']:.0f} s",
                  flush=True)

    print(f"\nbase {args.base}, scale {args.scale}, seeds {args.seeds}, "
          f"device {runs[0]['device']}")
    print(f"{'masking':>8} {'kNN top-1':>10} {'linear top-1':>13} {'img/s':>7} {'wall s':>7}")
    table = {}
    for strategy in args.strategies:
        mine = [run for run in runs if run["strategy"] == strategy]
        row = {key: statistics.mean(run[key] for run in mine)
               for key in ("knn_top1", "linear_top1", "images_per_s", "wall_time_s")}
        row["knn_per_seed"] = [run["knn_top1"] for run in mine]
        row["linear_per_seed"] = [run["linear_top1"] for run in mine]
        table[strategy] = row
        print(f"{strategy:>8} {row['knn_top1']:10.2f} {row['linear_top1']:13.2f} "
              f"{row['images_per_s']:7.0f} {row['wall_time_s']:7.0f}")
    result = {"base": args.base, "scale": args.scale, "strategies": args.strategies,
              "seeds": args.seeds, "overrides": args.overrides, "config": str(CONFIG),
              "device": runs[0]["device"], "versions": runs[0]["versions"],
              "table": table, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.base}_{args.scale}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
