"""One training step, MoCo v2 and MoCo v2 + MixMask: ours vs lightly's equivalent; and
beside them the masked-image-modeling recipes (MAE, PixMIM, A2MIM ViT-Tiny and ResNet-18).

Measures images/s and peak memory of ONE pretraining step (forward, loss, backward,
optimizer step, EMA and queue / memory-bank update) on pre-made device tensors: no data
loading, no augmentation. Rows:

* ``ours mocov2``: ``build_method`` with ``method.name=mocov2 method.masking=none``, the
  engine's step function ``mixmask.train.step.training_step`` (``method(batch, generator,
  progress)`` -> loss; backward; ``build_optimizer("sgd", ..., fused=True)`` step;
  zero_grad; ``method.after_optimizer_step``).
  ``--online-forward joint`` and ``--foreach`` select ``method.online_forward=joint`` and
  the foreach SGD update; ``--compile`` is ``train.compile=true`` (inductor).
* ``ours mixmask``: the same with ``method.masking=mixmask`` (grid 8, ratio 0.5, block
  mask, one mask per batch, partner = the reversed batch).
* ``lightly mocov2``: lightly's MoCo example (examples/pytorch/moco.py) on lightly's parts:
  ``MoCoProjectionHead``, ``NTXentLoss(memory_bank_size=(queue, dim))``,
  ``deactivate_requires_grad`` and ``update_momentum`` (momentum update, then query and key
  forward, loss, backward, ``optimizer.step()``, ``optimizer.zero_grad()``), with
  ``torch.optim.SGD(model.parameters(), ...)`` as that example builds it.
* ``lightly mixmask``: the same plus a MixMask branch on lightly's parts: the query view is
  mixed with the reversed batch by ``mixmask.ops.mixing.sample_mixmask`` (both libraries'
  rows draw the vectorised ``exact_count`` block masks on the device,
  ``method.mask.generator=exact_count``, so neither row pays the host-side BEiT loop and
  a CUDA step stays free of host syncs), one extra online
  forward gives q_mix, and ``loss = L(q, k) + lam L(q_mix, k) + (1 - lam) L(flip(q_mix), k)``
  with lightly's NTXentLoss as L (one mask per batch, so lam is one number).
* ``ours mae | pixmim | a2mim_vit | a2mim_r18 | siameseim_vit | siameseim_r18``
  (``--recipes``): the CIFAR-10 recipes ``configs/cifar10/{mae,pixmim,a2mim,siameseim}_
  vit_tiny.yaml``, ``a2mim_r18.yaml`` and ``siameseim_r18.yaml`` as they are (AdamW, their
  decoders, predictors and losses; PixMIM's low-pass FFTs included), at ``--batch``,
  ``--image-size`` and (ResNet) ``--width``; MAE, PixMIM and A2MIM see the first pre-made
  view only (one view per image, as they train), SiameseIM both (full-image crops). No
  peer rows (lightly's MAE uses its own ViT).

  lightly's NTXentLoss enqueues its keys into the memory bank on every call whose query
  requires grad (``memory_bank.forward(out1, update=out0.requires_grad)``), so three calls
  would put k into the bank three times, and the later calls would see k among their own
  negatives. Here the two mix terms go through a second NTXentLoss whose ``memory_bank`` is a
  read-only view of the first one's bank (same tensor, update forced off) and are evaluated
  first; the clean term L(q, k), called last through the original loss, is the only call
  that enqueues. So every term sees the same pre-step negatives and each key enters the bank
  once per step, as in ours (``MoCoV2.after_step`` enqueues once). With the same seed, both
  libraries start from the same weights and queue, and their losses agree step by step
  (tests/test_benchmarks_train_step.py).

Both libraries run the SAME backbone, built by ``mixmask.models.build_resnet``:
torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), width
``--width``; the same projector (Linear 512->2048, ReLU, Linear 2048->128, with biases;
mixmask's defaults and lightly's ``MoCoProjectionHead(512, 2048, 128)``), queue / memory
bank 4096 x 128, temperature 0.1, EMA momentum 0.99, SGD (lr 0.06, momentum 0.9, weight
decay 5e-4), the same input tensors, batch and precision (``--precision``, one or more of
``auto 32 bf16``, each row measured at each: ``auto`` is mixmask's
``train.precision=auto``, bf16 autocast around the forward and loss on a GPU or a CPU that
computes bf16 natively, fp32 elsewhere; with more than one, the row names end in the
precision), and the same memory format (``--channels-last`` converts models and inputs of
every row). Asymmetric loss by default, as lightly's example (one query view, one key
view); ``--symmetric`` makes both sides symmetric (ours: ``method.mocov2.symmetric=true``;
lightly: both directions, the loss averaged over them; the two clean terms go through one
NTXentLoss call on the concatenated queries and keys, so both keys enter the bank once and
neither direction sees the other's keys as negatives, as in ours; lightly's CIFAR-10
benchmark instead calls the loss once per direction, and its second call then sees the
first one's keys in the bank).

What differs is each library's own code: ours uses a fused SGD, a float32 loss on a ring
buffer queue with no host read, and copies BN buffers in the EMA; lightly's example keeps
torch's default SGD implementation, computes the loss in the autocast dtype, and its bank
update reads the pointer on the host once per enqueue.

Allocator (CPU): by default (``--malloc keep``) the whole process keeps freed memory for
the next step, as the engine does on the CPU (``train.keep_cpu_memory``,
:mod:`mixmask.train.runtime`); every row, lightly's included, runs under it. ``--malloc system``
keeps glibc's defaults, under which each step faults its activation memory back in from
the OS: the ``faults/step`` column counts the process's minor page faults per timed step.

Timing: every row is built and warmed up (``--warmup`` steps), then the rows' timed steps
are interleaved (step i of every row, then step i + 1, ...), so background load drifts hit
every row alike. Each step is timed alone (synchronised on CUDA); images/s is
batch / median step time. ``--burst`` adds, per row, ``--steps`` consecutive steps timed with
one synchronisation at the end (``burst images/s``): on a GPU this lets the host run ahead
of the device across steps, as in training, so a step without host-device syncs gains
there (ours has none; lightly's bank update reads its pointer on the host).

Peak memory = the row's resident state between steps (bytes of its parameters, gradients
kept between steps, buffers such as BN statistics and the queue, and optimizer state,
counted tensor by tensor after warm-up) + the increase within one step, measured on an
extra untimed step per row after the timed ones: on CUDA ``torch.cuda.max_memory_allocated``
above the memory allocated when the step starts; on CPU the process's peak resident set
size (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step) above its
``VmRSS`` then, after returning freed heap memory to the OS: an approximation, n/a where
/proc does not allow it.

MixMask's cost over MoCo v2 (step-time ratio of the same library) is compared with the
theoretical 7/4 = 1.75: counting a forward as 1 unit and a backward as 2, MoCo v2 is one
online pass (3) plus one target pass (1) = 4 units, MixMask adds a second online pass on the
mixed batch (3) = 7 units. Loss terms, mask sampling and mixing add a little; the
optimizer step and EMA update cost the same in both and pull the measured ratio below 1.75.

CPU scale (default: batch 64, 5 warm-up and 10 timed steps per row; a few minutes on a
2-core CPU)::

    python benchmarks/train_step.py --channels-last

GPU scale (batch 512, 10 warm-up and 50 timed steps, bf16 autocast)::

    python benchmarks/train_step.py --gpu --channels-last

lightly is no dependency of mixmask: ``pip install lightly`` in the benchmark environment to
get its rows (they are skipped with a note otherwise). Prints a table and writes
``OUT/results.json`` with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

import mixmask
from mixmask.config import Config, load_config
from mixmask.data.batch import Batch
from mixmask.data.datasets import DATASET_STATS
from mixmask.methods import PixelStats, build_method
from mixmask.models import build_resnet
from mixmask.ops.mixing import sample_mixmask
from mixmask.ops.optim import build_optimizer
from mixmask.ops.tensors import mixed_precision
from mixmask.train.fabric import compile_networks, resolve_precision
from mixmask.train.runtime import keep_freed_cpu_memory
from mixmask.train.step import training_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment import machine_info, resolve_device, synchronize, write_result  # noqa: E402
from stopping import measure_until_stopped  # noqa: E402

LIBRARIES = ("ours", "lightly")
MASKINGS = ("none", "mixmask")
ROW_NAMES = {"none": "mocov2", "mixmask": "mixmask"}
# Masked-image-modeling rows (ours only): each CIFAR-10 recipe as it is, at --batch and
# --image-size (ResNets at --width), as many of the pre-made views as the method takes (one;
# SiameseIM two), the recipe's optimizer (AdamW), the engine's step function.
RECIPES = {"mae": "mae_vit_tiny.yaml", "pixmim": "pixmim_vit_tiny.yaml",
           "a2mim_vit": "a2mim_vit_tiny.yaml", "a2mim_r18": "a2mim_r18.yaml",
           "siameseim_vit": "siameseim_vit_tiny.yaml", "siameseim_r18": "siameseim_r18.yaml",
           # The architectures the papers claim (issue 24): ConvMAE, long-sequence MAE
           # (256 tokens), A2MIM and MixMask MoCo v2 on ConvNeXt-Atto.
           "convmae": "convmae_tiny.yaml", "lsmae": "lsmae_vit_tiny.yaml",
           "a2mim_convnext": "a2mim_convnext.yaml",
           "mixmask_convnext": "mixmask_mocov2_convnext.yaml"}
ROW_NAMES.update({name: name for name in RECIPES})
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cifar10"
THEORY_MIX_COST = 7 / 4
MIB = 2**20


def import_lightly():
    try:
        import lightly
        import lightly.loss
        import lightly.models.modules
        import lightly.models.utils  # noqa: F401
    except ImportError:
        return None
    return lightly


def ours_config(masking: str, args: argparse.Namespace) -> Config:
    """mixmask's config of a row: the defaults (MoCo v2 CIFAR recipe) with these settings."""
    return load_config(None, [
        "method.name=mocov2", f"method.masking={masking}",
        "model.backbone=resnet18", "model.stem=cifar", f"model.width={args.width}",
        f"data.image_size={args.image_size}", f"method.mocov2.queue_size={args.queue}",
        "method.mocov2.proj_hidden_dim=2048", "method.mocov2.proj_output_dim=128",
        f"method.mocov2.symmetric={str(args.symmetric).lower()}",
        # lightly's symmetric row averages the two directions.
        "method.mocov2.symmetric_reduction=mean", "method.mask.generator=exact_count",
        f"method.online_forward={args.online_forward}",
        "method.mocov2.momentum_schedule=constant", "train.optimizer=sgd",
        f"train.compile={str(args.compile).lower()}",
        "train.momentum=0.9", f"train.batch_size={args.batch}",
    ])


