"""SiameseIM's claim (arXiv 2206.01204, sec. 5: its gains are "more significant in few-shot,
long-tail and robustness-concerned scenarios") measured on our own runs: ``mixmask
fewshot``, ``mixmask longtail`` and ``mixmask robustness`` on the MIM ablation's variants
(SiameseIM on ViT-Tiny and our ConvNet variant, MAE, PixMIM, A2MIM, MixMask MoCo v2, MoCo
v2) and each backbone family's random init (``--from-scratch``) as the floor.

A variant pretrains exactly as in ``benchmarks/mim_ablation.py`` (its recipes and CPU or GPU
overrides are imported from there, not repeated); a run already pretrained by that
benchmark or by ``benchmarks/dense_transfer.py`` with the same overrides is reused (the
scenario results are written into its ``eval/``), so the table can be built without
pretraining again. Prints one markdown table (few-shot 1/5/10-shot mean +- 95% interval,
the 1% and 10% label fractions, long-tail top-1 with many/medium/few, robustness clean /
corrupted / drop) and writes JSON with the machine and every command::

    python benchmarks/siameseim_claims.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz
    python benchmarks/siameseim_claims.py --variants mae siameseim_vit data.root=...
    python benchmarks/siameseim_claims.py --scale gpu data.root=...

CPU scale (default): the 5,000 / 1,000-image evaluation subsets of the MIM ablation, 10
few-shot episodes, imbalance 100 (at 500 images per class the smallest keeps 5), and the
15 corruptions at 5 severities on 200 test images (76 cells of 200 images each: the
robustness pass dominates the cost on a CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

from mixmask.cli import main as mixmask


def _sibling(name: str):
    """A benchmark beside this one, by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The MIM ablation's recipes, pretraining overrides and config folder: one definition.
_MIM = _sibling("mim_ablation")
CONFIGS, SCALES, VARIANTS = _MIM.CONFIGS, _MIM.SCALES, _MIM.VARIANTS
NAMES = ["mae", "siameseim_vit", "pixmim_faithful", "mocov2_r18", "mixmask_mocov2_r18",
         "a2mim_r18", "siameseim_r18"]
# MoCo v2 is not a MIM variant: the Siamese baseline SiameseIM is compared with.
RECIPES = {**{name: VARIANTS[name] for name in NAMES if name in VARIANTS},
           "mocov2_r18": ("mocov2_r18.yaml", [], "resnet")}
# Where a run of the same name and overrides may already be (benchmarks/dense_transfer.py
# names its MAE run mae_vit).
ELSEWHERE = {"mae": ["mim_ablation/mae", "dense_transfer/mae_vit"]}
EVALUATION = {
    "cpu": ["data.eval_train_subset=5000", "data.eval_test_subset=1000",
            "eval.linear_epochs=30", "scenarios.robustness_test_images=200",
            "data.num_workers=1"],
    "gpu": ["data.eval_train_subset=0", "data.eval_test_subset=0", "eval.linear_epochs=100",
            "scenarios.robustness_test_images=0", "data.num_workers=8"],
}
PROTOCOLS = ("fewshot", "longtail", "robustness")


def find_run(name: str, out: Path) -> Path | None:
    """A pretrained run of ``name`` (summary.json present), here or in the sibling
    benchmarks' folders."""
    candidates = [out / name, *(out.parent / place for place in
                                ELSEWHERE.get(name, [f"mim_ablation/{name}",
                                                     f"dense_transfer/{name}"]))]
    return next((run for run in candidates if (run / "summary.json").is_file()), None)


def cell(result: dict | None, key: str, interval: str | None = None) -> str:
    if result is None or result.get(key) is None:
        return "-"
    if interval is not None:
        return f"{result[key]:.1f} +- {result[interval]:.1f}"
    return f"{result[key]:.1f}"


def markdown_table(rows: list[tuple[str, Path, str]]) -> str:
    """One row per (label, run, suffix): suffix "" for the pretrained weights, "_scratch"
    for the random init."""
    lines = ["| variant | backbone | 1-shot | 5-shot | 10-shot | 1% | 10% | long-tail top-1 "
             "(many / medium / few) | clean | corrupted | drop |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, run, suffix in rows:
        found = {p: _read(run / "eval" / f"{p}{suffix}.json") for p in PROTOCOLS}
        fewshot, longtail, robust = found["fewshot"], found["longtail"], found["robustness"]
        shots = (fewshot or {}).get("shots", {})
        fractions = (fewshot or {}).get("label_fractions", {})
        groups = " / ".join(cell(longtail, key) for key in
                            ("many_top1", "medium_top1", "few_top1"))
        backbone = next((r["backbone"] for r in found.values() if r), "-")
        lines.append(
            f"| {label} | {backbone} | "
            + " | ".join(cell(shots.get(k), "mean_top1", "ci95") for k in ("1", "5", "10"))
            + " | " + " | ".join(cell(fractions.get(k), "mean_top1", "ci95")
                                 for k in ("1%", "10%"))
            + f" | {cell(longtail, 'top1')} ({groups}) | {cell(robust, 'clean_top1')} "
              f"| {cell(robust, 'mean_corrupted_top1')} | {cell(robust, 'drop')} |")
    return "\n".join(lines)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    parser.add_argument("--variants", nargs="+", choices=sorted(RECIPES),
                        default=list(RECIPES))
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", default="runs/benchmarks/siameseim_claims")
    parser.add_argument("--redo", action="store_true",
                        help="evaluate again where a result is already written")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of what is measured; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shell, rows, started = [], [], time.perf_counter()
    floors: set[str] = set()
    for name in args.variants:
        recipe, variant, family = RECIPES[name]
        run = find_run(name, out)
        if run is None:
            run = out / name
            command = ["pretrain", str(CONFIGS / recipe), *SCALES[args.scale], *variant,
                       *args.overrides, f"out_dir={run}"]
            shell.append("mixmask " + " ".join(command))
            if not args.table_only:
                _run(command)
        rows.append((name, run, ""))
        # Each backbone family's random init once (the floor), in its first variant.
        suffixes = [""] if family in floors else ["", "_scratch"]
        if family not in floors:
            floors.add(family)
            rows.append((f"{family} random init", run, "_scratch"))
        for protocol in PROTOCOLS:
            for suffix in suffixes:
                command = [protocol, str(run), *EVALUATION[args.scale], *args.overrides,
                           *(["--from-scratch"] if suffix else []), "--quiet"]
                shell.append("mixmask " + " ".join(command))
                done = (run / "eval" / f"{protocol}{suffix}.json").is_file()
                if not args.table_only and (args.redo or not done):
                    _run(command)
    table = markdown_table(rows)
    print(table)
    result = {"benchmark": "siameseim_claims", "scale": args.scale,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "torch": torch.__version__, "commands": shell, "markdown": table,
              "total_seconds": time.perf_counter() - started,
              "results": {f"{label}": {p: _read(run / "eval" / f"{p}{suffix}.json")
                                       for p in PROTOCOLS} for label, run, suffix in rows}}
    path = out / f"siameseim_claims_{args.scale}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def _run(command: list[str]) -> None:
    print(f"running: mixmask {' '.join(command)}", flush=True)
    if mixmask(command) != 0:
        raise SystemExit(f"failed: mixmask {' '.join(command)}")


if __name__ == "__main__":
    main()
