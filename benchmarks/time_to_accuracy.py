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

``--budget-s`` stops the run there (SIGTERM to itself: the engine stops at the next step
boundary and saves its checkpoint), and the JSON holds the epochs done by then; a SIGTERM
from outside (a time limit) ends it the same way. The GPU scale keeps the 200-epoch cosine
schedule, so a 600 s budget may cut it before the learning rate has decayed. For the best
accuracy within a budget, shorten the schedule to fit it: ``train.epochs=N`` with N about
(budget - setup) / (seconds per epoch, monitors included), the epoch time taken from
benchmarks/epoch_time.py --scale gpu (``--every`` thins the monitors).

``data.dataset=cifar100 data.root=...`` measures CIFAR-100 where a copy is present.

Against lightly (``--peer lightly``; needs ``pip install 'lightly>=1.5,<2'``, a
benchmark-only package that mixmask itself does not depend on)::

    python benchmarks/time_to_accuracy.py --peer lightly --budget-s 600 \
        data.root=../shared/data/cifar10_jpeg_q75.tar.gz

runs three pipelines one after another, in this process, on the same CPU, each for the
same wall-clock budget (default 600 s, counted from the pipeline's start: data split,
model, loader, training) or until the recipe's cosine schedule ends (``train.epochs``),
whichever comes first:

1. lightly MoCo v2: lightly's own building blocks in lightly's documented loop
   (MoCoV2Transform, a torch DataLoader with every core as a worker, MoCoProjectionHead,
   NTXentLoss with a memory bank, update_momentum), on our backbone module and the
   quickstart's recipe (queue, temperature, momentum, SGD, cosine, batch, width);
2. mixmask MoCo v2: ``mixmask pretrain`` of the quickstart with ``method.masking=none``;
3. mixmask MixMask: the quickstart as it is.

Training only (monitors and end-of-run evaluation off; the engine still saves last.ckpt
each epoch). A budget stops a mixmask run the way SLURM does, by SIGTERM, at the next
step boundary, with last.ckpt saved. Afterwards every backbone gets the same kNN: our
weighted kNN (``monitor.knn_k`` = 200, ``monitor.knn_temperature`` = 0.1) on the same
eval images. Prints a table and writes JSON (machine, versions, settings, rows) to
``--out``/lightly_seed<seed>.json. Overrides apply to all three pipelines; our runs
load with ``data.num_workers`` workers (the quickstart's 1: on 2 cores the main process
trains), lightly's with ``os.cpu_count()``, as its examples do (the JSON records both).
The quickstart's 10 epochs may end before 600 s on a fast machine; ``train.epochs=N``
(a longer schedule) makes the budget the limit for every pipeline alike.