# -- memory ---------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_cpu_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS, so RSS deltas see new allocations
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Resident bytes now, and the peak increase over a call (CUDA allocator or CPU RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = device.type == "cuda" or self._can_reset_rss_peak()
        step = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                "CPU peak RSS (VmHWM after /proc/self/clear_refs), approximate"
                if self.available else "n/a on this CPU")
        self.method = f"state: tensor bytes; step increase: {step}"

    @staticmethod
    def _can_reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            return False
        return _proc_status_kib("VmHWM") is not None and _proc_status_kib("VmRSS") is not None

    def peak_increase(self, fn: Callable[[], object]) -> int | None:
        """Peak bytes above the memory held when fn started, over one call (untimed: on CPU
        freed heap memory is first returned to the OS, which the call then faults back)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        if not self.available:
            fn()
            return None
        _release_cpu_memory()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        before = _proc_status_kib("VmRSS")
        fn()
        return max(0, _proc_status_kib("VmHWM") - before) * 1024


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_step(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds of one step, and the minor page faults the process took during it."""
    synchronize(device)
    faults = minor_faults()
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start, minor_faults() - faults


# -- rows -----------------------------------------------------------------------------------


class Row:
    """One benchmark row: its step, what it holds, and its measurements."""

    def __init__(self, library: str, masking: str, step: Callable[[], Tensor],
                 description: str, modules: dict[str, nn.Module],
                 optimizer: torch.optim.Optimizer):
        self.library, self.masking, self.description = library, masking, description
        self.step = step  # one training step; returns the loss, detached
        self.modules, self.optimizer = modules, optimizer
        self.step_seconds: list[float] = []
        self.step_faults: list[int] = []
        self.step_peak: int | None = None
        self.state_bytes: int | None = None
        self.burst_seconds: float | None = None
        self.precision = "32"  # resolved (32, bf16)
        self.precision_label = ""  # appended to the name when rows differ in precision

    @property
    def name(self) -> str:
        return f"{self.library} {ROW_NAMES[self.masking]}{self.precision_label}"


