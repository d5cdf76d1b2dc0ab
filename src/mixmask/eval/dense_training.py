"""The training loop ``mixmask detect`` and ``mixmask segment`` share: a fixed number of
iterations on Fabric (devices, precision, DDP), resumable exactly.

The batches are a pure function of (seed, epoch) (:class:`~mixmask.eval.data.EpochBatches`),
the augmentation of (seed, epoch, image), and every random draw inside the step (the RPN's
and RoI heads' sampling, dropout: torch's global generators) is re-seeded from (seed,
iteration), so a run stopped at iteration i and continued reaches the uninterrupted run's
weights bit for bit. The state is saved every ``checkpoint_every`` iterations, at the end
and on SIGINT / SIGTERM, atomically and never from a non-finite state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

from mixmask.data import DATASET_STATS
from mixmask.data.dense.sets import transformed_sets
from mixmask.data.dense.transforms import collate_dense
from mixmask.data.loaders import ignore_stop_signals
from mixmask.data.progress import image_progress
from mixmask.errors import ConfigError, MixmaskError
from mixmask.eval.data import EpochBatches
from mixmask.eval.frozen_run import result_header
from mixmask.methods import PixelStats
from mixmask.models.dense.pyramid import train_for_dense
from mixmask.ops.tensors import all_finite
from mixmask.runs.checkpoint import (
    check_same_settings,
    load_optimizer_state,
    load_state,
    read_checkpoint,
    save_on_rank_zero,
)
from mixmask.runs.folder import (
    build_run_method,
    load_run_checkpoint,
    load_run_config,
    write_result,
)
from mixmask.train.fabric import build_fabric, resolve_accelerator
from mixmask.train.signals import GivenStop, StopSignals
from mixmask.train.step import training_step


class DenseStopped(MixmaskError):
    """A stop signal ended a detect / segment run at an iteration boundary; saved."""


class HeldBatch:
    """A batch that Fabric's mixed-precision plugins pass to the task as it is. They cast
    every floating tensor of a forward's arguments (dataclasses too) to bf16 / fp16, and
    in bf16 the box coordinates of an 800 px image round to 4 px (torchvision then refuses
    them); autocast still runs the network's convolutions and matmuls in half precision."""

    __slots__ = ("images", "targets")

    def __init__(self, images: list[Tensor], targets: list):
        self.images, self.targets = images, targets


