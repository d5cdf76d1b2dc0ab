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


class StopAfter:
    """A stop flag raised after ``steps`` training steps (a SIGTERM, in effect): wraps the
    ``training_step`` that ``module`` (a finetune or dense-training module) calls."""

    def __init__(self, steps: int, patch, module):
        self.received = None
        original, count = module.training_step, [0]

        def counting(*args, **kwargs):
            output = original(*args, **kwargs)
            count[0] += 1
            if count[0] == steps:
                self.received = "SIGTERM"
            return output

        patch.setattr(module, "training_step", counting)
