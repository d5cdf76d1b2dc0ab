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

``--recipe NAME`` runs a recipe instead of the quickstart, e.g. the SimCLR anchor to beat on
a GPU (ResNet-18, CIFAR-10, 500 epochs; solo-learn's recipe at the GPU scale's batch 512,
bf16 and device pipeline)::

    python benchmarks/time_to_accuracy.py --scale gpu --recipe cifar10/simclr_r18 \
        train.epochs=500 --every 25 data.root=...

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

SimCLR and DINO against lightly's (``--peer-method simclr|dino``; the default, ``mocov2``,
is the comparison above): two pipelines each, run and measured as above, on the
quickstart's data budget (5,000 images, ResNet-18 width 0.25 with the CIFAR stem, batch,
epochs, eval subsets, SGD):

1. lightly SimCLR / DINO: lightly's building blocks in lightly's documented example loop
   for the method (SimCLR: SimCLRTransform, SimCLRProjectionHead, NTXentLoss; DINO:
   DINOTransform with two global crops and no local ones, DINOProjectionHead with its
   weight-normalised last layer frozen for the first epoch, DINOLoss with the teacher
   temperature's warm-up and centering, update_momentum on a cosine_schedule), on our
   backbone module;
2. mixmask SimCLR / DINO: ``mixmask pretrain`` with ``method.name=simclr|dino``.

Both read one recipe per method, ``PEER_RECIPES`` in this file (projector sizes,
temperatures, momentum, optimizer, views); lightly's transform takes its arguments from
our views (``data.augmentation``: simclr for SimCLR, byol_cifar for DINO), and what its
arguments cannot match is printed and kept in the JSON (``view_differences``). Overrides
reach both pipelines, except ``method.simclr.*`` / ``method.dino.*``, which would reach
ours only: they are refused, and changed in ``PEER_RECIPES`` instead. DINO's
teacher-temperature warm-up keeps solo-learn's share of the schedule, 50 of 1000 epochs:
1 epoch of the quickstart's 10. JSON: ``--out``/lightly_<method>_seed<seed>.json;
``--summarise`` with ``--peer-method`` tabulates that method's seeds::

    for seed in 0 1 2; do python benchmarks/time_to_accuracy.py --peer lightly \
        --peer-method simclr --seed $seed data.root=...; done
    python benchmarks/time_to_accuracy.py --peer lightly --peer-method simclr --summarise

(``--peer-method dino`` likewise; ``--pipelines lightly`` runs lightly's side alone.)
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from mixmask.config import load_config
from mixmask.data.splits import load_eval_data, load_split
from mixmask.data.views import ViewConfig, preset_views
from mixmask.errors import MixmaskError
from mixmask.eval.features import extract_features
from mixmask.eval.knn import knn_top1
from mixmask.models.backbones import build_backbone
from mixmask.runs.checkpoint import read_checkpoint
from mixmask.train.fabric import device_name, resolve_accelerator, versions
from mixmask.train.loop import RunStopped, pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_recipes import PEER_RECIPES, PeerRecipe  # noqa: E402

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


PEER_METHODS = ("mocov2", *PEER_RECIPES)
# Each method's pipelines (--pipelines keys -> row names): lightly's, then ours.
PEER_PIPELINES = {"mocov2": PIPELINES, **{
    name: {"lightly": f"lightly {recipe.label}", name: f"mixmask {recipe.label}"}
    for name, recipe in PEER_RECIPES.items()}}


def peer_stem(method: str) -> str:
    """The JSON's name before the seed: MoCo v2 keeps its ``lightly_seed<seed>.json``."""
    return "lightly_seed" if method == "mocov2" else f"lightly_{method}_seed"


def reached_at(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first epoch whose kNN top-1 is at least ``target``."""
    return next((point["train_s"] for point in curve if point["knn_top1"] >= target), None)


def knn_by(curve: list[dict[str, float]], seconds: float) -> float | None:
    """kNN top-1 of the last epoch finished within ``seconds`` of training."""
    done = [point["knn_top1"] for point in curve if point["train_s"] <= seconds]
    return done[-1] if done else None


def peer_comparison(rows: list[dict[str, Any]], lightly_name: str = PIPELINES["lightly"],
                    ours_name: str = PIPELINES["mocov2"]) -> dict[str, Any] | None:
    """lightly's pipeline against ours (MoCo v2 unless named), both ways the issue asks:
    the training time each takes to reach the kNN both reach (the lower of their final
    kNNs; epoch resolution), and lightly's kNN after as much training time as ours took
    in all."""
    by_name = {row["pipeline"]: row for row in rows}
    lightly, ours = by_name.get(lightly_name), by_name.get(ours_name)
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


def summarise_peer(out: Path, method: str = "mocov2") -> str:
    """A markdown table over every ``OUT/lightly_seed*.json`` (MoCo v2) or
    ``OUT/lightly_<method>_seed*.json``: each pipeline's precision, images/s, final kNN
    and training time (mean ± std over the seeds), then the comparison rows."""
    stem = peer_stem(method)
    results = [json.loads(path.read_text()) for path in sorted(out.glob(f"{stem}*.json"))]
    if not results:
        flag = "" if method == "mocov2" else f" --peer-method {method}"
        raise SystemExit(f"no {stem}*.json in {out}: run --peer lightly{flag} first")
    pipelines = PEER_PIPELINES[method]
    lines = [f"seeds: {', '.join(str(r['settings']['seed']) for r in results)}", "",
             "| pipeline | precision | training img/s | kNN top-1 | training time (s) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for name in pipelines.values():
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
        lightly_name, ours_name = list(pipelines.values())[:2]
        lines += ["", f"| comparison ({lightly_name} vs {ours_name}) | value |",
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


# ------------------------------------------------- lightly's transforms from our views

# Both sides draw the same augmentation: lightly's transform gets its arguments from our
# views (data.augmentation's ViewConfigs), parameter by parameter; what its arguments
# cannot say is returned as a sentence each (printed, and kept in the JSON).
# Same on both sides without an argument: ColorJitter, RandomGrayscale and
# RandomResizedCrop are torchvision's on both (lightly's through transforms.v2, antialiased
# on PIL images as ours); lightly flips before the colour ops and ours after them, which
# draws the same distribution (a flip commutes with per-pixel colour ops, a symmetric
# blur and solarization); lightly's RandomSolarization (PIL, threshold 128) inverts the
# same pixels as ours (x >= ceil(0.5 * 255) = 128); both normalise with the dataset's
# mean and std.
_TORCHVISION_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _blur_difference(view: ViewConfig) -> str:
    covers = view.kernel_size >= 2 * math.ceil(3 * view.blur_sigma[1]) + 1
    return (f"blur (p {view.blur_p}, sigma {view.blur_sigma[0]}-{view.blur_sigma[1]}): "
            "lightly's GaussianBlur is PIL's GaussianBlur(radius=sigma), as solo-learn's (box "
            "blurs approximating a Gaussian, support growing with sigma); ours is torchvision's "
            f"Gaussian {view.kernel_size}x{view.kernel_size} kernel at {view.image_size} px "
            "(ViewConfig.kernel_size), " + (
                "which covers +-3 sigma" if covers else "so lightly blurs more at large sigma")
            + "; no SimCLRTransform / DINOTransform argument sets a kernel")


def _crop_differences(view: ViewConfig, interpolation: str) -> list[str]:
    found = []
    if view.crop != "resized":
        found.append(f"crop: ours is {view.crop!r}; lightly's is a RandomResizedCrop")
    if tuple(view.ratio) != _TORCHVISION_RATIO:
        found.append(f"crop aspect ratio: ours {view.ratio}; lightly's is torchvision's "
                     "(3/4, 4/3)")
    if view.interpolation != interpolation:
        found.append(f"crop resampling: lightly's is {interpolation}, ours "
                     f"{view.interpolation} (data.augmentation's preset)")
    if not view.antialias:
        found.append("crop antialiasing: ours is off, lightly's on")
    return found


def lightly_simclr_views(views: list[ViewConfig], normalize: dict[str, list[float]]
                         ) -> tuple[dict[str, Any], list[str]]:
    """SimCLRTransform's arguments for our two views, and what it cannot match."""
    view = views[0]
    differences = [] if len(set(views)) == 1 else [
        "views: SimCLRTransform draws both views alike, ours differ (only the first is used)"]
    differences += _crop_differences(view, "bilinear")
    if view.scale[1] != 1.0:
        differences.append(f"crop scale: ours up to {view.scale[1]}, lightly's up to 1")
    if view.solarize_p:
        differences.append("solarization: SimCLRTransform has none")
    if view.blur_p:
        differences.append(_blur_difference(view))
    return {"input_size": view.image_size,
            "cj_prob": view.jitter_p, "cj_strength": 1.0,  # the jitter as ours gives it
            "cj_bright": view.brightness, "cj_contrast": view.contrast,
            "cj_sat": view.saturation, "cj_hue": view.hue,
            "min_scale": view.scale[0], "random_gray_scale": view.grayscale_p,
            "gaussian_blur": view.blur_p, "sigmas": tuple(view.blur_sigma),
            "vf_prob": 0.0, "hf_prob": view.flip_p, "rr_prob": 0.0,
            "normalize": normalize}, differences


# DINOTransform's second global view ignores cj_strength (it keeps DINOViewTransform's
# default, 0.5), so the jitter goes in as 0.5 x (ours / 0.5): the same on both views.
_DINO_CJ_STRENGTH = 0.5


def lightly_dino_views(views: list[ViewConfig], keys: dict[str, Any],
                       normalize: dict[str, list[float]]) -> tuple[dict[str, Any], list[str]]:
    """DINOTransform's arguments for our two global views (the asymmetric pair: blur per
    view, solarization on the second) and DINO's keys (crop scales, local crops), and
    what it cannot match. The global views crop with ``global_crop_scale``, as ours
    (mixmask.data.views.multi_crop_views replaces the preset's scale with it)."""
    first, second = (dataclasses.replace(view, scale=tuple(keys["global_crop_scale"]))
                     for view in views[:2])
    differences = _crop_differences(first, "bicubic")  # DINOViewTransform: always bicubic
    per_view = {"blur_p", "solarize_p"}  # DINOTransform sets these per view; the rest alike
    unlike = [item.name for item in dataclasses.fields(ViewConfig)
              if item.name not in per_view and getattr(first, item.name) != getattr(second,
                                                                                    item.name)]
    if unlike:
        differences.append(f"views: DINOTransform's global views share everything but blur "
                           f"and solarization; ours also differ in {', '.join(unlike)}")
    if first.solarize_p:
        differences.append("solarization of the first view: DINOTransform has none")
    differences += [_blur_difference(view) for view in (first, second) if view.blur_p][:1]
    arguments = {"global_crop_size": first.image_size, "global_crop_scale": first.scale,
                 "n_local_views": keys["local_crops"],
                 "hf_prob": first.flip_p, "vf_prob": 0.0, "rr_prob": 0.0,
                 "cj_prob": first.jitter_p, "cj_strength": _DINO_CJ_STRENGTH,
                 "cj_bright": first.brightness / _DINO_CJ_STRENGTH,
                 "cj_contrast": first.contrast / _DINO_CJ_STRENGTH,
                 "cj_sat": first.saturation / _DINO_CJ_STRENGTH,
                 "cj_hue": first.hue / _DINO_CJ_STRENGTH,
                 "random_gray_scale": first.grayscale_p,
                 # Our local crops: the first view's colours, blur p at most 0.5, no
                 # solarization (multi_crop_views), as DINOTransform's local transform.
                 "gaussian_blur": (first.blur_p, second.blur_p, min(first.blur_p, 0.5)),
                 "sigmas": tuple(first.blur_sigma), "solarization_prob": second.solarize_p,
                 "normalize": normalize}
    if keys["local_crops"]:
        if not keys["local_crop_size"]:
            raise MixmaskError("lightly's DINOTransform needs the local crops' size: set "
                               "local_crop_size in PEER_RECIPES['dino'].")
        arguments.update(local_crop_size=keys["local_crop_size"],
                         local_crop_scale=tuple(keys["local_crop_scale"]))
    return arguments, differences


def peer_views(config, recipe: PeerRecipe, normalize: dict[str, list[float]] | None = None
               ) -> tuple[dict[str, Any], list[str]]:
    """lightly's transform arguments for ``recipe``'s method (SimCLR, DINO) from
    ``config``'s views and the recipe's keys, and the sentences on what they cannot
    match."""
    views = preset_views(config.data.augmentation, config.data.image_size, 2)
    if recipe.name == "simclr":
        return lightly_simclr_views(views, normalize)
    return lightly_dino_views(views, recipe.method_keys(config.train.epochs), normalize)


# --------------------------------------------------------------- lightly's loops


class LightlySchedule(NamedTuple):
    steps_per_epoch: int
    schedule_steps: int  # the cosine's length: train.epochs, as ours
    total_steps: int  # where the loop ends: the schedule, or a step cap


def _lightly_start(config, num_workers: int | None):
    """The device, the loader's workers (every core unless given, as lightly's examples),
    the pretraining split, its normalisation and the schedule's lengths."""
    device = torch.device(resolve_accelerator(config.train.device))
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    train_set = load_split(config, "pretrain", config.data.subset)
    # Normalised with the dataset's statistics, as the kNN's eval transform is (lightly
    # defaults to ImageNet's).
    normalize = {"mean": list(train_set.mean), "std": list(train_set.std)}
    return device, workers, train_set, normalize


def _lightly_schedule(config, train_set, max_steps: int | None) -> LightlySchedule:
    train = config.train
    steps_per_epoch = len(train_set) // train.batch_size  # drop_last, as the loader
    if steps_per_epoch == 0:
        raise MixmaskError(f"the training set has {len(train_set)} images, fewer than one "
                           f"batch (train.batch_size={train.batch_size}).")
    schedule_steps = train.epochs * steps_per_epoch  # the schedule ours follows
    cap = train.max_steps if max_steps is None else max_steps
    return LightlySchedule(steps_per_epoch, schedule_steps,
                           min(schedule_steps, cap) if cap else schedule_steps)


def _train_lightly(pipeline: str, config, schedule: LightlySchedule, views: Dataset, *,
                   started: float, backbone: torch.nn.Module, parameters, training_step,
                   before_update=None, budget_s: float, eval_data, workers: int,
                   device: torch.device) -> dict[str, Any]:
    """lightly's example loop around a method's ``training_step(views, step, epoch) ->
    loss``: SGD (train.lr / momentum / weight_decay) with lightly's cosine schedule,
    stepped per step as our engine's, until ``budget_s`` seconds after ``started``, the
    schedule's end or its cap; ``before_update(epoch)`` runs between backward and the
    optimizer step (DINO's frozen last layer). The backbone's weights at every epoch's
    end (copied off the clock) and at the end get the kNN. Returns the table row."""
    from lightly.utils.scheduler import CosineWarmupScheduler

    train = config.train
    # Persistent workers, as our loader has: no worker restart at every epoch.
    loader = DataLoader(views, batch_size=train.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(train.seed))
    optimizer = torch.optim.SGD(parameters, lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay)
    steps_per_epoch, total_steps = schedule.steps_per_epoch, schedule.total_steps
    # Stepped per step, as our engine's; ends at 0 like ours (lightly's default: 0.001).
    scheduler = CosineWarmupScheduler(optimizer, int(train.warmup_epochs * steps_per_epoch),
                                      schedule.schedule_steps, end_value=0.0)
    setup_s = time.perf_counter() - started
    step, loss, snapshots, paused = 0, torch.tensor(float("nan")), [], 0.0
    while step < total_steps and time.perf_counter() - started < budget_s:
        for batch_views, _ in loader:
            epoch = step // steps_per_epoch
            loss = training_step(batch_views, step, epoch)
            loss.backward()
            if before_update is not None:
                before_update(epoch)
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
    return _row(pipeline, steps=step, batch_size=train.batch_size,
                steps_per_epoch=steps_per_epoch, wall_s=wall_s, train_s=wall_s - setup_s,
                knn=knn, knn_s=time.perf_counter() - knn_started, loss=float(loss.detach()),
                workers=workers, precision="32", curve=curve)


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
    from lightly.utils.scheduler import cosine_schedule

    started = time.perf_counter()
    train, params = config.train, config.method.mocov2
    device, workers, train_set, normalize = _lightly_start(config, num_workers)
    # lightly's CIFAR-10 benchmark (docs/source/getting_started/benchmarks/
    # cifar10_benchmark.py) turns the Gaussian blur off at 32 px, where it destroys most
    # of the image; the rest of MoCoV2Transform's defaults (crop scale 0.2-1, jitter
    # 0.4/0.4/0.4/0.1 with p=0.8, grayscale 0.2, flip 0.5) are then our "cifar" preset.
    transform = MoCoV2Transform(input_size=config.data.image_size, gaussian_blur=0.0,
                                normalize=normalize)
    schedule = _lightly_schedule(config, train_set, max_steps)
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

    def query_and_key(query_view, key_view):
        query = projection_head(backbone(query_view.to(device, non_blocking=True)))
        with torch.no_grad():
            key = projection_head_momentum(backbone_momentum(key_view.to(device,
                                                                         non_blocking=True)))
        return query, key

    def training_step(views, step: int, epoch: int):
        view_0, view_1 = views
        momentum = (params.momentum if params.momentum_schedule == "constant" else
                    cosine_schedule(step, schedule.total_steps, params.momentum,
                                    params.momentum_end))
        update_momentum(backbone, backbone_momentum, m=momentum)
        update_momentum(projection_head, projection_head_momentum, m=momentum)
        loss = criterion(*query_and_key(view_0, view_1))
        if params.symmetric:
            other = criterion(*query_and_key(view_1, view_0))
            loss = loss + other if params.symmetric_reduction == "sum" else (loss + other) / 2
        return loss

    return _train_lightly(
        PIPELINES["lightly"], config, schedule, LightlyViews(train_set, transform),
        started=started, backbone=backbone,
        parameters=[*backbone.parameters(), *projection_head.parameters()],
        training_step=training_step, budget_s=budget_s, eval_data=eval_data,
        workers=workers, device=device)


def lightly_simclr(config, *, budget_s: float, max_steps: int | None = None, eval_data=None,
                   num_workers: int | None = None, recipe: PeerRecipe | None = None
                   ) -> dict[str, Any]:
    """lightly's SimCLR (examples/pytorch/simclr.py: SimCLRTransform, SimCLRProjectionHead,
    NTXentLoss over the batch's 2N views, one network for both views) on our backbone
    module, as :func:`lightly_moco_v2` runs MoCo v2: ``config`` gives the data, budget and
    SGD, ``recipe`` (default ``PEER_RECIPES["simclr"]``) the head and temperature, our
    views the transform's arguments (:func:`lightly_simclr_views`)."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    recipe = recipe or PEER_RECIPES["simclr"]
    keys = recipe.method_keys(config.train.epochs)
    started = time.perf_counter()
    device, workers, train_set, normalize = _lightly_start(config, num_workers)
    transform = SimCLRTransform(**peer_views(config, recipe, normalize)[0])
    schedule = _lightly_schedule(config, train_set, max_steps)
    torch.manual_seed(config.train.seed)
    backbone, feature_dim = build_backbone(config.model, config.data.image_size)
    # lightly's head: Linear-BN-ReLU, then Linear (no bias) and BN on the output, as
    # SimCLR's reference and ours (method.simclr.output_batch_norm); lightly's output BN
    # also learns a shift, which the reference's (center=False) and ours do not.
    projection_head = SimCLRProjectionHead(feature_dim, keys["proj_hidden_dim"],
                                           keys["proj_output_dim"],
                                           num_layers=keys["proj_layers"])
    for module in (backbone, projection_head):
        module.to(device).train()
    criterion = NTXentLoss(temperature=keys["temperature"])
    # NTXentLoss is the mean over the 2N anchors, i.e. the mean of the two directions;
    # "sum" (SimCLR's reference) is twice that.
    directions = 2.0 if keys["symmetric_reduction"] == "sum" else 1.0

    def training_step(views, step: int, epoch: int):
        view_0, view_1 = (view.to(device, non_blocking=True) for view in views)
        z0 = projection_head(backbone(view_0))
        z1 = projection_head(backbone(view_1))
        return directions * criterion(z0, z1)

    return _train_lightly(
        f"lightly {recipe.label}", config, schedule, LightlyViews(train_set, transform),
        started=started, backbone=backbone,
        parameters=[*backbone.parameters(), *projection_head.parameters()],
        training_step=training_step, budget_s=budget_s, eval_data=eval_data,
        workers=workers, device=device)


def _lightly_mlp(feature_dim: int, keys: dict[str, Any]):
    """lightly's MLP blocks for a DINO head of ``proj_layers`` Linear layers (GELU, and BN
    when ``use_bn_in_head``, between them), as ours builds it (models/heads.py)."""
    from lightly.models.modules.heads import ProjectionHead
    from torch import nn

    hidden, widths = keys["proj_hidden_dim"], [feature_dim]
    widths += [hidden] * (keys["proj_layers"] - 1)
    blocks = [(width, hidden, nn.BatchNorm1d(hidden) if keys["use_bn_in_head"] else None,
               nn.GELU()) for width in widths[:-1]]
    blocks.append((widths[-1], keys["bottleneck_dim"], None, None))
    return ProjectionHead(blocks).layers


def lightly_dino(config, *, budget_s: float, max_steps: int | None = None, eval_data=None,
                 num_workers: int | None = None, recipe: PeerRecipe | None = None
                 ) -> dict[str, Any]:
    """lightly's DINO (examples/pytorch/dino.py: DINOTransform, DINOProjectionHead with
    its weight-normalised last layer frozen for ``freeze_last_layer_epochs``, DINOLoss
    with the teacher temperature's per-epoch warm-up and centering, update_momentum on a
    cosine_schedule) on our backbone module, as :func:`lightly_moco_v2` runs MoCo v2:
    ``config`` gives the data, budget and SGD, ``recipe`` (default
    ``PEER_RECIPES["dino"]``) the heads, temperatures, momentum and crops, our views the
    transform's arguments (:func:`lightly_dino_views`). The kNN measures the student's
    backbone, as for our run (its checkpoint's ``backbone``)."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    recipe = recipe or PEER_RECIPES["dino"]
    keys = recipe.method_keys(config.train.epochs)
    started = time.perf_counter()
    device, workers, train_set, normalize = _lightly_start(config, num_workers)
    transform = DINOTransform(**peer_views(config, recipe, normalize)[0])
    schedule = _lightly_schedule(config, train_set, max_steps)
    torch.manual_seed(config.train.seed)
    student_backbone, feature_dim = build_backbone(config.model, config.data.image_size)

    def head(**freezing) -> DINOProjectionHead:
        built = DINOProjectionHead(feature_dim, keys["proj_hidden_dim"], keys["bottleneck_dim"],
                                   keys["num_prototypes"], batch_norm=keys["use_bn_in_head"],
                                   norm_last_layer=keys["norm_last_layer"], **freezing)
        if keys["proj_layers"] != 3:
            # DINOProjectionHead's MLP has 3 layers; lightly's CIFAR-10 benchmark swaps in a
            # 2-layer one the same way (head.layers = ProjectionHead(...)). Re-initialised
            # as the head initialises its own (trunc_normal 0.02), as ours is.
            built.layers = _lightly_mlp(feature_dim, keys)
            built.layers.apply(built._init_weights)
        return built

    student_head = head(freeze_last_layer=keys["freeze_last_layer_epochs"])
    teacher_backbone = copy.deepcopy(student_backbone)
    # The teacher starts as the student (DINO's main_dino.py loads the student's weights;
    # lightly's example builds a second head); a weight-normalised layer cannot be
    # deep-copied, so a second head takes the student head's weights.
    teacher_head = head()
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    for module in (student_backbone, student_head, teacher_backbone, teacher_head):
        module.to(device).train()
    criterion = DINOLoss(output_dim=keys["num_prototypes"],
                         warmup_teacher_temp=keys["warmup_teacher_temperature"],
                         teacher_temp=keys["teacher_temperature"],
                         warmup_teacher_temp_epochs=keys["warmup_teacher_temperature_epochs"],
                         student_temp=keys["student_temperature"],
                         center_momentum=keys["center_momentum"]).to(device)

    def training_step(views, step: int, epoch: int):
        # Per step, as lightly's DINO benchmark and our engine (its example: per epoch).
        momentum = cosine_schedule(step, schedule.total_steps, keys["momentum"],
                                   keys["momentum_end"])
        update_momentum(student_backbone, teacher_backbone, m=momentum)
        update_momentum(student_head, teacher_head, m=momentum)
        views = [view.to(device, non_blocking=True) for view in views]
        # One forward per view, as lightly's example (its benchmark and DINO's reference
        # concatenate the global views, so BN pools them); the teacher sees the global ones.
        teacher_out = [teacher_head(teacher_backbone(view)) for view in views[:2]]
        student_out = [student_head(student_backbone(view)) for view in views]
        return criterion(teacher_out, student_out, epoch=epoch)

    # The warm-up and the frozen prototypes count epochs of the schedule (step //
    # steps_per_epoch); ours counts progress x train.epochs, the same epochs unless
    # train.max_steps cuts the schedule short (the tests' tiny runs).
    def before_update(epoch: int) -> None:
        student_head.cancel_last_layer_gradients(current_epoch=epoch)

    return _train_lightly(
        f"lightly {recipe.label}", config, schedule, LightlyViews(train_set, transform),
        started=started, backbone=student_backbone,
        parameters=[*student_backbone.parameters(), *student_head.parameters()],
        training_step=training_step, before_update=before_update, budget_s=budget_s,
        eval_data=eval_data, workers=workers, device=device)


LIGHTLY_PIPELINES = {"mocov2": lightly_moco_v2, "simclr": lightly_simclr, "dino": lightly_dino}


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


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def peer_configs(method: str, *, scale: str, overrides: list[str], seed: int, run_root: Path,
                 chosen: list[str]) -> dict[str, Any]:
    """Each pipeline's resolved config (row name -> config). MoCo v2: the quickstart for
    all three. SimCLR / DINO: the method's recipe (``PEER_RECIPES``) over the quickstart,
    its ``shared`` keys in both; lightly's config gives its loop train.*, data.* and
    model.* (its method section is unused); ours (loaded where chosen) also gets the
    method's keys, and a command line that changes one of them is refused."""
    common = [*SCALES[scale], *PEER_TRAINING_ONLY, *overrides, f"train.seed={seed}",
              "train.progress_bar=false"]
    if method == "mocov2":
        return {
            "lightly MoCo v2": load_config(CONFIG, [*common, "method.masking=none",
                                                    f"out_dir={run_root / 'lightly'}"]),
            "mixmask MoCo v2": load_config(CONFIG, [*common, "method.masking=none",
                                                    f"out_dir={run_root / 'mocov2'}"]),
            "mixmask MixMask": load_config(CONFIG, [*common, f"out_dir={run_root / 'mixmask'}"]),
        }
    recipe = PEER_RECIPES[method]
    lightly_name, ours_name = PEER_PIPELINES[method].values()
    shared = [*SCALES[scale], *PEER_TRAINING_ONLY, *recipe.shared_overrides()]
    given = [*overrides, f"train.seed={seed}", "train.progress_bar=false"]
    lightly = load_config(CONFIG, [*shared, "method.masking=none", *given,
                                   f"out_dir={run_root / 'lightly'}"])
    configs = {lightly_name: lightly}
    if ours_name not in chosen:
        return configs
    # The method's keys before the command line's, so that one changing them shows below.
    ours = load_config(CONFIG, [*shared, *recipe.method_overrides(lightly.train.epochs),
                                *given, f"out_dir={run_root / recipe.name}"])
    if ours.method.name != recipe.name:
        raise MixmaskError(f"--peer-method {method} sets method.name; drop the method.name "
                           "override.")
    for key, value in recipe.method_keys(lightly.train.epochs).items():
        if _plain(getattr(ours.method.params, key)) != _plain(value):
            raise MixmaskError(
                f"method.{recipe.name}.{key}={getattr(ours.method.params, key)} would change "
                f"mixmask's {recipe.label} only; both pipelines take it from "
                f"PEER_RECIPES['{recipe.name}'] in benchmarks/time_to_accuracy.py: change it "
                "there.")
    configs[ours_name] = ours
    return configs


def compare_with_lightly(args) -> None:
    try:
        import lightly
    except ImportError:
        print(LIGHTLY_MISSING, file=sys.stderr)
        raise SystemExit(2) from None
    method = args.peer_method
    pipelines = PEER_PIPELINES[method]
    keys = args.pipelines or list(pipelines)
    strangers = [key for key in keys if key not in pipelines]
    if strangers:
        print(f"--pipelines {' '.join(strangers)}: not a pipeline of --peer-method {method}; "
              f"choose from {', '.join(pipelines)}.", file=sys.stderr)
        raise SystemExit(2)
    budget = PEER_BUDGET_S if args.budget_s is None else args.budget_s
    out = Path(args.out)
    run_root = out / f"{peer_stem(method)}{args.seed}"
    chosen = [pipelines[key] for key in keys]
    lightly_name, *ours_names = pipelines.values()
    recipe = PEER_RECIPES.get(method)
    try:
        configs = peer_configs(method, scale=args.scale, overrides=args.overrides,
                               seed=args.seed, run_root=run_root, chosen=chosen)
        reference = configs[lightly_name]
        if method == "mocov2" and (reference.method.name != "mocov2"
                                   or reference.train.optimizer != "sgd"):
            raise MixmaskError("--peer lightly compares MoCo v2 with SGD (the quickstart's "
                               "recipe); drop the method.name / train.optimizer override.")
        if reference.train.optimizer != "sgd":
            raise MixmaskError("--peer lightly's loops update with torch.optim.SGD, as "
                               "lightly's examples do; drop the train.optimizer override.")
        transform_args, differences = (peer_views(reference, recipe) if recipe is not None
                                       else ({}, []))
        # Decoded (and unpacked) once here, so no pipeline's budget pays the first decode.
        load_split(reference, "pretrain", reference.data.subset)
        eval_data = _eval_data(reference)
        if differences:
            print(f"lightly's {recipe.label} views differ from ours in:", flush=True)
            for difference in differences:
                print(f"  - {difference}", flush=True)
        # lightly first: our engine sets process-wide malloc options (mixmask.train.runtime) that
        # would otherwise speed up the lightly loop too.
        rows = ([LIGHTLY_PIPELINES[method](configs[lightly_name], budget_s=budget,
                                           eval_data=eval_data)]
                if lightly_name in chosen else [])
        for pipeline in ours_names:
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
    comparison = peer_comparison(rows, lightly_name, ours_names[0])
    if comparison is not None:
        speedup = comparison["speedup"]
        print(f"kNN both reach {comparison['target_knn']:.2f}: lightly after "
              f"{comparison['lightly_s']:.0f} s of training, ours ({comparison['ours_precision']})"
              f" after {comparison['ours_s']:.0f} s"
              + (f" ({speedup:.2f}x)" if speedup else "") + "; lightly's kNN after ours' "
              f"{comparison['ours_train_s']:.0f} s: {comparison['lightly_knn_at_ours_time']}")
    if recipe is None:
        lightly_transform = "MoCoV2Transform(input_size, gaussian_blur=0.0, dataset mean/std)"
    else:
        shown = ", ".join(f"{key}={value!r}" for key, value in transform_args.items()
                          if key != "normalize")
        lightly_transform = (f"{'SimCLRTransform' if method == 'simclr' else 'DINOTransform'}"
                             f"({shown}, normalize=dataset mean/std)")
    settings = {
        "budget_s": budget, "config": str(CONFIG), "scale": args.scale,
        "overrides": args.overrides, "seed": args.seed, "pipelines": chosen,
        "knn_features": "fp32 for every pipeline (the same kNN, whatever each trained in)",
        "budget_counts": "data split, model, loader and training; kNN afterwards",
        "knn": {"k": reference.monitor.knn_k,
                "temperature": reference.monitor.knn_temperature,
                "bank_images": len(eval_data.train), "test_images": len(eval_data.test)},
        "lightly_transform": lightly_transform,
        "resolved_config": {name: config.to_dict() for name, config in configs.items()},
    }
    if recipe is not None:
        settings["recipe"] = {"shared": recipe.shared,
                              "method": recipe.method_keys(reference.train.epochs)}
        settings["view_differences"] = differences
    result = {
        "peer": "lightly", "peer_method": method,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(resolve_accelerator(reference.train.device)),
                    "versions": {**versions(), "lightly": lightly.__version__}},
        "settings": settings,
        "rows": rows, "comparison": comparison,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{peer_stem(method)}{args.seed}.json"
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
    parser.add_argument("--recipe", default=None,
                        help="a recipe instead of the quickstart (not with --peer), e.g. "
                             "cifar10/simclr_r18 with --scale gpu train.epochs=500")
    parser.add_argument("--out", default="runs/benchmarks/time_to_accuracy")
    parser.add_argument("--peer", choices=["lightly"], default=None,
                        help="compare with another library's MoCo v2, SimCLR or DINO (see "
                             "above)")
    parser.add_argument("--peer-method", choices=PEER_METHODS, default="mocov2",
                        help="--peer: the method compared (mocov2: lightly / ours / MixMask; "
                             "simclr, dino: lightly / ours on PEER_RECIPES)")
    every_pipeline = list(dict.fromkeys(key for names in PEER_PIPELINES.values()
                                        for key in names))
    parser.add_argument("--pipelines", nargs="+", choices=every_pipeline, default=None,
                        help="--peer: which of the method's pipelines run (default: all; "
                             "mocov2: lightly mocov2 mixmask; simclr: lightly simclr; dino: "
                             "lightly dino)")
    parser.add_argument("--summarise", action="store_true",
                        help="--peer: print the table over OUT's lightly_seed*.json "
                             "(--peer-method M: lightly_M_seed*.json); run nothing")
    args = parser.parse_intermixed_args()  # overrides before and after the flags
    if args.peer == "lightly" and args.summarise:
        print(summarise_peer(Path(args.out), args.peer_method))
        return
    if args.peer == "lightly":
        compare_with_lightly(args)
        return

    out = Path(args.out)
    recipe = args.recipe or CONFIG
    name = args.scale if args.recipe is None else f"{args.scale}_{args.recipe.replace('/', '_')}"
    run_dir = out / f"{name}_seed{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark starts afresh
    overrides = [*SCALES[args.scale], "train.plots=curves", "monitor.knn=true",
                 "monitor.online_probe=true",
                 f"monitor.knn_every={args.every}", *args.overrides, f"train.seed={args.seed}",
                 "train.progress_bar=false", f"out_dir={run_dir}"]
    config = load_config(recipe, overrides)
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
    result = {"scale": args.scale, "overrides": args.overrides, "config": str(recipe),
              "budget_s": budget, "stopped": stopped, "setup_s": setup_s,
              "command_wall_s": command_wall,
              "device": summary["device"], "versions": summary["versions"],
              "seconds_per_epoch": (summary["wall_time_s"] / len(epochs)) if epochs else None,
              "reached": reached, "epochs": epochs, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