class IterationTraining:
    """One run's state: the Fabric-wrapped task and optimizer, the batches, the iteration
    counter (resumed from ``checkpoint_path`` when it holds the same ``settings``)."""

    def __init__(self, fabric: Fabric, task: nn.Module, optimizer: torch.optim.Optimizer,
                 train_set, *, iterations: int, batch_size: int, seed: int,
                 lr_at: Callable[[float, int], float], checkpoint_path: Path,
                 settings: dict[str, Any], what: str, num_workers: int = 0):
        self.fabric, self.iterations, self.seed, self.lr_at = fabric, iterations, seed, lr_at
        self.checkpoint_path, self.settings, self.what = checkpoint_path, settings, what
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.model, self.optimizer = fabric.setup(task, optimizer)
        self.batches = EpochBatches(len(train_set), batch_size, seed=seed,
                                    rank=fabric.global_rank, world_size=fabric.world_size)
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=self.batches, num_workers=num_workers,
            collate_fn=collate_dense, pin_memory=fabric.device.type == "cuda",
            worker_init_fn=ignore_stop_signals if num_workers else None)
        self.state = {"iteration": 0, "wall_time_s": 0.0, "losses": []}
        if checkpoint_path.is_file():
            self._resume()
        self.started = time.perf_counter()
        self.generator = torch.Generator(device=fabric.device)

    def _resume(self) -> None:
        path = self.checkpoint_path
        checkpoint = read_checkpoint(path, required=("model", "optimizer", "iteration"),
                                     other="delete it to start over",
                                     what=f"mixmask {self.what} checkpoint")
        check_same_settings(checkpoint.get("settings", {}), self.settings, path.parent,
                            self.what)
        load_state(self.model.module, checkpoint["model"], path)
        load_optimizer_state(self.optimizer, checkpoint["optimizer"], path)
        self.state.update(iteration=checkpoint["iteration"],
                          wall_time_s=checkpoint.get("wall_time_s", 0.0),
                          losses=list(checkpoint.get("losses", [])))

    def fit(self, *, stop=None, checkpoint_every: int = 0, say: Callable[[str], None] = print,
            progress: Callable[[int], None] | None = None, log_every: int = 50) -> float:
        """Train to ``iterations``; returns the wall time, resumed parts included."""
        state, fabric = self.state, self.fabric
        if state["iteration"]:
            say(f"Resumed {self.checkpoint_path} at iteration {state['iteration']} of "
                f"{self.iterations}.")
        per_epoch = self.batches.batches_per_epoch
        self.model.train()
        while state["iteration"] < self.iterations:
            epoch, start = divmod(state["iteration"], per_epoch)
            self.batches.set_epoch(epoch, start)
            for images, targets in self.loader:
                iteration = state["iteration"]
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(group["base_lr"], iteration)
                step_seed = self.seed * 1_000_003 + iteration
                torch.manual_seed(step_seed)
                self.generator.manual_seed(step_seed)
                output = training_step(self.model, self.optimizer, HeldBatch(images, targets),
                                       self.generator, iteration / self.iterations,
                                       backward=fabric.backward)
                state["iteration"] += 1
                if progress is not None:
                    progress(len(images) * fabric.world_size)
                if state["iteration"] % log_every == 0 or state["iteration"] == self.iterations:
                    loss = float(output.loss.detach())
                    state["losses"].append([state["iteration"], loss])
                    say(f"{self.what} iteration {state['iteration']}/{self.iterations}: "
                        f"loss {loss:.4f}")
                if state["iteration"] >= self.iterations:
                    break
                if stop is not None and stop.received is not None:
                    self.save()
                    raise DenseStopped(
                        f"stopped by {stop.received} after iteration {state['iteration']} "
                        f"of {self.iterations}; saved {self.checkpoint_path}. Run the same "
                        "command again to continue exactly where it stopped.")
                if checkpoint_every and state["iteration"] % checkpoint_every == 0:
                    self.save()
        self.save()
        return state["wall_time_s"] + time.perf_counter() - self.started

    def save(self) -> None:
        """The state, atomically; never from a non-finite one."""
        state, path = self.state, self.checkpoint_path
        tensors = [tensor for tensor in (*self.model.parameters(), *self.model.buffers())
                   if tensor.is_floating_point()]
        if not bool(all_finite(tensors)):
            raise MixmaskError(
                f"the {self.what} diverged by iteration {state['iteration']}: the weights "
                "hold NaN or infinity, so nothing was saved; lower the learning rate "
                f"(transfer.lr / transfer.segment_lr) or use train.precision=32 (the last "
                f"good state is {path if path.is_file() else 'none'}).")
        now = time.perf_counter()
        content = {"model": self.model.module.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "iteration": state["iteration"],
                   "settings": self.settings, "losses": state["losses"],
                   "wall_time_s": state["wall_time_s"] + now - self.started}
        save_on_rank_zero(content, path, is_global_zero=self.fabric.is_global_zero,
                          where=f"iteration {state['iteration']}")
        self.fabric.barrier()


