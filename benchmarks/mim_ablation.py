"""Masked image modeling beside MixMask, on one budget: MAE, PixMIM (faithful and clean),
A2MIM (ViT-Tiny; ResNet-18 with and without the frequency loss), MixMask MoCo v2 and
SiameseIM (ViT-Tiny, and our ConvNet variant on a ResNet-18); and the architectures the
papers claim: PixMIM against plain on MAE, ConvMAE and long-sequence MAE, A2MIM on
ConvNeXt, MixMask on ConvNeXt; and the seed papers' MIM baselines, SimMIM (ViT-Tiny,
ResNet-18) and iBOT (ViT-Tiny).

Each variant pretrains from its CIFAR-10 recipe (``configs/cifar10/*.yaml``) with the same
CPU-sized overrides, then is judged as the papers judge MIM: ``mixmask finetune --labels
10%`` (beside ``--from-scratch`` of the same backbone as the floor; ViTs with MAE's
finetuning recipe, ResNets with the Siamese papers' SGD recipe: :data:`FINETUNE`) and the
cached linear probe; kNN is reported too, labelled weak for MIM. Prints the ``mixmask
results`` table and writes JSON with the machine and every command.

CPU scale (default: 2,000 images, 5 epochs of pretraining; finetuning 10 epochs on 500
labels, 10% of a 5,000-image evaluation subset, with 1,000 test images; 5-25 minutes per
variant on a 2-core CPU, MixMask's two-view ResNet the slowest). The from-scratch floor
depends only on the backbone and the finetuning recipe, so it is measured once per
backbone family, in the first variant of that family that runs::

    python benchmarks/mim_ablation.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz
    python benchmarks/mim_ablation.py --variants mae pixmim_faithful data.root=...

GPU scale (full CIFAR-10, each recipe's own epochs and batch, bf16)::

    python benchmarks/mim_ablation.py --scale gpu data.root=...
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from mixmask.cli import main as mixmask
from mixmask.eval.results import format_table, result_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "cifar10"
# name -> (recipe, overrides that make the variant, backbone family). A family shares its
# finetuning recipe (FINETUNE) and its from-scratch floor (one backbone configuration).
VARIANTS = {
    "mae": ("mae_vit_tiny.yaml", [], "vit"),
    "pixmim_faithful": ("pixmim_vit_tiny.yaml", ["method.mae.lowpass_mode=faithful"], "vit"),
    "pixmim_clean": ("pixmim_vit_tiny.yaml", ["method.mae.lowpass_mode=clean"], "vit"),
    "a2mim_vit": ("a2mim_vit_tiny.yaml", [], "vit"),
    "a2mim_r18": ("a2mim_r18.yaml", [], "resnet"),
    "a2mim_r18_no_frequency": ("a2mim_r18.yaml", ["method.a2mim.frequency_weight=0"],
                               "resnet"),
    "mixmask_mocov2_r18": ("mixmask_mocov2_r18.yaml", [], "resnet"),
    "siameseim_vit": ("siameseim_vit_tiny.yaml", [], "vit"),
    "siameseim_r18": ("siameseim_r18.yaml", [], "resnet"),  # our ConvNet variant
    "convmae": ("convmae_tiny.yaml", [], "convmae"),
    "pixmim_convmae": ("pixmim_convmae_tiny.yaml", [], "convmae"),
    "lsmae": ("lsmae_vit_tiny.yaml", [], "vit_patch2"),
    "pixmim_lsmae": ("pixmim_lsmae_vit_tiny.yaml", [], "vit_patch2"),
    "a2mim_convnext": ("a2mim_convnext.yaml", [], "convnext"),
    "mixmask_mocov2_convnext": ("mixmask_mocov2_convnext.yaml", [], "convnext"),
    # The seed papers' MIM baselines (issue 28): SimMIM beside A2MIM, iBOT beside SiameseIM.
    "simmim_vit": ("simmim_vit_tiny.yaml", [], "vit"),
    "simmim_r18": ("simmim_r18.yaml", [], "resnet"),
    "ibot_vit": ("ibot_vit_tiny.yaml", [], "vit"),
}
SCALES = {
    "cpu": ["data.subset=2000", "train.epochs=5", "train.warmup_epochs=1",
            "train.batch_size=64", "data.num_workers=1", "monitor.knn=false",
            "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
            "train.checkpoint_every=0"],
    "gpu": ["train.device=cuda", "train.precision=bf16", "data.num_workers=8",
            "eval.knn=false", "eval.linear=false"],
}
EVALUATION = {
    "cpu": ["data.eval_train_subset=5000", "data.eval_test_subset=1000",
            "eval.finetune_epochs=10", "eval.linear_epochs=30"],
    "gpu": ["data.eval_train_subset=0", "data.eval_test_subset=0", "eval.finetune_epochs=100",
            "eval.linear_epochs=100"],
}


# How each backbone family is finetuned, as its papers do: ViTs with MAE's recipe
# (main_finetune.py: AdamW, layer decay, warm-up, Mixup / CutMix, ...; MAE, PixMIM and A2MIM's
# ViT rows all finetune so), ResNets with the semi-supervised SGD recipe of the Siamese
# papers (Barlow Twins' evaluate.py). SGD at head lr 0.5 suits ResNet features, not a ViT's
# layer-normalised ones: it left MAE's ViT-Tiny at chance (10-12% top-1) in a first run.
# ConvMAE finetunes as MAE does, less what our finetuning holds for ViTs only (layer
# decay, drop path, pooling choice): AdamW, warm-up, Mixup / CutMix, RandAugment. ConvNeXt
# takes the ConvNets' SGD recipe, as the ResNets.
MAE_FINETUNE = str(ROOT / "configs" / "eval" / "cifar_finetune_mae.yaml")
NOT_VIT = ["eval.finetune_layer_decay=1.0", "eval.finetune_drop_path=0",
           "eval.finetune_global_pool=''"]
FINETUNE = {
    "vit": {"cpu": ["--config", MAE_FINETUNE, "eval.finetune_warmup_epochs=1"],
            "gpu": ["--config", MAE_FINETUNE]},
    "resnet": {"cpu": [], "gpu": []},
    "convmae": {"cpu": ["--config", MAE_FINETUNE, "eval.finetune_warmup_epochs=1", *NOT_VIT],
                "gpu": ["--config", MAE_FINETUNE, *NOT_VIT]},
    "convnext": {"cpu": [], "gpu": []},
}
FINETUNE["vit_patch2"] = FINETUNE["vit"]


def commands(run: Path, scale: str, overrides: list[str], family: str,
             floor: bool) -> dict[str, list[str]]:
    """Each evaluation's result stem (``RUN/eval/<stem>.json``) -> its command."""
    extra = [*EVALUATION[scale], *overrides]
    finetune = [*FINETUNE[family][scale], *extra]
    evaluations = {"finetune_10pct": ["finetune", str(run), "--labels", "10%", *finetune],
                   "finetune_10pct_scratch": ["finetune", str(run), "--labels", "10%",
                                              "--from-scratch", *finetune],
                   "linear_cached": ["linear", str(run), "--protocol", "cached", *extra],
                   "knn": ["knn", str(run), *extra]}
    if not floor:
        del evaluations["finetune_10pct_scratch"]
    return evaluations


