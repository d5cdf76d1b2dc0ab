"""Tests for mixmask.train.runtime: glibc keeps freed memory, measured by page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Training steps of a small CIFAR ResNet-18: every step frees its activations and allocates
# them again. Prints the minor page faults of the last eight of eleven steps (kept memory
# still faults a few thousand pages once, at most: more steps keep that small beside the
# system allocator's faults, which come back every step).
SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from mixmask.models import build_resnet
    from mixmask.train.runtime import keep_freed_cpu_memory
    if sys.argv[1] == "keep":
        assert keep_freed_cpu_memory()
    torch.manual_seed(0)
    model, _ = build_resnet("resnet18", width=0.5, stem="cifar")
    images = torch.randn(32, 3, 32, 32)
    def step():
        model(images).square().mean().backward()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_kept_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("system", "keep"):
        result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                                text=True, timeout=120, check=True)
        faults[mode] = int(result.stdout.split()[-1])
    # glibc's default returns the freed activations to the OS and faults them in again
    # every step; kept, they are reused.
    assert faults["keep"] * 4 < faults["system"], faults