class DenseRun:
    """What ``mixmask detect`` and ``mixmask segment`` share around their model: the run's
    config (``config.yaml``, a ``--config`` protocol file, overrides), its checkpoint (or
    the random init of ``train.seed`` for ``--from-scratch``), the backbone, the data
    (``transfer.*``), Fabric, training with stop signals and bars, and the result file
    ``RUN/eval/<name>.json``."""

    def __init__(self, run, overrides: list[str], *, kind: str, name: str,
                 from_scratch: bool, checkpoint: str | None, protocol_file: str | None,
                 console=None):
        if from_scratch and checkpoint:
            raise ConfigError("--from-scratch trains from the random init of train.seed; it "
                              "takes no --checkpoint.")
        self.run, self.name, self.kind, self.console = Path(run), name, kind, console
        self.config = config = load_run_config(self.run, overrides, protocol_file)
        self.checkpoint_path, self.content = ((None, None) if from_scratch else
                                              load_run_checkpoint(self.run, checkpoint))
        transfer, train = config.transfer, config.train
        if transfer.batch_size % train.processes:
            raise ConfigError(f"transfer.batch_size={transfer.batch_size} does not divide over "
                              f"{train.processes} processes.")
        self.train_set, self.test_set, raw = transformed_sets(config, kind)
        self.max_size = self.train_set.max_size
        self.thing_classes, self.segment_classes = raw.thing_classes, raw.segment_classes
        self.num_thing_classes = len(self.thing_classes)
        # The normalisation the backbone pretrained with.
        self.mean, self.std = DATASET_STATS[config.data.dataset]
        self.fabric = build_fabric(config, resolve_accelerator(train.device))
        self.fabric.launch()
        method = build_run_method(config, PixelStats(self.mean, self.std),
                                  self.checkpoint_path, self.content)
        self.backbone = train_for_dense(method.backbone)
        self.init = (f"random init (train.seed={train.seed})" if from_scratch else
                     f"pretrained ({self.checkpoint_path.name}, step {self.content.get('step')})")
        self.from_scratch = from_scratch
        self.progress_bar = train.progress_bar and self.fabric.is_global_zero

    def say(self, message: str) -> None:
        if self.fabric.is_global_zero:
            (self.console.print if self.console is not None else print)(message)

    def require_masks(self) -> None:
        image, target = self.train_set.dataset[0]
        if target.masks is None:
            raise ConfigError(f"transfer.dataset={self.config.transfer.dataset} has no "
                              "instance masks; use --task boxes.")

    @property
    def synchronised_bn(self) -> bool:
        """BatchNorm statistics over all DDP processes (MoCo's SyncBN). torch's SyncBatchNorm
        runs on GPUs only, so CPU processes (gloo) keep per-process statistics."""
        return self.fabric.world_size > 1 and self.fabric.device.type == "cuda"

    @property
    def images_per_bn_statistics(self) -> int:
        """How many images each BatchNorm's batch statistics are taken over."""
        batch, world = self.config.transfer.batch_size, self.fabric.world_size
        return batch // world if world > 1 and not self.synchronised_bn else batch

    @property
    def bn_description(self) -> str:
        if self.fabric.world_size > 1 and not self.synchronised_bn:
            return "train mode (per-process statistics: torch's SyncBN needs GPUs)"
        return "train mode (SyncBN over processes)"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """What the JSON reports and a resume checks against its checkpoint."""
        transfer, train = self.config.transfer, self.config.train
        settings = {"dataset": transfer.dataset, "iterations": transfer.iterations,
                    "batch_size": transfer.batch_size, "image_size": transfer.image_size,
                    "max_size": self.max_size, "train_images": len(self.train_set),
                    "test_images": len(self.test_set), "flip": transfer.flip,
                    "init": self.init, "seed": train.seed, "precision": train.precision,
                    "world_size": self.fabric.world_size}
        if transfer.dataset == "mosaic":
            settings.update(mosaic_objects=list(transfer.mosaic_objects),
                            mosaic_object_size=list(transfer.mosaic_object_size))
        settings.update(extra)
        return settings

    def train(self, task: nn.Module, optimizer: torch.optim.Optimizer,
              lr_at: Callable[[float, int], float], settings: dict[str, Any],
              stop=None) -> IterationTraining:
        transfer = self.config.transfer
        if self.synchronised_bn:
            task = nn.SyncBatchNorm.convert_sync_batchnorm(task)
        training = IterationTraining(
            self.fabric, task, optimizer, self.train_set, iterations=transfer.iterations,
            batch_size=transfer.batch_size, seed=self.config.train.seed, lr_at=lr_at,
            checkpoint_path=self.run / "eval" / self.name / "last.ckpt", settings=settings,
            what=self.name.replace("_", " "), num_workers=self.config.data.num_workers)
        stop_context = StopSignals() if stop is None else GivenStop(stop)
        total = (transfer.iterations - training.state["iteration"]) * transfer.batch_size
        with stop_context as stop_signals, image_progress(
                self.name.replace("_", " "), total, enabled=self.progress_bar,
                console=self.console) as advance:
            training.wall_time_s = training.fit(
                stop=stop_signals, checkpoint_every=transfer.checkpoint_every, say=self.say,
                progress=advance)
        return training

    def scores(self, score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``score()`` on the first process, its result given to every process."""
        result = score() if self.fabric.is_global_zero else {}
        return self.fabric.broadcast(result, src=0)

    def write(self, description: str, settings: dict[str, Any], scores: dict[str, Any],
              training: IterationTraining) -> tuple[Path, dict[str, Any]]:
        result = result_header(self.config, self.run, self.name, description,
                               self.checkpoint_path, self.content, self.fabric.device,
                               training.wall_time_s)
        result.update(scores, settings=settings, from_scratch=self.from_scratch,
                      losses=training.state["losses"], train_images=len(self.train_set),
                      test_images=len(self.test_set),
                      proxy=self.config.transfer.dataset == "mosaic")
        if not self.fabric.is_global_zero:
            return self.run / "eval" / f"{self.name}.json", result
        return write_result(self.run, self.name, result), result
