"""Dense transfer on one budget: detection (Faster R-CNN, box AP) and semantic
segmentation (linear on the frozen backbone, mIoU; UperNet finetuned, mIoU) from a
MixMask MoCo v2 run, a plain MoCo v2 run, an A2MIM ResNet-18 run and a MAE ViT-Tiny run,
beside each backbone's random init (``--from-scratch``, the floor).

CPU scale (default): each variant pretrains from its CIFAR-10 recipe with the MIM
ablation's CPU overrides (2,000 images, 5 epochs, batch 64), then runs ``mixmask detect``
and ``mixmask segment`` with ``--config transfer/mosaic``: the CIFAR-mosaic localisation
proxy (CIFAR-10 images pasted on 80 px canvases; train canvases from CIFAR's train split,
test canvases from its test split). Its numbers are **not comparable to VOC / COCO /
ADE20k**: one object scale, box-shaped masks, a flat background. Seeds: ``--seeds 0 1 2``
repeats the transfer (not the pretraining) with each seed::

    python benchmarks/dense_transfer.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz
    python benchmarks/dense_transfer.py --variants mocov2_r18 --tasks boxes data.root=...

GPU scale: each recipe's own pretraining (full CIFAR-10, bf16), then the VOC07+12
detection and ADE20k UperNet recipes of ``configs/transfer/`` (the datasets must be on
disk; pass ``voc_root=`` / ``ade20k_root=``)::

    python benchmarks/dense_transfer.py --scale gpu data.root=... --voc-root /data/VOCdevkit \\
        --ade20k-root /data/ADEChallengeData2016

Prints a markdown table and writes JSON (machine, every command, every result).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixmask.cli import main as mixmask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "cifar10"


@dataclass(frozen=True)
class Variant:
    """One row: the pretraining recipe, the backbone family (one random-init floor per
    family and detection recipe), the run folder it pretrains into (a variant that only
    changes the transfer recipe shares its pretraining's folder) and the CPU detection
    recipe (ViTDet's AdamW with layer decay for a ViT, transfer/mosaic's SGD otherwise)."""

    recipe: str
    family: str
    folder: str
    detect_recipe: dict[str, str] | None = None  # scale -> --config; None: TASKS' own

    @property
    def floor(self) -> str:
        suffix = "" if self.detect_recipe is None else ", " + self.detect_recipe["cpu"]
        return f"{self.family} (random init{suffix})"

    def kept(self, out: Path, name: str) -> Path:
        """Where this variant keeps its seed-suffixed results (its own subfolder when it
        shares another variant's run folder)."""
        run = out / self.folder
        return run / "eval" / ("seeds" if self.folder == name else f"seeds_{name}")

    def tasks(self, tasks: list[str]) -> list[str]:
        """A variant that only changes the detection recipe runs only detection."""
        return tasks if self.detect_recipe is None else [t for t in tasks if t == "boxes"]


VARIANTS = {
    "mixmask_mocov2_r18": Variant("mixmask_mocov2_r18.yaml", "resnet", "mixmask_mocov2_r18"),
    "mocov2_r18": Variant("mocov2_r18.yaml", "resnet", "mocov2_r18"),
    "a2mim_r18": Variant("a2mim_r18.yaml", "resnet", "a2mim_r18"),
    "mae_vit": Variant("mae_vit_tiny.yaml", "vit", "mae_vit"),
    "mae_vit_vitdet": Variant("mae_vit_tiny.yaml", "vit", "mae_vit", detect_recipe={
        "cpu": "transfer/mosaic_vitdet", "gpu": "transfer/coco_vitdet"}),
}
PRETRAIN = {
    "cpu": ["data.subset=2000", "train.epochs=5", "train.warmup_epochs=1",
            "train.batch_size=64", "data.num_workers=1", "monitor.knn=false",
            "monitor.online_probe=false", "eval.knn=false", "eval.linear=false",
            "train.checkpoint_every=0"],
    "gpu": ["train.device=cuda", "train.precision=bf16", "data.num_workers=8",
            "eval.knn=false", "eval.linear=false"],
}
# Each task: (command, flag, value, result stem, the protocol file at each scale).
TASKS = {
    "boxes": ("detect", "--task", "boxes", "detect_boxes",
              {"cpu": "transfer/mosaic", "gpu": "transfer/voc07_12"}),
    "linear": ("segment", "--head", "linear", "segment_linear",
               {"cpu": "transfer/mosaic", "gpu": "transfer/ade20k"}),
    "uper": ("segment", "--head", "uper", "segment_uper",
             {"cpu": "transfer/mosaic", "gpu": "transfer/ade20k"}),
}
METRIC = {"boxes": "box_ap", "linear": "miou", "uper": "miou"}


def transfer_commands(run: Path, scale: str, tasks: list[str], seed: int, floor: bool,
                      extra: list[str], variant: Variant | None = None
                      ) -> dict[str, list[str]]:
    """The evaluation stem (``RUN/eval/<stem>.json``, seed-suffixed) -> its command (the
    variant's detection recipe, if it has its own)."""
    out = {}
    for task in tasks:
        command, flag, value, stem, protocol = TASKS[task]
        own = variant.detect_recipe if variant is not None and task == "boxes" else None
        recipe = (own or protocol)[scale]
        base = [command, str(run), flag, value, "--config", recipe,
                f"train.seed={seed}", *extra]
        out[f"{stem}_seed{seed}"] = base
        if floor:
            out[f"{stem}_scratch_seed{seed}"] = [*base, "--from-scratch"]
    return out


def run_command(command: list[str], run: Path, kept: Path) -> dict:
    """Run one evaluation, keep its JSON under a seed-suffixed name (each seed its own)."""
    name = command[0] + "_" + command[3] + ("_scratch" if "--from-scratch" in command else "")
    print(f"running: mixmask {' '.join(command)}", flush=True)
    if mixmask(command) != 0:
        raise SystemExit(f"failed: mixmask {' '.join(command)}")
    written = run / "eval" / f"{name}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(written, kept)
    # The next seed trains afresh (the checkpoint folder holds this seed's settings).
    shutil.rmtree(run / "eval" / name, ignore_errors=True)
    return json.loads(kept.read_text())


def _mean_and_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    tensor = torch.tensor(values, dtype=torch.float64)
    return f"{tensor.mean():.2f} ± {tensor.std():.2f}"


def markdown_table(results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
    """One row per variant (and per family's random init): each task's metric, mean ±
    standard deviation over seeds, the seeds, and the transfer wall time of the fastest
    seed (the least disturbed by whatever else the machine ran)."""
    heads = [f"{TASKS[task][3]} {METRIC[task]}" for task in tasks]
    rows = ["| init | backbone | " + " | ".join(heads) + " | seeds | wall time (fastest seed) |",
            "| --- | --- |" + " ---: |" * (len(tasks) + 2)]
    for label, evaluations in results.items():
        cells, wall, backbone, seeds = [], 0.0, "-", 0
        for task in tasks:
            found = [result for stem, result in evaluations.items()
                     if stem.startswith(TASKS[task][3] + "_seed")
                     or ("(random init" in label
                         and stem.startswith(TASKS[task][3] + "_scratch_seed"))]
            cells.append(_mean_and_spread([result[METRIC[task]] for result in found]))
            wall += min((result["wall_time_s"] for result in found), default=0.0)
            backbone = found[0]["backbone"] if found else backbone
            seeds = max(seeds, len(found))
        if seeds:
            rows.append(f"| {label} | {backbone} | " + " | ".join(cells)
                        + f" | {seeds} | {wall:.0f} s |")
    return "\n".join(rows)


def floor_measured(out: Path, floor: str, seed: int) -> bool:
    """Whether a variant with this floor (family and detection recipe) already holds
    random-init results of this seed."""
    return any(any(variant.kept(out, name).glob(f"*_scratch_seed{seed}.json"))
               for name, variant in VARIANTS.items() if variant.floor == floor)


def measured(out: Path, variants: list[str]) -> dict[str, dict[str, dict]]:
    """The results already kept under ``OUT`` for these variants, labelled as ``main``
    labels them."""
    results: dict[str, dict[str, dict]] = {}
    for name in variants:
        for path in sorted(VARIANTS[name].kept(out, name).glob("*.json")):
            label = VARIANTS[name].floor if "_scratch_" in path.stem else name
            results.setdefault(label, {})[path.stem] = json.loads(path.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the random-init floors (the table then shows the floors "
                             "an earlier invocation measured)")
    parser.add_argument("--scale", choices=sorted(PRETRAIN), default="cpu")
    parser.add_argument("--voc-root", default="", help="VOCdevkit (--scale gpu)")
    parser.add_argument("--ade20k-root", default="", help="ADEChallengeData2016 (--scale gpu)")
    parser.add_argument("--coco-root", default="",
                        help="COCO 2017 for the ViTDet variant (--scale gpu)")
    parser.add_argument("--out", default="runs/benchmarks/dense_transfer")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of what OUT already holds; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table_only:
        print(markdown_table(measured(out, args.variants), args.tasks))
        return
    out.mkdir(parents=True, exist_ok=True)
    started, shell = time.perf_counter(), []
    floors: set[tuple[str, int]] = set()
    for name in args.variants:
        variant = VARIANTS[name]
        run = out / variant.folder
        pretrain = ["pretrain", str(CONFIGS / variant.recipe), *PRETRAIN[args.scale],
                    *args.overrides, f"out_dir={run}"]
        shell.append("mixmask " + " ".join(pretrain))
        if not (run / "summary.json").is_file():  # a finished pretraining is kept
            shutil.rmtree(run, ignore_errors=True)
            print(f"running: mixmask {' '.join(pretrain)}", flush=True)
            if mixmask(pretrain) != 0:
                raise SystemExit(f"failed: mixmask {' '.join(pretrain)}")
        for seed in args.seeds:
            # One floor per family, detection recipe and seed: measured by the first such
            # variant that runs, unless a folder already holds it (an earlier invocation).
            floor = (not args.no_floor and (variant.floor, seed) not in floors
                     and not floor_measured(out, variant.floor, seed))
            floors.add((variant.floor, seed))
            for task in variant.tasks(args.tasks):
                extra = list(args.overrides)
                if args.scale == "gpu":
                    root = (args.ade20k_root if task != "boxes" else args.coco_root
                            if variant.detect_recipe else args.voc_root)
                    extra += [f"transfer.root={root}", "train.device=cuda",
                              "train.precision=bf16"]
                for stem, command in transfer_commands(run, args.scale, [task], seed, floor,
                                                       extra, variant).items():
                    shell.append("mixmask " + " ".join(command))
                    kept = variant.kept(out, name) / f"{stem}.json"
                    if not kept.is_file():
                        run_command(command, run, kept)
    # The table holds every variant's kept results, of this invocation and earlier ones.
    results = measured(out, list(VARIANTS))
    markdown = markdown_table(results, args.tasks)
    print(markdown)
    print("The CIFAR mosaic is a localisation proxy: its AP and mIoU are not comparable to "
          "VOC / COCO / ADE20k.")
    record = {"benchmark": "dense_transfer", "scale": args.scale,
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "torch": torch.__version__, "seeds": args.seeds, "commands": shell,
              "markdown": markdown, "total_seconds": time.perf_counter() - started,
              "results": results}
    path = out / f"dense_transfer_{args.scale}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
