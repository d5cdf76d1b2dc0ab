"""What many test files need: the checkout's root, a seeded CPU generator, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout (configs/, benchmarks/, docs/)


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a process group's master)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
