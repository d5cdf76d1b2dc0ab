"""Every evaluation protocol on one pretrained run, on real CIFAR-10.

Pretrains the quickstart recipe (MixMask + MoCo v2, quarter-width ResNet-18, 5,000
images, 10 epochs) unless ``--run`` names an existing run folder, then runs, as a user
would, each command on it: ``mixmask knn``, ``mixmask linear --protocol cached``,
``mixmask linear --protocol moco`` (a CPU-sized epoch count), and ``mixmask finetune
--labels 1% | 10% | 100%``, each beside ``--from-scratch``. Prints the table of
``mixmask results`` and writes JSON with the machine, the commands and every result.

CPU scale (default; 19 minutes on a 2-core CPU, pretraining included: docs/results.md)::

    python benchmarks/eval_protocols.py data.root=../shared/data/cifar10_jpeg_q75.tar.gz

The labelled split is ``data.eval_train_subset`` images of the CIFAR-10 train split (10,000
here: 1% = 100 images, 10 per class); the test split ``data.eval_test_subset`` (2,000).
Overrides after the flags apply to pretraining and to every evaluation.
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
CONFIG = ROOT / "configs" / "quickstart.yaml"
PRETRAIN = ["eval.linear=false", "eval.compare_random_init=false"]
EVALUATION = ["data.eval_train_subset=10000", "data.eval_test_subset=2000",
              "data.num_workers=2"]


def protocol_commands(run: Path, args) -> list[list[str]]:
    """The evaluation commands, as typed at a shell (without the leading `mixmask`)."""
    commands = [["knn", str(run)],
                ["linear", str(run), "--protocol", "cached",
                 f"eval.linear_epochs={args.linear_epochs}"],
                ["linear", str(run), "--protocol", "moco",
                 f"eval.linear_epochs={args.moco_epochs}"]]
    for labels, epochs in (("1%", args.finetune_epochs), ("10%", args.finetune_epochs),
                           ("100%", args.finetune_epochs_full)):
        for scratch in ([], ["--from-scratch"]):
            commands.append(["finetune", str(run), "--labels", labels, *scratch,
                             f"eval.finetune_epochs={epochs}"])
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every command")
    parser.add_argument("--run", help="evaluate this run folder instead of pretraining one")
    parser.add_argument("--out", default="runs/benchmarks/eval_protocols")
    parser.add_argument("--linear-epochs", type=int, default=30, help="cached probe")
    parser.add_argument("--moco-epochs", type=int, default=10,
                        help="MoCo protocol (the paper's 100 is hours on a CPU)")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="1%% and 10%%")
    parser.add_argument("--finetune-epochs-full", type=int, default=5, help="100%%")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shell = []
    started = time.perf_counter()
    if args.run:
        run = Path(args.run)
    else:
        run = out / "run"
        if run.exists():
            shutil.rmtree(run)
        command = ["pretrain", str(CONFIG), *PRETRAIN, *args.overrides, f"out_dir={run}"]
        shell.append(command)
        if mixmask(command) != 0:
            raise SystemExit("pretraining failed")
        shutil.rmtree(run / "eval", ignore_errors=True)
    timings = []
    for command in protocol_commands(run, args):
        command = [*command, *EVALUATION, *args.overrides]
        shell.append(command)
        begun = time.perf_counter()
        if mixmask(command) != 0:
            raise SystemExit(f"failed: mixmask {' '.join(command)}")
        timings.append({"command": "mixmask " + " ".join(command),
                        "seconds": time.perf_counter() - begun})
    rows = result_rows([run])
    table = format_table(rows)
    print(table)
    result = {
        "benchmark": "eval_protocols", "run": str(run),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else None},
        "versions": {"torch": torch.__version__},
        "commands": ["mixmask " + " ".join(command) for command in shell],
        "timings": timings, "total_seconds": time.perf_counter() - started,
        "results": {path.stem: json.loads(path.read_text())
                    for path in sorted((run / "eval").glob("*.json"))},
        "table": table,
    }
    path = out / "eval_protocols.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
