"""Process-level settings for training speed that are not part of the model.

On the CPU, PyTorch allocates tensors with the C library's malloc. glibc's malloc returns
freed memory at the top of its heap to the OS once more than ``M_TRIM_THRESHOLD`` is free,
and serves blocks above ``M_MMAP_THRESHOLD`` with fresh ``mmap`` pages; both thresholds
start small and adapt slowly. A training step frees all of its activations and allocates
them again in the next step, so by default every step faults its activation memory back in
page by page (``benchmarks/train_step.py --malloc system`` counted about 80,000 minor
page faults per MoCo v2 + MixMask CPU step of a CIFAR ResNet-18 at batch 64, none with this
setting), and the kernel zeroes each page first. Keeping the
freed memory in the process, as the CUDA caching allocator does on a GPU, removes that work.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): blocks up to
# 32 MiB come from the reusable heap; larger ones stay mmap'ed.
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**30


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep up to 1 GiB of freed heap memory for reuse and serve blocks up to
    32 MiB from the heap. Process-wide and idempotent; the peak memory of a step is held
    between steps instead of being returned to the OS. Returns whether it took effect (False
    off Linux/glibc, e.g. on macOS or with musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1)