def build_ours(masking: str, views: tuple[Tensor, Tensor], device: torch.device,
               args: argparse.Namespace, precision: str = "32") -> Row:
    config = ours_config(masking, args)
    torch.manual_seed(args.seed)
    method = build_method(config).to(device)
    if args.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if args.compile:
        compile_networks(method, config)  # as the engine: the networks, in place
    train = config.train
    optimizer = build_optimizer(train.optimizer, method.parameter_groups(train.optimizer),
                                lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay,
                                fused=train.fused_optimizer and not args.foreach)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batch = Batch.from_views(*views)

    def step() -> Tensor:  # the engine's step function, without data loading, probe, logging
        output = training_step(method, optimizer, batch, generator, 0.0,
                               autocast=mixed_precision(device, precision))
        return output.loss.detach()

    return Row("ours", masking, step, f"mixmask MoCoV2 (masking={masking})",
               modules={"method": method}, optimizer=optimizer)


def build_recipe(recipe: str, views: tuple[Tensor, Tensor], device: torch.device,
                 args: argparse.Namespace, precision: str = "32") -> Row:
    """A MIM recipe's step (:data:`RECIPES`), built and stepped as the engine does."""
    config = load_config(CONFIGS / RECIPES[recipe], [
        f"data.image_size={args.image_size}", f"train.batch_size={args.batch}",
        f"model.width={args.width}", f"train.compile={str(args.compile).lower()}",
        "data.root=unused"])
    torch.manual_seed(args.seed)
    # CIFAR-10's statistics: PixMIM's faithful low-pass de-normalises with them.
    stats = PixelStats(*DATASET_STATS["cifar10"])
    method = build_method(config, stats).to(device)
    if args.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if args.compile:
        compile_networks(method, config)
    train = config.train
    optimizer = build_optimizer(train.optimizer, method.parameter_groups(train.optimizer),
                                lr=train.lr, momentum=train.momentum, betas=train.betas,
                                weight_decay=train.weight_decay,
                                fused=train.fused_optimizer and not args.foreach)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # One view for MAE / A2MIM; SiameseIM's two, with full-image crops and no flips.
    batch = Batch.from_views(*views[:method.num_views])

    def step() -> Tensor:
        output = training_step(method, optimizer, batch, generator, 0.0,
                               autocast=mixed_precision(device, precision))
        return output.loss.detach()

    return Row("ours", recipe, step, f"mixmask {config.method.name} "
               f"({config.model.backbone}, configs/cifar10/{RECIPES[recipe]})",
               modules={"method": method}, optimizer=optimizer)


