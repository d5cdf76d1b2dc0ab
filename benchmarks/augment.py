"""Two-view augmentation throughput: ours (batched, on device tensors) vs torchvision's PIL
pipeline with DataLoader workers vs kornia's batched augmentation.

Rates are two-view images/s: one image counts once for its pair of views (views/s is twice
that). Per size, every method runs the same two-view recipe:

* 32 px, preset "cifar": RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1)
  with p=0.8, RandomGrayscale(p=0.2), RandomHorizontalFlip, Normalize, on 32 px images
  (real CIFAR-10 when present, else random pixels);
* 224 px, preset "mocov2": the same plus GaussianBlur(23, sigma in (0.1, 2)) with p=0.5, on
  the same images upscaled to 256 px (bilinear), so that the crops downscale.

Methods:

* ``ours``: ``BatchedViewAugment`` with the preset's two views on a uint8 batch already on
  the device (both views in one call); warm-up calls, then timed calls (synchronised on
  CUDA).
* ``torchvision``: the preset's two ``view_transform`` (PIL) pipelines through
  ``MultiViewDataset`` (as training's ``data.pipeline=cpu``) and a DataLoader
  with ``--workers`` processes (default: all cores) and persistent workers. One untimed pass
  starts the workers; then whole passes are timed, each of ``--pil-rounds`` batches per
  worker so that every worker does the same work. On CUDA the pass includes pinned memory
  and the copy of both views to the device, as a training loop needs.
* ``kornia (slice|resample)``: ``kornia.augmentation`` modules in an ``nn.Sequential`` on
  the same device batch (converted to float in the timed call), called twice for the two
  views; one row per RandomResizedCrop ``cropping_mode`` ("slice", kornia's default, crops
  sample by sample; "resample" warps the whole batch). Skipped, with a note, when kornia is
  not installed: it is no dependency of mixmask (``pip install kornia`` to compare).

Allocator (CPU): by default (``--malloc keep``) the process keeps freed memory for reuse,
as the engine does on the CPU (``train.keep_cpu_memory``, :mod:`mixmask.train.runtime`); the
DataLoader workers of the PIL rows inherit it. ``--malloc system`` keeps glibc's defaults,
under which every image-sized buffer is faulted in from the OS page by page (at 224 px
that was a quarter to a half of ours' time on a 2-core CPU).

CPU scale (default; one to two minutes on a 2-core CPU)::

    python benchmarks/augment.py

GPU scale (batch 1024 at 32 px, 256 at 224 px)::

    python benchmarks/augment.py --gpu

Prints a table (method, size, batch, images/s, speed-up over torchvision PIL) and writes
``OUT/results.json`` with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset

import mixmask
from mixmask.data import (
    DATASET_STATS,
    BatchedViewAugment,
    ImageSet,
    MultiViewDataset,
    load_image_set,
    preset_views,
)
from mixmask.train.runtime import keep_freed_cpu_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopping import measure_until_stopped  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MIXMASK_DATA", ROOT.parent / "shared" / "data"))
CIFAR10_TARBALL = DATA_DIR / "cifar10_jpeg_q75.tar.gz"
METHODS = ("ours", "torchvision", "kornia")
CROPPING_MODES = ("slice", "resample")
# Default batch per image size: (CPU scale, --gpu scale).
BATCHES = {32: (256, 1024), 224: (64, 256)}
# Distinct source images held in memory (the PIL dataset cycles through them).
MAX_DISTINCT = {"small": 8192, "large": 1024}


def preset_for(size: int) -> str:
    return "cifar" if size <= 64 else "mocov2"


def source_side(size: int) -> int:
    """Side of the source images: the output size for small images (CIFAR-style crops
    that upscale), 256/224 of it for large ones (ImageNet-style crops that downscale)."""
    return size if size <= 64 else round(size * 256 / 224)


def default_batch(size: int, gpu: bool) -> int:
    if size in BATCHES:
        return BATCHES[size][gpu]
    return 1024 if size <= 64 else 256 if gpu else 64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def import_kornia():
    try:
        import kornia
        import kornia.augmentation  # noqa: F401
    except ImportError:
        return None
    return kornia


# -- data ---------------------------------------------------------------------------------


def load_source_images(data: str, count: int) -> tuple[torch.Tensor, str]:
    """uint8 [count, 3, 32, 32]: the first CIFAR-10 train images, or random pixels."""
    if data in ("auto", "cifar10") and CIFAR10_TARBALL.is_file():
        image_set = load_image_set("imagefolder", str(CIFAR10_TARBALL), "train", subset=count)
        images = image_set.images
        if images is None:
            raise SystemExit(f"{CIFAR10_TARBALL} did not decode to in-memory 32 px images.")
        return images, f"CIFAR-10 train, first {len(images)} images ({CIFAR10_TARBALL})"
    if data == "cifar10":
        raise SystemExit(f"--data cifar10 but {CIFAR10_TARBALL} does not exist (set MIXMASK_DATA "
                         "to the folder holding cifar10_jpeg_q75.tar.gz, or use --data random).")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return images, f"random uint8 pixels, {count} images"


def resize_images(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [N, 3, h, w] -> uint8 [N, 3, side, side], bilinear, in chunks."""
    if images.shape[-2:] == (side, side):
        return images
    out = torch.empty(len(images), 3, side, side, dtype=torch.uint8)
    for start in range(0, len(images), 128):
        chunk = images[start:start + 128].float()
        chunk = F.interpolate(chunk, size=(side, side), mode="bilinear", align_corners=False,
                              antialias=side < images.shape[-1])
        out[start:start + 128] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def device_batch(images: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """The first `batch` images (cycled if there are fewer), on the device."""
    index = torch.arange(batch) % len(images)
    return images[index].contiguous().to(device)


# -- timing -------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], seconds: float, warmup: int,
               device: torch.device) -> tuple[int, float]:
    """(calls, elapsed s): `warmup` untimed calls, then calls for about `seconds`,
    synchronising only between chunks of calls sized from the rate so far."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, chunk, elapsed = 0, 1, 0.0
    start = time.perf_counter()
    while True:
        for _ in range(chunk):
            fn()
        synchronize(device)
        calls += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed
        per_call = elapsed / calls
        chunk = max(1, min(calls, int((seconds - elapsed) / per_call) + 1))


def bench_ours(images: torch.Tensor, size: int, batch: int, device: torch.device,
               args: argparse.Namespace, mean, std) -> dict:
    augment = BatchedViewAugment(preset_views(preset_for(size), size), mean=mean, std=std)
    source = device_batch(images, batch, device)
    generator = torch.Generator(device=device).manual_seed(0)
    (first, second), _ = augment(source, generator)
    assert first.shape == second.shape == (batch, 3, size, size), first.shape
    calls, elapsed = time_calls(lambda: augment(source, generator), args.seconds, args.warmup,
                                device)
    return {"method": "ours", "calls": calls, "seconds": elapsed,
            "images_per_s": calls * batch / elapsed,
            "input": f"uint8 [{batch}, 3, {source.shape[-2]}, {source.shape[-1]}] on {device}"}


def bench_kornia(kornia, images: torch.Tensor, size: int, batch: int, device: torch.device,
                 args: argparse.Namespace, mean, std, cropping_mode: str) -> dict:
    K = kornia.augmentation
    config = preset_views(preset_for(size), size)[0]
    steps = [
        K.RandomResizedCrop((size, size), scale=(0.2, 1.0), cropping_mode=cropping_mode),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if config.blur_p > 0:
        steps.append(K.RandomGaussianBlur(config.kernel_size, config.blur_sigma, p=config.blur_p))
    # Statistics on the device: kornia would copy host tensors to it on every call.
    stats = [torch.tensor(values, device=device) for values in (mean, std)]
    steps += [K.RandomHorizontalFlip(), K.Normalize(*stats)]
    pipeline = torch.nn.Sequential(*steps).to(device)
    source = device_batch(images, batch, device)

    def two_views():
        floats = source.float().div_(255.0)
        return pipeline(floats), pipeline(floats)

    first, second = two_views()
    assert first.shape == second.shape == (batch, 3, size, size), first.shape
    calls, elapsed = time_calls(two_views, args.seconds, args.warmup, device)
    return {"method": f"kornia ({cropping_mode})", "calls": calls, "seconds": elapsed,
            "images_per_s": calls * batch / elapsed,
            "input": f"uint8 [{batch}, 3, {source.shape[-2]}, {source.shape[-1]}] on {device}, "
                     "to float in the timed call; two pipeline calls"}


def bench_torchvision(images: torch.Tensor, size: int, batch: int, device: torch.device,
                      args: argparse.Namespace, mean, std) -> dict:
    image_set = ImageSet(images, None, None, [], tuple(mean), tuple(std))
    dataset = MultiViewDataset(image_set, preset_views(preset_for(size), size), seed=0)
    workers = args.workers
    pass_images = batch * max(1, workers) * args.pil_rounds
    # Each pass cycles through the distinct images: the PIL work does not depend on which.
    # Items are keyed (index, epoch), as training's batch sampler yields them.
    dataset = Subset(dataset, [(i % len(images), 0) for i in range(pass_images)])
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")

    def one_pass(loader: DataLoader) -> float:
        start = time.perf_counter()
        for (first, second), *_ in loader:
            first = first.to(device, non_blocking=True)
            second = second.to(device, non_blocking=True)
        synchronize(device)
        assert first.shape == (batch, 3, size, size), first.shape
        return time.perf_counter() - start

    one_pass(loader)  # starts the workers (untimed)
    passes, elapsed = 0, 0.0
    while passes == 0 or elapsed < args.seconds:
        elapsed += one_pass(loader)
        passes += 1
    del loader
    gc.collect()  # shuts the persistent workers down
    return {"method": "torchvision PIL", "passes": passes, "seconds": elapsed,
            "images_per_s": passes * pass_images / elapsed,
            "input": f"{len(images)} distinct PIL images of {images.shape[-1]} px, "
                     f"{pass_images} per pass, {workers} workers"
                     + (", pinned + copied to the device" if device.type == "cuda" else "")}


# -- report -------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_result(result: dict, out: Path) -> None:
    """``out/results.json``, the JSON every benchmark here writes next to its table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'}")


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if device.type == "cuda":
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def versions(kornia) -> dict:
    return {"mixmask": mixmask.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "kornia": kornia.__version__ if kornia else None}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':<20} {'size':>5} {'batch':>6} {'images/s':>11} {'vs PIL':>8}")
    for row in rows:
        speedup = row.get("speedup_vs_torchvision_pil")
        cell = f"{speedup:7.1f}x" if speedup is not None else f"{'-':>8}"
        print(f"{row['method']:<20} {row['size']:>5} {row['batch']:>6} "
              f"{row['images_per_s']:11,.0f} {cell}")
    print("images/s: two-view images per second (an image counts once for its two views).")