Precision: ours run at the recipe's ``train.precision`` (``auto``: bf16 on a CPU or GPU that
computes it natively, else fp32; each row records what ran); lightly's loop runs as its
users write it, in fp32. Each pipeline's weights at every epoch's end (our epoch
checkpoints, lightly's in-memory copies, not timed) get the kNN afterwards, in fp32 for
all, so the JSON holds each pipeline's kNN curve against training time, and the
``comparison``: the training time lightly's MoCo v2 and ours take to reach the kNN both
reach (the lower of the two final kNNs, at epoch resolution), their ratio, and lightly's
kNN after as much training time as ours took. ``--pipelines lightly mocov2`` runs only
those two; ``--summarise`` prints the table over every ``lightly_seed*.json`` in
``--out`` (mean ± std over seeds)::

    for seed in 0 1 2; do python benchmarks/time_to_accuracy.py --peer lightly \
        --pipelines lightly mocov2 --seed $seed data.root=...; done
    python benchmarks/time_to_accuracy.py --peer lightly --summarise
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mixmask.config import load_config
from mixmask.data.splits import load_eval_data, load_split
from mixmask.errors import MixmaskError
from mixmask.eval.features import extract_features
from mixmask.eval.knn import knn_top1
from mixmask.models.backbones import build_backbone
from mixmask.runs.checkpoint import read_checkpoint
from mixmask.train.fabric import device_name, resolve_accelerator, versions
from mixmask.train.loop import RunStopped, pretrain

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


# --------------------------------------------------------------------------- --peer lightly

PEER_BUDGET_S = 600.0
LIGHTLY_MISSING = ("--peer lightly needs the lightly package: pip install 'lightly>=1.5,<2' "
                   "(a benchmark-only dependency, not installed with mixmask).")
# Training only: the per-epoch monitors and the end-of-run evaluation would spend the
# budget of our runs on work the lightly loop does not do; every backbone is measured
# with the same kNN afterwards instead.
PEER_TRAINING_ONLY = ["monitor.knn=false", "monitor.online_probe=false", "eval.knn=false",
                      "eval.linear=false", "eval.compare_random_init=false",
                      # epoch=N.ckpt each epoch: the kNN curve, measured afterwards
                      "train.checkpoint_every=1"]
PIPELINES = {"lightly": "lightly MoCo v2", "mocov2": "mixmask MoCo v2",
             "mixmask": "mixmask MixMask"}


def reached_at(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first epoch whose kNN top-1 is at least ``target``."""
    return next((point["train_s"] for point in curve if point["knn_top1"] >= target), None)


def knn_by(curve: list[dict[str, float]], seconds: float) -> float | None:
    """kNN top-1 of the last epoch finished within ``seconds`` of training."""
    done = [point["knn_top1"] for point in curve if point["train_s"] <= seconds]
    return done[-1] if done else None


def peer_comparison(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """lightly's MoCo v2 against ours, both ways the issue asks: the training time each
    takes to reach the kNN both reach (the lower of their final kNNs; epoch resolution),
    and lightly's kNN after as much training time as ours took in all."""
    by_name = {row["pipeline"]: row for row in rows}
    lightly, ours = by_name.get(PIPELINES["lightly"]), by_name.get(PIPELINES["mocov2"])
    if not (lightly and ours and lightly["curve"] and ours["curve"]):
        return None
    target = min(lightly["curve"][-1]["knn_top1"], ours["curve"][-1]["knn_top1"])
    lightly_s, ours_s = reached_at(lightly["curve"], target), reached_at(ours["curve"], target)
    ours_total = ours["curve"][-1]["train_s"]
    return {"target_knn": target, "lightly_s": lightly_s, "ours_s": ours_s,
            "speedup": lightly_s / ours_s if lightly_s and ours_s else None,
            "ours_precision": ours["precision"], "ours_train_s": ours_total,
            "ours_knn": ours["curve"][-1]["knn_top1"],
            "lightly_knn_at_ours_time": knn_by(lightly["curve"], ours_total)}


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def summarise_peer(out: Path) -> str:
    """A markdown table over every ``OUT/lightly_seed*.json``: each pipeline's precision,
    images/s, final kNN and training time (mean ± std over the seeds), then the
    comparison rows."""
    results = [json.loads(path.read_text()) for path in sorted(out.glob("lightly_seed*.json"))]
    if not results:
        raise SystemExit(f"no lightly_seed*.json in {out}: run --peer lightly first")
    lines = [f"seeds: {', '.join(str(r['settings']['seed']) for r in results)}", "",
             "| pipeline | precision | training img/s | kNN top-1 | training time (s) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name in PIPELINES.values():
        rows = [row for r in results for row in r["rows"] if row["pipeline"] == name]
        if rows:
            lines.append(f"| {name} | {rows[0]['precision']} | "
                         f"{_spread([row['images_per_s'] for row in rows])} | "
                         f"{_spread([row['knn_top1'] for row in rows])} | "
                         f"{_spread([row['train_s'] for row in rows])} |")
    compared = [r["comparison"] for r in results if r.get("comparison")]
    at_ours_time = [c["lightly_knn_at_ours_time"] for c in compared
                    if c["lightly_knn_at_ours_time"] is not None]
    if compared:
        lines += ["", "| comparison (lightly MoCo v2 vs mixmask MoCo v2) | value |",
                  "| --- | ---: |",
                  f"| kNN both reach (the lower final kNN) | "
                  f"{_spread([c['target_knn'] for c in compared])} |",
                  f"| lightly's training time to reach it (s) | "
                  f"{_spread([c['lightly_s'] for c in compared if c['lightly_s']])} |",
                  f"| ours (s) | {_spread([c['ours_s'] for c in compared if c['ours_s']])} |",
                  f"| speed-up at equal kNN (lightly time / ours) | "
                  f"{_spread([c['speedup'] for c in compared if c['speedup']])} |",
                  f"| ours: kNN at the end of its training | "
                  f"{_spread([c['ours_knn'] for c in compared])} |",
                  f"| lightly: kNN after as much training time | {_spread(at_ours_time)} |"]
    return "\n".join(lines)


class LightlyViews(Dataset):
    """An ImageSet as lightly's examples feed it: (the transform's views of a PIL image,
    label)."""

    def __init__(self, image_set, transform):
        self.image_set, self.transform = image_set, transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        image, label = self.image_set.load_item(index)
        return self.transform(image), label


def knn_of(backbone: torch.nn.Module, eval_data, config, device: torch.device) -> float:
    """kNN top-1 (percent) of a backbone's pooled features: our monitor's weighted kNN
    (InstDisc; ``monitor.knn_k``, ``monitor.knn_temperature``), for every pipeline."""
    train_features, train_labels = extract_features(backbone, eval_data.train, device=device)
    test_features, test_labels = extract_features(backbone, eval_data.test, device=device)
    return knn_top1(train_features, train_labels, test_features, test_labels,
                    num_classes=eval_data.num_classes, k=config.monitor.knn_k,
                    temperature=config.monitor.knn_temperature)


def lightly_moco_v2(config, *, budget_s: float, max_steps: int | None = None, eval_data=None,
                    num_workers: int | None = None) -> dict[str, Any]:
    """Train lightly's MoCo v2 on ``config``'s data and recipe until ``budget_s`` seconds
    have passed since the call (data, model, loader and training), the cosine schedule
    over ``train.epochs`` has ended, or ``max_steps`` steps are done (None:
    ``train.max_steps``; 0: no cap); then measure the kNN top-1 on ``eval_data``
    (default: ``load_eval_data(config)``). Returns the table row.

    lightly's pieces in lightly's MoCo example loop (momentum update, query, key, loss);
    the backbone is ours (``build_backbone``: same module as our runs, so only the
    pipeline differs), and every setting comes from the config: queue size, temperature,
    projector sizes, momentum, SGD lr / momentum / weight decay, cosine schedule, batch.
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform
    from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

    started = time.perf_counter()
    train, params = config.train, config.method.mocov2
    device = torch.device(resolve_accelerator(train.device))
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    train_set = load_split(config, "pretrain", config.data.subset)
    # lightly's CIFAR-10 benchmark (docs/source/getting_started/benchmarks/
    # cifar10_benchmark.py) turns the Gaussian blur off at 32 px, where it destroys most
    # of the image; the rest of MoCoV2Transform's defaults (crop scale 0.2-1, jitter
    # 0.4/0.4/0.4/0.1 with p=0.8, grayscale 0.2, flip 0.5) are then our "cifar" preset.
    # Normalised with the dataset's statistics, as the kNN's eval transform is (lightly
    # defaults to ImageNet's).
    transform = MoCoV2Transform(input_size=config.data.image_size, gaussian_blur=0.0,
                                normalize={"mean": list(train_set.mean),
                                           "std": list(train_set.std)})
    # Persistent workers, as our loader has: no worker restart at every epoch.
    loader = DataLoader(LightlyViews(train_set, transform), batch_size=train.batch_size,
                        shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(train.seed))
    torch.manual_seed(train.seed)  # the initial weights of our runs (the engine seeds so)
    backbone, feature_dim = build_backbone(config.model, config.data.image_size)
    projection_head = MoCoProjectionHead(feature_dim, params.proj_hidden_dim,
                                         params.proj_output_dim)
    backbone_momentum = copy.deepcopy(backbone)
    projection_head_momentum = copy.deepcopy(projection_head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(projection_head_momentum)
    for module in (backbone, projection_head, backbone_momentum, projection_head_momentum):
        module.to(device).train()
    criterion = NTXentLoss(temperature=params.temperature,
                           memory_bank_size=(params.queue_size, params.proj_output_dim)).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *projection_head.parameters()],
                                lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise MixmaskError(f"the training set has {len(train_set)} images, fewer than one "
                           f"batch (train.batch_size={train.batch_size}).")
    schedule_steps = train.epochs * steps_per_epoch  # the schedule ours follows
    # Stepped per step, as our engine's; ends at 0 like ours (lightly's default: 0.001).
    scheduler = CosineWarmupScheduler(optimizer, int(train.warmup_epochs * steps_per_epoch),
                                      schedule_steps, end_value=0.0)
    cap = train.max_steps if max_steps is None else max_steps
    total_steps = min(schedule_steps, cap) if cap else schedule_steps

    def query_and_key(query_view, key_view):
        query = projection_head(backbone(query_view.to(device, non_blocking=True)))
        with torch.no_grad():
            key = projection_head_momentum(backbone_momentum(key_view.to(device,
                                                                         non_blocking=True)))
        return query, key

    setup_s = time.perf_counter() - started
    step, loss, snapshots, paused = 0, torch.tensor(float("nan")), [], 0.0
    while step < total_steps and time.perf_counter() - started < budget_s:
        for (view_0, view_1), _ in loader:
            momentum = (params.momentum if params.momentum_schedule == "constant" else
                        cosine_schedule(step, total_steps, params.momentum, params.momentum_end))
            update_momentum(backbone, backbone_momentum, m=momentum)
            update_momentum(projection_head, projection_head_momentum, m=momentum)
            loss = criterion(*query_and_key(view_0, view_1))
            if params.symmetric:
                other = criterion(*query_and_key(view_1, view_0))
                loss = loss + other if params.symmetric_reduction == "sum" else (loss + other) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % steps_per_epoch == 0:  # the epoch's weights, for the kNN curve
                copying = time.perf_counter()
                snapshots.append((step, copying - started - setup_s - paused,
                                  {key: value.detach().clone()
                                   for key, value in backbone.state_dict().items()}))
                paused += time.perf_counter() - copying
            if step >= total_steps or time.perf_counter() - started >= budget_s:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_s = time.perf_counter() - started - paused
    del loader  # its workers
    knn_started = time.perf_counter()
    eval_data = eval_data if eval_data is not None else _eval_data(config)
    knn = knn_of(backbone, eval_data, config, device)
    curve = []
    for epoch_step, train_s, state in snapshots:
        backbone.load_state_dict(state)
        curve.append({"epoch": epoch_step / steps_per_epoch, "train_s": train_s,
                      "knn_top1": knn_of(backbone, eval_data, config, device)})
    # lightly's users run its loop as written, in fp32 (it leaves precision to the loop).
    return _row("lightly MoCo v2", steps=step, batch_size=train.batch_size,
                steps_per_epoch=steps_per_epoch, wall_s=wall_s, train_s=wall_s - setup_s,
                knn=knn, knn_s=time.perf_counter() - knn_started, loss=float(loss.detach()),
                workers=workers, precision="32", curve=curve)


class BudgetStop:
    """Stop a ``pretrain`` in this process once ``budget_s`` seconds have passed since
    entering: SIGTERM to this process, which the engine's handler turns into a stop at the
    next step boundary, last.ckpt saved (how SLURM ends a job). It is sent only once the
    engine's handler is installed; a no-op handler of ours catches one that comes before
    (not sent) or after the run (a race at its very end), so it never kills the process."""

    def __init__(self, budget_s: float):
        self.budget_s, self.fired = budget_s, False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> BudgetStop:
        self.deadline = time.perf_counter() + self.budget_s
        self._previous = signal.signal(signal.SIGTERM, self._ignore)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        signal.signal(signal.SIGTERM, self._previous)

    def _ignore(self, signum, frame) -> None:
        pass

    def _watch(self) -> None:
        if self._done.wait(max(0.0, self.deadline - time.perf_counter())):
            return
        while not self._done.is_set():
            if signal.getsignal(signal.SIGTERM) != self._ignore:  # the engine's handler
                self.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._done.wait(0.05)


def mixmask_run(config, pipeline: str, *, budget_s: float, eval_data=None) -> dict[str, Any]:
    """``mixmask pretrain`` of ``config`` (into a fresh ``out_dir``), stopped after
    ``budget_s`` seconds if its schedule (or ``train.max_steps``) has not ended by then;
    then the kNN top-1 of its last.ckpt's backbone. Returns the table row."""
    run_dir = Path(config.out_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
    train_images = len(load_split(config, "pretrain", config.data.subset))
    steps_per_epoch = train_images // config.train.batch_size
    started = time.perf_counter()
    with BudgetStop(budget_s) as stop:
        try:
            pretrain(config)
        except RunStopped:  # "stopped by SIGTERM after step N; saved last.ckpt"
            if not stop.fired:
                raise
    wall_s = time.perf_counter() - started
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    backbone, _ = build_backbone(config.model, config.data.image_size)
    backbone.load_state_dict({key.removeprefix("backbone."): value
                              for key, value in checkpoint["method"].items()
                              if key.startswith("backbone.")})
    device = torch.device(resolve_accelerator(config.train.device))
    knn_started = time.perf_counter()
    eval_data = eval_data if eval_data is not None else _eval_data(config)
    knn = knn_of(backbone.to(device), eval_data, config, device)
    curve = []  # from the epoch checkpoints (train.checkpoint_every=1), where kept
    for path in sorted((run_dir / "checkpoints").glob("epoch=*.ckpt"),
                       key=lambda found: int(found.stem.removeprefix("epoch="))):
        epoch = read_checkpoint(path)
        backbone.load_state_dict({key.removeprefix("backbone."): value
                                  for key, value in epoch["method"].items()
                                  if key.startswith("backbone.")})
        curve.append({"epoch": epoch["step"] / steps_per_epoch, "train_s": epoch["wall_time_s"],
                      "knn_top1": knn_of(backbone, eval_data, config, device)})
    # The checkpoint's wall time runs from the engine's training start (after data and model).
    return _row(pipeline, steps=checkpoint["step"], batch_size=config.train.batch_size,
                steps_per_epoch=steps_per_epoch, wall_s=wall_s,
                train_s=checkpoint["wall_time_s"], knn=knn,
                knn_s=time.perf_counter() - knn_started, loss=_last_loss(run_dir),
                workers=config.data.num_workers, stopped_by_budget=stop.fired,
                precision=config.train.precision, curve=curve)  # as pretrain resolved it


def _row(pipeline: str, *, steps: int, batch_size: int, steps_per_epoch: int, wall_s: float,
         train_s: float, knn: float, knn_s: float, loss: float, workers: int,
         stopped_by_budget: bool | None = None, precision: str = "32",
         curve: list[dict[str, float]] | None = None) -> dict[str, Any]:
    # Throughput: images (not views) per second of training, setup excluded, alike for all.
    row = {"pipeline": pipeline, "images_per_s": steps * batch_size / train_s if train_s else 0.0,
           "epochs": steps / steps_per_epoch, "steps": steps, "knn_top1": knn,
           "wall_s": wall_s, "train_s": train_s, "setup_s": wall_s - train_s, "knn_s": knn_s,
           "last_loss": loss, "loader_workers": workers, "precision": precision,
           "curve": curve or []}
    if stopped_by_budget is not None:
        row["stopped_by_budget"] = stopped_by_budget
    return row


def _last_loss(run_dir: Path) -> float:
    if not (run_dir / "metrics.csv").is_file():  # stopped before its first logged step
        return float("nan")
    with (run_dir / "metrics.csv").open() as handle:
        losses = [row["loss"] for row in csv.DictReader(handle) if row.get("loss")]
    return float(losses[-1]) if losses else float("nan")


def _eval_data(config):
    eval_data, reason = load_eval_data(config)
    if eval_data is None:
        raise MixmaskError(f"cannot measure kNN: {reason}.")
    return eval_data


def compare_with_lightly(args) -> None:
    try:
        import lightly
    except ImportError:
        print(LIGHTLY_MISSING, file=sys.stderr)
        raise SystemExit(2) from None
    budget = PEER_BUDGET_S if args.budget_s is None else args.budget_s
    out = Path(args.out)
    run_root = out / f"lightly_seed{args.seed}"
    common = [*SCALES[args.scale], *PEER_TRAINING_ONLY, *args.overrides,
              f"train.seed={args.seed}", "train.progress_bar=false"]
    try:
        configs = {
            "lightly MoCo v2": load_config(CONFIG, [*common, "method.masking=none",
                                                    f"out_dir={run_root / 'lightly'}"]),
            "mixmask MoCo v2": load_config(CONFIG, [*common, "method.masking=none",
                                                    f"out_dir={run_root / 'mocov2'}"]),
            "mixmask MixMask": load_config(CONFIG, [*common, f"out_dir={run_root / 'mixmask'}"]),
        }
        chosen = [PIPELINES[key] for key in args.pipelines]
        reference = configs["lightly MoCo v2"]
        if reference.method.name != "mocov2" or reference.train.optimizer != "sgd":
            raise MixmaskError("--peer lightly compares MoCo v2 with SGD (the quickstart's "
                               "recipe); drop the method.name / train.optimizer override.")
        # Decoded (and unpacked) once here, so no pipeline's budget pays the first decode.
        load_split(reference, "pretrain", reference.data.subset)
        eval_data = _eval_data(reference)
        # lightly first: our engine sets process-wide malloc options (mixmask.train.runtime) that
        # would otherwise speed up the lightly loop too.
        rows = ([lightly_moco_v2(configs["lightly MoCo v2"], budget_s=budget,
                                 eval_data=eval_data)] if "lightly MoCo v2" in chosen else [])
        for pipeline in ("mixmask MoCo v2", "mixmask MixMask"):
            if pipeline in chosen:
                rows.append(mixmask_run(configs[pipeline], pipeline, budget_s=budget,
                                        eval_data=eval_data))
    except MixmaskError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None

    model = reference.model
    print(f"\n{reference.data.dataset} ({len(eval_data.train)} kNN bank / "
          f"{len(eval_data.test)} test images), {model.backbone} width {model.width}, batch "
          f"{reference.train.batch_size}, budget {budget:.0f} s each, "
          f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores")
    print(f"kNN: weighted, k={reference.monitor.knn_k}, t={reference.monitor.knn_temperature}, "
          "same eval images for all")
    print(f"{'pipeline':<16} {'precision':>9} {'img/s':>7} {'epochs':>7} {'kNN top-1':>9} "
          f"{'wall s':>7}")
    for row in rows:
        print(f"{row['pipeline']:<16} {row['precision']:>9} {row['images_per_s']:7.1f} "
              f"{row['epochs']:7.2f} {row['knn_top1']:9.2f} {row['wall_s']:7.1f}")
    comparison = peer_comparison(rows)
    if comparison is not None:
        speedup = comparison["speedup"]
        print(f"kNN both reach {comparison['target_knn']:.2f}: lightly after "
              f"{comparison['lightly_s']:.0f} s of training, ours ({comparison['ours_precision']})"
              f" after {comparison['ours_s']:.0f} s"
              + (f" ({speedup:.2f}x)" if speedup else "") + "; lightly's kNN after ours' "
              f"{comparison['ours_train_s']:.0f} s: {comparison['lightly_knn_at_ours_time']}")
    result = {
        "peer": "lightly",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(resolve_accelerator(reference.train.device)),
                    "versions": {**versions(), "lightly": lightly.__version__}},
        "settings": {
            "budget_s": budget, "config": str(CONFIG), "scale": args.scale,
            "overrides": args.overrides, "seed": args.seed, "pipelines": chosen,
            "knn_features": "fp32 for every pipeline (the same kNN, whatever each trained in)",
            "budget_counts": "data split, model, loader and training; kNN afterwards",
            "knn": {"k": reference.monitor.knn_k,
                    "temperature": reference.monitor.knn_temperature,
                    "bank_images": len(eval_data.train), "test_images": len(eval_data.test)},
            "lightly_transform": "MoCoV2Transform(input_size, gaussian_blur=0.0, dataset "
                                 "mean/std)",
            "resolved_config": {name: config.to_dict() for name, config in configs.items()},
        },
        "rows": rows, "comparison": comparison,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lightly_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.key=value for the run")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--every", type=int, default=1, help="monitor every N epochs")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop the run at this wall time (at a step boundary, checkpoint "
                             "and JSON written) and report the accuracy reached by then "
                             f"(--peer: train each pipeline for it; default "
                             f"{PEER_BUDGET_S:.0f})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/benchmarks/time_to_accuracy")
    parser.add_argument("--peer", choices=["lightly"], default=None,
                        help="compare with another library's MoCo v2 (see above)")
    parser.add_argument("--pipelines", nargs="+", choices=list(PIPELINES),
                        default=list(PIPELINES), help="--peer: which pipelines run")
    parser.add_argument("--summarise", action="store_true",
                        help="--peer: print the table over OUT's lightly_seed*.json; run "
                             "nothing")
    args = parser.parse_intermixed_args()  # overrides before and after the flags
    if args.peer == "lightly" and args.summarise:
        print(summarise_peer(Path(args.out)))
        return
    if args.peer == "lightly":
        compare_with_lightly(args)
        return

    out = Path(args.out)
    run_dir = out / f"{args.scale}_seed{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
    overrides = [*SCALES[args.scale], "train.plots=curves", "monitor.knn=true",
                 "monitor.online_probe=true",
                 f"monitor.knn_every={args.every}", *args.overrides, f"train.seed={args.seed}",
                 "train.progress_bar=false", f"out_dir={run_dir}"]
    config = load_config(CONFIG, overrides)
    started = time.perf_counter()
    stopped = None
    try:
        if args.budget_s is None:
            summary = pretrain(config)
        else:  # the run stops itself at the budget, at a step boundary, checkpoint saved
            with BudgetStop(args.budget_s) as budget_stop:
                try:
                    summary = pretrain(config)
                except RunStopped:
                    if not budget_stop.fired:
                        raise
                    summary, stopped = None, f"stopped at its budget of {args.budget_s:.0f} s"
    except RunStopped as stop:  # a signal from outside (a time limit): keep what it did
        summary, stopped = None, str(stop)
    command_wall = time.perf_counter() - started
    if summary is None:  # stopped: what the checkpoint and metrics.csv say
        checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        summary = {"wall_time_s": checkpoint["wall_time_s"], "steps": checkpoint["step"],
                   "device": device_name(torch.device(resolve_accelerator(
                       config.train.device))), "versions": versions(), "stopped": stopped}
        print(f"note: {stopped.split(';')[0]} (step {checkpoint['step']})", flush=True)

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
              "budget_s": budget, "stopped": stopped, "setup_s": setup_s,
              "command_wall_s": command_wall,
              "device": summary["device"], "versions": summary["versions"],
              "seconds_per_epoch": (summary["wall_time_s"] / len(epochs)) if epochs else None,
              "reached": reached, "epochs": epochs, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.scale}_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