class LightlyMoCo(nn.Module):
    """lightly's MoCo example model (examples/pytorch/moco.py) on a given backbone."""

    def __init__(self, lightly, backbone: nn.Module, feature_dim: int, hidden_dim: int,
                 output_dim: int):
        super().__init__()
        utils = lightly.models.utils
        self.backbone = backbone
        self.projection_head = lightly.models.modules.MoCoProjectionHead(
            feature_dim, hidden_dim, output_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> Tensor:
        query = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(query)

    def forward_momentum(self, x: Tensor) -> Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()


class ReadOnlyMemoryBank(nn.Module):
    """Another NTXentLoss's memory bank, with lightly's ``update`` argument forced off: the
    extra MixMask loss terms read the same negatives without enqueueing their keys again."""

    def __init__(self, bank: nn.Module):
        super().__init__()
        self.bank = bank

    def forward(self, output: Tensor, labels: Tensor | None = None, update: bool = False):
        return self.bank(output, labels, update=False)


def build_lightly(lightly, masking: str, views: tuple[Tensor, Tensor], device: torch.device,
                  args: argparse.Namespace, precision: str = "32") -> Row:
    config = ours_config(masking, args)  # the same hyper-parameters as ours' row
    moco, mask, train = config.method.mocov2, config.method.mask, config.train
    torch.manual_seed(args.seed)
    backbone, feature_dim = build_resnet("resnet18", stem="cifar", width=args.width)
    model = LightlyMoCo(lightly, backbone, feature_dim, moco.proj_hidden_dim,
                        moco.proj_output_dim)
    criterion = lightly.loss.NTXentLoss(temperature=moco.temperature,
                                        memory_bank_size=(args.queue, moco.proj_output_dim))
    mix_criterion = lightly.loss.NTXentLoss(temperature=moco.temperature)
    mix_criterion.memory_bank = ReadOnlyMemoryBank(criterion.memory_bank)
    model, criterion = model.to(device), criterion.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    update_momentum = lightly.models.utils.update_momentum
    directions = ((0, 1), (1, 0)) if args.symmetric else ((0, 1),)

    def forward_loss(x0: Tensor, x1: Tensor) -> Tensor:
        views = (x0, x1)
        loss = x0.new_zeros(())
        queries, keys = [], []
        for query_index, key_index in directions:
            x_query, x_key = views[query_index], views[key_index]
            query = model(x_query)
            key = model.forward_momentum(x_key)
            if masking == "mixmask":
                mix = sample_mixmask(x_query, grid_size=mask.grid_size,
                                     mask_ratio=mask.mask_ratio, mode=mask.mode,
                                     per_sample=False, generator=generator,
                                     block_generator=mask.generator)
                query_mix = model(mix.mixed_images)
                lam = mix.lam[0]  # one mask for the batch: one lambda
                # Read-only bank first; the clean term below enqueues the keys, once.
                loss = loss + lam * mix_criterion(query_mix, key)
                loss = loss + (1 - lam) * mix_criterion(query_mix.flip(0), key)
            queries.append(query)
            keys.append(key)
        # The clean term(s) last and in one call: the only call that enqueues, each key once
        # (one direction: lightly's example, criterion(query, key)).
        if len(directions) == 1:
            clean = criterion(queries[0], keys[0])
        else:
            clean = criterion(torch.cat(queries), torch.cat(keys))
        return (loss + len(directions) * clean) / len(directions)

    compute_loss = torch.compile(forward_loss) if args.compile else forward_loss
    x0, x1 = views

    def step() -> Tensor:  # lightly's example loop, on pre-made device tensors
        update_momentum(model.backbone, model.backbone_momentum, m=moco.momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=moco.momentum)
        with mixed_precision(device, precision):
            loss = compute_loss(x0, x1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    description = "lightly MoCo example" + (" + MixMask branch" if masking == "mixmask" else "")
    return Row("lightly", masking, step, description,
               modules={"model": model, "criterion": criterion}, optimizer=optimizer)


def state_bytes(row: Row) -> int:
    """Bytes held between steps: parameters, their gradients, buffers, optimizer state."""
    tensors: dict[tuple[int, int], int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            tensors[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()

    for module in row.modules.values():
        for param in module.parameters():
            add(param)
            add(param.grad)
        for buffer in module.buffers():
            add(buffer)
    for state in row.optimizer.state.values():
        for value in state.values():
            add(value)
    return sum(tensors.values())


# -- run ------------------------------------------------------------------------------------


def make_views(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, 3, args.image_size, args.image_size)
    views = []
    for _ in range(2):  # normalised-image-like values, made once, kept on the device
        view = torch.randn(shape, generator=generator).to(device)
        if args.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        views.append(view)
    return views[0], views[1]


def versions(lightly) -> dict:
    return {"mixmask": mixmask.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda,
            "lightly": getattr(lightly, "__version__", None) if lightly else None}


def summarise(row: Row, batch: int) -> dict:
    median = statistics.median(row.step_seconds)
    step_peak = row.step_peak
    peak = (row.state_bytes + step_peak
            if step_peak is not None and row.state_bytes is not None else None)
    return {"row": row.name, "library": row.library, "masking": row.masking,
            "precision": row.precision, "description": row.description, "batch": batch,
            "median_step_s": median, "images_per_s": batch / median,
            "step_seconds": row.step_seconds,
            "page_faults_per_step": statistics.median(row.step_faults),
            "state_mib": row.state_bytes / MIB if row.state_bytes is not None else None,
            "step_peak_mib": step_peak / MIB if step_peak is not None else None,
            "peak_mib": peak / MIB if peak is not None else None,
            "burst_images_per_s": (len(row.step_seconds) * batch / row.burst_seconds
                                   if row.burst_seconds else None)}


def add_ratios(results: list[dict]) -> None:
    by_key = {(r["library"], r["masking"], r["precision"]): r for r in results}
    for result in results:
        base = by_key.get((result["library"], "none", result["precision"]))
        # MixMask's and each MIM recipe's step time over MoCo v2's of the same library.
        result["mix_cost_vs_mocov2"] = (
            result["median_step_s"] / base["median_step_s"]
            if result["masking"] != "none" and base else None)
        peer = by_key.get(("lightly", result["masking"], result["precision"]))
        result["ours_vs_lightly"] = (
            result["images_per_s"] / peer["images_per_s"]
            if result["library"] == "ours" and peer else None)
        result["ours_vs_lightly_burst"] = (
            result["burst_images_per_s"] / peer["burst_images_per_s"]
            if result["library"] == "ours" and peer and result["burst_images_per_s"]
            else None)


def print_table(results: list[dict], memory_method: str) -> None:
    print(f"\n{'row':<28} {'precision':>9} {'batch':>5} {'images/s':>10} {'ms/step':>9} "
          f"{'state MiB':>10} {'peak MiB':>9} {'faults/step':>11} {'vs MoCo v2':>13} "
          f"{'ours/lightly':>13}"
          + (f" {'burst im/s':>10}" if any(r["burst_images_per_s"] for r in results) else ""))
    for r in results:
        peak = f"{r['peak_mib']:9,.0f}" if r["peak_mib"] is not None else f"{'n/a':>9}"
        cost = r["mix_cost_vs_mocov2"]
        cost_cell = f"{cost:12.2f}x" if cost is not None else f"{'-':>13}"
        ratio = r["ours_vs_lightly"]
        ratio_cell = f"{ratio:12.2f}x" if ratio is not None else f"{'-':>13}"
        print(f"{r['row']:<28} {r['precision']:>9} {r['batch']:>5} "
              f"{r['images_per_s']:10,.1f} "
              f"{1000 * r['median_step_s']:9.1f} {r['state_mib']:10,.0f} {peak} "
              f"{r['page_faults_per_step']:11,.0f} {cost_cell} "
              f"{ratio_cell}" + (f" {r['burst_images_per_s']:10,.1f}"
                                  if r["burst_images_per_s"] else ""))
    print(f"images/s: batch / median step time. vs MoCo v2: step-time ratio over MoCo v2 of "
          f"the same library (MixMask: theory {THEORY_MIX_COST:.2f}x; the MIM rows see one "
          f"view, not two).\nstate MiB: parameters, "
          f"gradients, buffers, optimizer state held between steps; peak MiB: state + the "
          f"increase within one step ({memory_method}).\nfaults/step: the process's minor "
          f"page faults per timed step (median): memory the OS maps in afresh.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU-scale defaults: batch 512, 10 warm-up and 50 timed steps")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (--gpu: 512)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (default 10; --gpu: 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per row first (default 5; --gpu: 10)")
    parser.add_argument("--precision", nargs="+", choices=["auto", "32", "bf16"],
                        default=["auto"],
                        help="every row at each (auto: train.precision=auto's choice here: "
                             "bf16 where the device computes it natively, else fp32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last models and inputs (every row)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile (inductor) ours: the networks, as train.compile=true; "
                             "lightly: its forward + loss function; rows that fail are skipped")
    parser.add_argument("--online-forward", choices=["separate", "joint"], default="separate",
                        help="ours: method.online_forward (joint: the clean and mixed queries "
                             "in one forward, BN statistics pooled)")
    parser.add_argument("--malloc", choices=["keep", "system"], default="keep",
                        help="CPU only, the whole process (every row): keep freed memory for "
                             "the next step, as the engine does (train.keep_cpu_memory), or "
                             "glibc's defaults")
    parser.add_argument("--foreach", action="store_true",
                        help="ours: the foreach SGD update instead of the fused one "
                             "(train.fused_optimizer=false)")
    parser.add_argument("--symmetric", action="store_true",
                        help="symmetric MoCo loss on both sides (default: asymmetric, as "
                             "lightly's MoCo example)")
    parser.add_argument("--burst", action="store_true",
                        help="also time --steps consecutive steps per row, synchronised only "
                             "at the end (no per-step sync)")
    parser.add_argument("--width", type=float, default=1.0,
                        help="ResNet-18 width multiplier (ConvNeXt and ConvViT rows: 1 only)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096, help="queue / memory bank size")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--masking", nargs="+", choices=MASKINGS, default=list(MASKINGS))
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=list(RECIPES),
                        help="MIM rows of ours (default: all; none with an empty list)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/benchmarks/train_step")
    args = parser.parse_args(argv)
    args.batch = args.batch or (512 if args.gpu else 64)
    args.steps = args.steps or (50 if args.gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.gpu else 5)
    if args.batch < 2 or args.batch % 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch even and >= 2 (MixMask pairs the reversed batch), --steps >= 1, "
                     "--warmup >= 0")
    # Each requested precision -> (resolved, row-name label); one precision: no label.
    accelerator = resolve_device(args.device).type
    args.precisions = {}
    for requested in args.precision:
        resolved = resolve_precision(requested, accelerator)[0]
        args.precisions.setdefault(
            requested, (resolved, f" {requested}" + (f" ({resolved})" if requested == "auto"
                                                      else "")))
    if len(args.precisions) == 1:
        args.precisions = {key: (resolved, "") for key, (resolved, _) in
                           args.precisions.items()}
    return args


def measure(rows: list[Row], notes: list[str], args, views, device, lightly,
            meter: MemoryMeter) -> None:
    """Build each row, then time the rows' steps interleaved (and, with --burst, back to
    back) and measure each step's memory; ``rows`` fills as it goes, so a stop keeps what
    was measured."""
    for precision, label in args.precisions.values():
        measure_precision(rows, notes, args, views, device, lightly, precision, label)
    for _ in range(args.steps):  # interleaved: step i of every row, then step i + 1
        for row in rows:
            seconds, faults = time_step(row.step, device)
            row.step_seconds.append(seconds)
            row.step_faults.append(faults)

    if args.burst:
        for row in rows:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                row.step()
            synchronize(device)
            row.burst_seconds = time.perf_counter() - start
    for row in rows:  # one more, untimed step per row for its memory
        row.step_peak = meter.peak_increase(row.step)


def measure_precision(rows: list[Row], notes: list[str], args, views, device, lightly,
                      precision: str, label: str) -> None:
    """Build (and warm up) every row at one precision, appending them to ``rows``."""
    for library in args.libraries:
        if library == "lightly" and lightly is None:
            continue
        for masking in args.masking:
            if library == "ours":
                row = build_ours(masking, views, device, args, precision)
            else:
                row = build_lightly(lightly, masking, views, device, args, precision)
            row.precision, row.precision_label = precision, label
            try:
                for _ in range(args.warmup):
                    row.step()
                if args.warmup == 0 and args.compile:
                    row.step()  # compile outside the timed steps
            except Exception as error:  # torch.compile fails in many ways
                if not args.compile:
                    raise
                note = (f"{row.name}: torch.compile failed, row skipped "
                        f"({type(error).__name__}: ")
                note += f"{str(error).splitlines()[0] if str(error) else ''})"
                print(f"note: {note}")
                notes.append(note)
                continue
            row.state_bytes = state_bytes(row)
            rows.append(row)
            print(f"  built {row.name} ({row.description}); warm-up done", flush=True)

    for recipe in args.recipes:
        row = build_recipe(recipe, views, device, args, precision)
        row.precision, row.precision_label = precision, label
        for _ in range(args.warmup + (1 if args.warmup == 0 and args.compile else 0)):
            row.step()
        row.state_bytes = state_bytes(row)
        rows.append(row)
        print(f"  built {row.name} ({row.description}); warm-up done", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    notes = []
    lightly = import_lightly() if "lightly" in args.libraries else None
    if "lightly" in args.libraries and lightly is None:
        note = ("lightly is not installed: its rows are skipped (it is no mixmask dependency; "
                "`pip install lightly` in the benchmark environment to compare).")
        print(f"note: {note}")
        notes.append(note)
    machine = machine_info(device)
    if device.type == "cpu" and args.malloc == "keep" and not keep_freed_cpu_memory():
        notes.append("--malloc keep had no effect (not glibc): the system allocator was used")
    meter = MemoryMeter(device)
    precisions = ", ".join(f"{key} = {value[0]}" for key, value in args.precisions.items())
    print(f"device: {machine['gpu'] or device} ({machine['cpu_model']}, "
          f"{machine['cpu_count']} cores, {machine['torch_threads']} torch threads); "
          f"batch {args.batch}, {args.image_size} px, ResNet-18 width {args.width}, "
          f"precision {precisions}, channels_last {args.channels_last}, "
          f"compile {args.compile}, symmetric {args.symmetric}")

    views = make_views(args, device)
    rows: list[Row] = []
    stopped = measure_until_stopped(  # a time limit keeps the rows timed so far
        lambda: measure(rows, notes, args, views, device, lightly, meter), notes,
        "the rows timed by then")
    rows = [row for row in rows if row.step_seconds]

    results = [summarise(row, args.batch) for row in rows]
    add_ratios(results)
    for r in results:
        print(f"  {r['row']:<20} {r['images_per_s']:9,.1f} img/s  median {r['median_step_s']:.4f}"
              f" s/step over {len(r['step_seconds'])} steps", flush=True)
    print_table(results, meter.method)
    for r in results:
        if r["mix_cost_vs_mocov2"] is not None and r["masking"] == "mixmask":
            print(f"{r['library']}: MixMask step / MoCo v2 step = {r['mix_cost_vs_mocov2']:.2f}x "
                  f"(theory {THEORY_MIX_COST:.2f}x)")
        if r["ours_vs_lightly"] is not None:
            burst = r["ours_vs_lightly_burst"]
            print(f"{ROW_NAMES[r['masking']]}: ours / lightly images/s = "
                  f"{r['ours_vs_lightly']:.2f}x"
                  + (f" (burst: {burst:.2f}x)" if burst is not None else ""))

    result = {
        "benchmark": "train_step",
        "unit": "images/s = batch / median step time (forward, loss, backward, optimizer "
                "step, EMA and queue update)",
        "theory_mix_cost": THEORY_MIX_COST,
        "theory": "forward = 1 unit, backward = 2: MoCo v2 = online 3 + target 1 = 4; "
                  "MixMask adds one online pass (3) = 7; 7/4",
        "memory_method": meter.method,
        "model": {"backbone": "torchvision ResNet-18, CIFAR stem (mixmask build_resnet)",
                  "width": args.width, "projector": "512*width -> 2048 -> 128 (biases, ReLU)",
                  "queue": args.queue, "temperature": 0.1, "ema_momentum": 0.99,
                  "optimizer": "SGD lr 0.06, momentum 0.9, weight decay 5e-4",
                  "mask": "grid 8, ratio 0.5, block, one mask per batch, reversed partner"},
        "machine": machine, "versions": versions(lightly),
        "settings": {**vars(args), "command": sys.argv if argv is None else argv},
        "notes": notes, "stopped": stopped, "results": results,
    }
    write_result(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
