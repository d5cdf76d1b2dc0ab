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


def real_view_pairs(cifar10_tarball, preset: str, count: int = 16):
    """Two augmented views (``preset``'s two, at 32 px) of the first ``count`` real CIFAR-10
    training images, torch's global generator seeded 0: ([count, 3, 32, 32], same)."""
    from mixmask.data import load_image_set, preset_views, view_transform

    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=count)
    first, second = (view_transform(view, image_set.mean, image_set.std)
                     for view in preset_views(preset, 32))
    torch.manual_seed(0)
    pairs = [(first(image_set.load_pil(index))[0], second(image_set.load_pil(index))[0])
             for index in range(count)]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def pretrain_recipe_briefly(recipe: str, cifar10_tarball, out_dir, *overrides: str) -> dict:
    """`mixmask pretrain` of ``configs/cifar10/RECIPE.yaml`` for 3 steps of 16 real images
    (one epoch of a 48-image subset, no monitors, the end-of-run kNN on 64 / 32 images);
    returns the run's summary."""
    from mixmask.config import load_config
    from mixmask.train.loop import pretrain

    config = load_config(ROOT / "configs" / "cifar10" / f"{recipe}.yaml", [
        f"data.root={cifar10_tarball}", "data.dataset=imagefolder", "data.subset=48",
        "data.num_workers=0", "train.batch_size=16", "train.epochs=1", "train.warmup_epochs=0",
        "monitor.knn=false", "monitor.online_probe=false", "eval.knn=true", "eval.linear=false",
        "data.eval_train_subset=64", "data.eval_test_subset=32", "train.progress_bar=false",
        *overrides, f"out_dir={out_dir}"])
    return pretrain(config)


def parameters_without_gradient(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s trainable parameters whose gradient is missing or all zero
    (after a backward)."""
    return [name for name, parameter in module.named_parameters()
            if parameter.requires_grad and (parameter.grad is None
                                            or not parameter.grad.abs().sum() > 0)]