def floor_measured(out: Path, family_name: str) -> bool:
    """Whether some variant of this backbone family already holds the from-scratch floor."""
    return any((out / name / "eval" / "finetune_10pct_scratch.json").exists()
               for name, (_, _, family) in VARIANTS.items() if family == family_name)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(runs: list[Path]) -> str:
    """docs/results.md's table: one row per variant (finetune 10% last epoch with its best
    epoch in brackets, cached linear, kNN, pretraining wall time), then each backbone's
    from-scratch floor."""
    def cell(result: dict | None, best: bool = False) -> str:
        if result is None:
            return "-"
        return (f"{result['top1']:.2f} ({result['best_top1']:.2f})" if best
                else f"{result['top1']:.2f}")

    rows = ["| variant | backbone | finetune 10% top-1 (best epoch) | linear (cached) top-1 "
            "| kNN top-1 (weak for MIM) | pretraining wall time |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    floors = []
    for run in runs:
        summary = _read_json(run / "summary.json")
        if summary is None:
            continue
        evaluation = {stem: _read_json(run / "eval" / f"{stem}.json")
                      for stem in ("finetune_10pct", "linear_cached", "knn",
                                   "finetune_10pct_scratch")}
        rows.append(f"| {run.name} | {summary['backbone']} "
                    f"| {cell(evaluation['finetune_10pct'], best=True)} "
                    f"| {cell(evaluation['linear_cached'])} | {cell(evaluation['knn'])} "
                    f"| {summary['wall_time_s']:.0f} s |")
        if evaluation["finetune_10pct_scratch"] is not None:
            floors.append(f"| from scratch (floor; {run.name}'s finetune recipe) "
                          f"| {summary['backbone']} "
                          f"| {cell(evaluation['finetune_10pct_scratch'], best=True)} "
                          "| - | - | - |")
    return "\n".join(rows + floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", default="runs/benchmarks/mim_ablation")
    parser.add_argument("--redo", action="store_true",
                        help="rerun variants whose four evaluations are already written")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shell, runs, started = [], [], time.perf_counter()
    floors: set[str] = set()  # families whose from-scratch floor this invocation measures
    for name in args.variants:
        recipe, variant, family = VARIANTS[name]
        run = out / name
        runs.append(run)
        pretrain = ["pretrain", str(CONFIGS / recipe), *SCALES[args.scale], *variant,
                    *args.overrides, f"out_dir={run}"]
        # What is already measured is kept (a pretrained run, each evaluation's JSON), so
        # the variants can be measured in batches (``--variants``) or continued after
        # an interruption, and the table still covers them all; --redo starts afresh.
        pretrained = (run / "summary.json").is_file() and not args.redo
        if not pretrained and run.exists():
            shutil.rmtree(run)
        steps = [] if pretrained else [pretrain]
        # The floor runs in the first variant of its family that has it or measures it.
        floor = family not in floors and (
            args.redo or (run / "eval" / "finetune_10pct_scratch.json").exists()
            or not floor_measured(out, family))
        if floor:
            floors.add(family)
        evaluations = commands(run, args.scale, args.overrides, family, floor)
        for stem, command in evaluations.items():
            if args.redo or not (run / "eval" / f"{stem}.json").exists():
                steps.append(command)
        for command in [pretrain, *evaluations.values()]:
            shell.append("mixmask " + " ".join(command))
        for command in steps:
            print(f"running: mixmask {' '.join(command)}", flush=True)
            if mixmask(command) != 0:
                raise SystemExit(f"failed: mixmask {' '.join(command)}")
    table = format_table(result_rows(runs))
    print(table)
    markdown = markdown_table(runs)
    print(markdown)
    print("kNN is a weak protocol for MIM features; finetune_10pct (beside its from-scratch "
          "floor) is the measure.")
    result = {"benchmark": "mim_ablation", "scale": args.scale,
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "torch": torch.__version__, "commands": shell, "table": table,
              "markdown": markdown,
              "total_seconds": time.perf_counter() - started,
              "results": {str(run): {path.stem: json.loads(path.read_text())
                                     for path in sorted((run / "eval").glob("*.json"))}
                          for run in runs}}
    path = out / f"mim_ablation_{args.scale}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
