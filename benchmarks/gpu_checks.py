"""The single-GPU checks of issue 31 (../shared/notes/gpu-readiness.md), the first minute
of benchmarks/gpu_suite.sh: what only a CUDA run can show, each recorded as passed or
failed with its first error line, never stopping the suite.

1. fp16: two steps of the SiameseIM ViT recipe at ``train.precision=16`` (GradScaler,
   gradient clipping, fused AdamW), then the same with ``train.on_nonfinite=skip``.
2. No host sync inside a step: one MixMask (MoCo v2) and one SiameseIM step under
   ``torch.cuda.set_sync_debug_mode("error")``, after two warm-up steps.
3. ``mixmask plot`` on the fp16 run (features come back from the GPU for the t-SNE).

    python benchmarks/gpu_checks.py --data data/cifar10_jpeg_q75.tar.gz --out OUT
    python benchmarks/gpu_checks.py --device cpu ...   # the same path on the CPU (smoke)

Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch

from mixmask.cli import main as mixmask_main
from mixmask.config import load_config
from mixmask.data import EpochBatchSampler, build_train_loader
from mixmask.data.splits import load_split
from mixmask.methods import PixelStats, build_method
from mixmask.ops.optim import build_optimizer
from mixmask.train.loop import pretrain
from mixmask.train.step import training_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=imagefolder", "data.eval_train_subset=256",
        "data.eval_test_subset=128", "data.num_workers=2", "train.batch_size=32",
        "train.progress_bar=false", "monitor.knn=false", "monitor.online_probe=false",
        "eval.knn=false", "eval.linear=false", "eval.compare_random_init=false",
        "train.plots=curves"]


def check(results: list[dict], name: str, function) -> None:
    started = time.perf_counter()
    try:
        detail = function()
        outcome = {"ok": True, "detail": detail}
    except Exception as error:  # noqa: BLE001 - a failed check is a result, not a stop
        frame = traceback.extract_tb(error.__traceback__)[-1]
        outcome = {"ok": False, "detail": f"{type(error).__name__}: "
                   f"{(str(error).strip().splitlines() or [''])[0]} ({frame.filename}:"
                   f"{frame.lineno})"}
    outcome.update(name=name, seconds=round(time.perf_counter() - started, 1))
    results.append(outcome)
    print(f"{'PASS' if outcome['ok'] else 'FAIL'} {name} ({outcome['seconds']} s): "
          f"{outcome['detail']}", flush=True)


def write(results: list[dict], out: Path, device: str, planned: int) -> None:
    """results.json after every check: a time limit keeps the checks done by then."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"benchmark": "gpu_checks", "device": device, "torch": str(torch.__version__),
         "planned": planned, "passed": sum(result["ok"] for result in results),
         "checks": results}, indent=2))


def fp16_steps(data: str, out: Path, device: str, subset: int, *extra: str):
    def run():
        shutil.rmtree(out, ignore_errors=True)  # a check starts afresh
        config = load_config(ROOT / "configs" / "cifar10" / "siameseim_vit_tiny.yaml",
                             [*TINY, f"data.root={data}", f"data.subset={subset}",
                              "train.max_steps=2",
                              "train.precision=16", f"train.device={device}",
                              f"out_dir={out}", "resume=none", *extra])
        summary = pretrain(config)
        return {"steps": summary["steps"], "skipped_steps": summary["skipped_steps"],
                "loss_logged": True}
    return run


def sync_free_step(data: str, subset: int, recipe: list[str], device: str):
    """Two warm-up steps, then one under set_sync_debug_mode('error') (CUDA only)."""
    def run():
        config = load_config(None, [*TINY, f"data.root={data}", f"data.subset={subset}",
                                    f"train.device={device}", *recipe])
        images = load_split(config, "pretrain", config.data.subset)
        target = torch.device(device)
        torch.manual_seed(0)
        method = build_method(config, PixelStats(tuple(images.mean),
                                                 tuple(images.std))).to(target)
        loader = build_train_loader(images, EpochBatchSampler(len(images), 32, seed=0),
                                    method.view_configs(), pipeline="device", device=target,
                                    seed=0)
        batches = iter(loader)
        optimizer = build_optimizer(config.train.optimizer,
                                    method.parameter_groups(config.train.optimizer), lr=1e-3,
                                    fused=target.type == "cuda")
        generator = torch.Generator(device=target).manual_seed(0)
        for _ in range(2):
            training_step(method, optimizer, next(batches), generator, 0.0)
        batch = next(batches)  # drawn before the debug mode: the step alone is checked
        if target.type != "cuda":
            training_step(method, optimizer, batch, generator, 0.0)
            return "no CUDA: the step ran, the sync check needs a GPU"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            training_step(method, optimizer, batch, generator, 0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return "one step with no host sync"
    return run


def plot(run: Path):
    def draw():
        code = mixmask_main(["plot", str(run), "train.progress_bar=false"])
        if code != 0:
            raise RuntimeError(f"mixmask plot exited {code}")
        return sorted(path.name for path in (run / "plots").glob("*.png"))
    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tarball")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--subset", type=int, default=256, help="training images per check")
    parser.add_argument("--out", default="runs/benchmarks/gpu_checks")
    args = parser.parse_args()
    out = Path(args.out)
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              and torch.cuda.is_available() else args.device)
    fp16_run = out / "fp16_run"
    checks = [
        ("fp16: two SiameseIM ViT steps (GradScaler, clipping, fused AdamW)",
         fp16_steps(args.data, fp16_run, args.device, args.subset)),
        ("fp16 with on_nonfinite=skip (the scaler still backs off)",
         fp16_steps(args.data, out / "fp16_skip_run", args.device, args.subset,
                    "train.on_nonfinite=skip", "train.fused_optimizer=false")),
        ("no host sync in a MixMask (MoCo v2) step",
         sync_free_step(args.data, args.subset,
                        ["method.name=mocov2", "method.masking=mixmask",
                         "method.mocov2.symmetric=false"], args.device)),
        ("no host sync in a SiameseIM ViT step",
         sync_free_step(args.data, args.subset,
                        ["method.name=siameseim", "model.backbone=vit_tiny",
                         "model.patch_size=4", "train.optimizer=adamw"], args.device)),
        ("mixmask plot on the fp16 run (t-SNE and retrieval from GPU features)",
         plot(fp16_run)),
    ]
    results: list[dict] = []
    for name, function in checks:
        check(results, name, function)
        write(results, out, device, len(checks))
    print(f"{sum(result['ok'] for result in results)} of {len(results)} checks passed; "
          f"wrote {out / 'results.json'}")

if __name__ == "__main__":
    main()