@torch.no_grad()
def measure(rows: list[dict], args, batches: dict, distinct: dict, base_images, device,
            kornia) -> None:
    """Each size's rows (torchvision's PIL pipeline, ours, kornia), appended to ``rows``
    size by size, so a stop keeps the sizes measured."""
    for size in args.sizes:
        batch, preset = batches[size], preset_for(size)
        images = resize_images(base_images[:distinct[size]], source_side(size))
        mean, std = DATASET_STATS["cifar10" if preset == "cifar" else "imagefolder"]
        size_rows = []
        if "torchvision" in args.methods:
            size_rows.append(bench_torchvision(images, size, batch, device, args, mean, std))
        if "ours" in args.methods:
            size_rows.append(bench_ours(images, size, batch, device, args, mean, std))
        if kornia is not None:
            for mode in args.kornia_cropping_modes:
                size_rows.append(bench_kornia(kornia, images, size, batch, device, args,
                                              mean, std, mode))
        pil = next((r for r in size_rows if r["method"] == "torchvision PIL"), None)
        for row in size_rows:
            row.update(size=size, preset=preset, batch=batch,
                       views_per_s=2 * row["images_per_s"],
                       source_px=source_side(size),
                       speedup_vs_torchvision_pil=(row["images_per_s"] / pil["images_per_s"]
                                                   if pil else None))
            print(f"  {row['method']:<20} {size:>4} px  {row['images_per_s']:11,.0f} img/s"
                  f"  ({row['input']})", flush=True)
        rows += size_rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for every size (default: 256 at 32 px, 64 at 224 px; "
                             "with --gpu 1024 and 256)")
    parser.add_argument("--gpu", action="store_true", help="GPU-scale batches")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time budget of each measurement, after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--kornia-cropping-modes", nargs="+", choices=CROPPING_MODES,
                        default=list(CROPPING_MODES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers of the PIL pipeline (default: all cores)")
    parser.add_argument("--pil-rounds", type=int, default=2,
                        help="batches per worker in each timed PIL pass")
    parser.add_argument("--data", choices=["auto", "cifar10", "random"], default="auto",
                        help="source images: real CIFAR-10 when present (auto), or random")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 matmuls on CUDA (ours' crop is two matmuls)")
    parser.add_argument("--malloc", choices=["keep", "system"], default="keep",
                        help="CPU: keep freed memory for reuse, as the engine does "
                             "(train.keep_cpu_memory), or glibc's defaults")
    parser.add_argument("--out", default="runs/benchmarks/augment")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.pil_rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--workers >= 0, --pil-rounds >= 1, --seconds > 0, --warmup >= 0")

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    notes = []
    if device.type == "cpu" and args.malloc == "keep" and not keep_freed_cpu_memory():
        notes.append("--malloc keep had no effect (not glibc): the system allocator was used")
    kornia = import_kornia() if "kornia" in args.methods else None
    if "kornia" in args.methods and kornia is None:
        note = ("kornia is not installed: its rows are skipped (it is no mixmask dependency; "
                "`pip install kornia` in the benchmark environment to compare).")
        print(f"note: {note}")
        notes.append(note)

    batches = {size: args.batch or default_batch(size, args.gpu) for size in args.sizes}
    distinct = {}
    for size in args.sizes:
        pass_images = batches[size] * max(1, args.workers) * args.pil_rounds
        cap = MAX_DISTINCT["small" if size <= 64 else "large"]
        distinct[size] = max(batches[size], min(pass_images, cap))
    base_images, data_desc = load_source_images(args.data, max(distinct.values()))
    machine = machine_info(device)
    print(f"device: {machine['gpu'] or device} ({machine['cpu_model']}, "
          f"{machine['cpu_count']} cores, {machine['torch_threads']} torch threads); "
          f"data: {data_desc}")

    rows: list[dict] = []
    stopped = measure_until_stopped(  # a time limit keeps the sizes measured so far
        lambda: measure(rows, args, batches, distinct, base_images, device, kornia), notes,
        "the sizes measured by then")

    print_table(rows)
    for size in args.sizes:
        ours = next((r for r in rows if r["size"] == size and r["method"] == "ours"), None)
        peers = [r for r in rows if r["size"] == size and r["method"].startswith("kornia")]
        if ours and peers:
            best = max(peers, key=lambda r: r["images_per_s"])
            print(f"{size} px: ours / best kornia ({best['method']}) = "
                  f"{ours['images_per_s'] / best['images_per_s']:.2f}x")

    result = {
        "benchmark": "augment", "unit": "two-view images/s (an image counts once per pair)",
        "machine": machine, "versions": versions(kornia),
        "settings": {**vars(args), "batches": batches, "distinct_images": distinct,
                     "data": data_desc, "command": sys.argv if argv is None else argv},
        "notes": notes, "stopped": stopped, "results": rows,
    }
    write_result(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
