"""One pretraining run's loop: steps, the online probe, logging, monitors, checkpoints.

:func:`mixmask.train.loop.pretrain` builds the run's parts and hands them to a
:class:`Trainer`. Scalars are read on the host only every ``train.log_every`` steps.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn

from mixmask.config import Config
from mixmask.data import UNLABELED, EpochBatchSampler, ImageSet
from mixmask.data.loaders import worker_error_message
from mixmask.data.splits import EvalData
from mixmask.errors import DatasetError, MixmaskError
from mixmask.eval import evaluate
from mixmask.eval.collapse import CollapseWatch, embedding_std
from mixmask.methods import PixelStats, build_method
from mixmask.ops.tensors import all_finite
from mixmask.runs.checkpoint import write_checkpoint
from mixmask.runs.folder import write_summary
from mixmask.runs.resume import rank_state
from mixmask.train.fabric import device_name, grad_scaler, versions
from mixmask.train.metrics_log import MetricsLog
from mixmask.train.profiling import StepProfiler
from mixmask.train.schedule import learning_rate, weight_decay
from mixmask.train.signals import StopSignals
from mixmask.train.step import set_learning_rate, set_weight_decay, training_step

_STATE_FINITE = "_state_finite"  # the finite-state flag, read with each logged row


class TrainingDiverged(MixmaskError):
    """The loss, the weights or the buffers became NaN or infinite."""


class RunStopped(MixmaskError):
    """SIGINT or SIGTERM stopped the run at a step boundary; its last.ckpt is saved."""


@dataclass
class Parts:
    """What a run is built from (:func:`mixmask.train.loop.build_parts`)."""

    train_set: ImageSet
    sampler: EpochBatchSampler
    steps_per_epoch: int
    eval_data: EvalData | None
    pixel_stats: PixelStats
    method: nn.Module  # Fabric-wrapped
    optimizer: torch.optim.Optimizer
    loader: Any
    generator: torch.Generator
    probe: nn.Module | None = None
    probe_optimizer: torch.optim.Optimizer | None = None


class Trainer:
    """One pretraining run's state and loop: :meth:`fit` trains epoch by epoch
    (:meth:`_train_epoch`), logging, monitoring and checkpointing as it goes; :meth:`finish`
    evaluates and writes summary.json."""

    def __init__(self, config: Config, fabric: Fabric, parts: Parts, state: dict,
                 metrics: MetricsLog, say, elapsed_before: float = 0.0,
                 resumed_from: Path | None = None):
        method, optimizer, probe = parts.method, parts.optimizer, parts.probe
        generator, train_set = parts.generator, parts.train_set
        self.probe_optimizer = parts.probe_optimizer
        self.loader, self.sampler = parts.loader, parts.sampler
        self.steps_per_epoch, self.eval_data = parts.steps_per_epoch, parts.eval_data
        self.pixel_stats = parts.pixel_stats
        self.checkpoint_dir = Path(config.out_dir) / "checkpoints"
        self.config, self.fabric, self.method, self.optimizer = config, fabric, method, optimizer
        # Fabric's clipping unscales fp16 gradients first; no host read (the norm is logged).
        self.clip_gradients = None
        if config.train.grad_clip > 0:
            self.clip_gradients = functools.partial(
                fabric.clip_gradients, method, optimizer, max_norm=config.train.grad_clip,
                error_if_nonfinite=False)
        self.probe, self.generator = probe, generator
        self.scaled_gradients = grad_scaler(fabric) is not None
        self.metrics, self.state, self.say = metrics, state, say
        # The newest checkpoint known to hold a finite state: (path, step), or None.
        self.last_good = None if resumed_from is None else (resumed_from, state["step"])
        # Every floating tensor a checkpoint saves, checked for NaN/inf before each save and
        # at each logging step (one fused reduction, read with the logged scalars).
        modules = [method] + ([probe] if probe is not None else [])
        self.state_tensors = [tensor for module in modules
                              for tensor in (*module.parameters(), *module.buffers())
                              if tensor.is_floating_point()]
        self.train_images, self.train_seconds = 0, 0.0
        self.elapsed_before, self.started = elapsed_before, time.perf_counter()
        self.stop: StopSignals | None = None  # set by pretrain()
        # The online probe is reported only once it has trained (a method may give no
        # probe features).
        self.probe_trained = resumed_from is not None and probe is not None
        self.last_epoch_metrics: dict[str, float] = {}
        # The files it skips as unreadable go to summary.json; whether it holds unlabelled
        # images (STL-10's pretraining split) decides whether the probe checks for labels.
        self.train_set = train_set
        self.unlabelled_in_train = train_set is not None and (
            train_set.labels is None or bool((train_set.labels < 0).any()))
        self._pending_log = None  # (step, lr, names, values, ready event): see _log_step
        # The test features' spread is one measure over the whole test set: one low value
        # is collapse (the training batches' spread needs COLLAPSE_PATIENCE logs).
        self.collapse = CollapseWatch(dims={"test_feature_std": method.module.feature_dim},
                                      patience={"test_feature_std": 1})
        train = config.train
        self.profiler = (StepProfiler(Path(config.out_dir) / "profile", fabric.device,
                                      train.profile_start_step, train.profile_steps)
                         if train.profile_steps and fabric.is_global_zero else None)

    @property
    def total_steps(self) -> int:
        total = self.config.train.epochs * self.steps_per_epoch
        return min(total, self.config.train.max_steps) if self.config.train.max_steps else total

    def fit(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        show = self.fabric.is_global_zero and self.config.train.progress_bar
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), disable=not show,
                      transient=False) as progress:
            task = progress.add_task("pretrain", total=self.total_steps,
                                     completed=self.state["step"], status="")
            while self.state["step"] < self.total_steps:
                epoch = self.state["step"] // self.steps_per_epoch
                self.state["epoch"] = epoch
                self.sampler.set_epoch(epoch, self.state["step"] % self.steps_per_epoch)
                progress.update(task, description=f"epoch {epoch + 1}/{self.config.train.epochs}")
                stopping = self._train_epoch(progress, task)
                epoch_done = self.state["step"] % self.steps_per_epoch == 0
                if epoch_done:
                    self.state["epoch"] = epoch + 1
                    self._end_of_epoch(epoch + 1, progress, task)
                if stopping:
                    if not epoch_done:  # the epoch's end saved it otherwise
                        self.save_checkpoint("last.ckpt")
                    path = self.checkpoint_dir / "last.ckpt"
                    raise RunStopped(
                        f"stopped by {self._stop_signal()} after step {self.state['step']}; "
                        f"saved {path}. Continue with resume=auto (same out_dir): it resumes "
                        "exactly where this run stopped.")
        if self.profiler is not None:  # the run ended inside the profiled window
            self._report_profile(self.profiler.close(self.state["step"]))
        self.save_checkpoint("last.ckpt")

    def _stop_signal(self) -> str | None:
        return None if self.stop is None else self.stop.received

    def _stop_requested(self, step: int) -> bool:
        """Whether to stop after ``step`` steps. Under DDP every process must stop at the
        same step: the flag is agreed on at logging steps (one small all-reduce)."""
        if self.fabric.world_size == 1:
            return self._stop_signal() is not None
        if step % self.config.train.log_every and step % self.steps_per_epoch:
            return False
        flag = torch.tensor(float(self._stop_signal() is not None), device=self.fabric.device)
        return bool(self.fabric.all_reduce(flag, reduce_op="max") > 0)

    def _train_epoch(self, progress, task) -> bool:
        """Train until the epoch ends (or the run does); True when a stop signal ended it
        early, at a step boundary."""
        config, fabric, method = self.config, self.fabric, self.method
        stopping = False
        start = time.perf_counter()
        images_seen = 0
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except DatasetError as error:  # an unreadable image: stop here, whole, and save
                self._flush_log(progress, task)
                self.save_checkpoint("last.ckpt")
                raise DatasetError(
                    f"{worker_error_message(error)} The run was saved at step "
                    f"{self.state['step']} ({self.checkpoint_dir / 'last.ckpt'}); continue it "
                    "with resume=auto once the file is fixed.") from None
            step = self.state["step"]
            if step >= self.total_steps:
                break
            lr = learning_rate(config, step, self.steps_per_epoch)
            set_learning_rate(self.optimizer, lr)
            if config.train.weight_decay_end >= 0:
                set_weight_decay(self.optimizer,
                                 weight_decay(config, step, self.steps_per_epoch))
            if self.profiler is not None:
                self.profiler.before_step(step)
            output = training_step(method, self.optimizer, batch, self.generator,
                                   step / self.total_steps, backward=fabric.backward,
                                   channels_last=config.train.channels_last,
                                   skip_nonfinite=config.train.on_nonfinite == "skip",
                                   clip_gradients=self.clip_gradients,
                                   scaled_gradients=self.scaled_gradients)
            logs = dict(output.logs)
            if output.skipped:
                self.state["skipped_steps"] += 1
            elif (self.probe is not None and output.features is not None
                    and self._any_labelled(batch.labels)):
                self.probe_trained = True
                # The mean over this process's labelled images (the sum over none is 0, not
                # the NaN of a mean over none, when another process holds the labels).
                labelled = (batch.labels != UNLABELED).sum().clamp(min=1)
                probe_loss = F.cross_entropy(self.probe(output.features), batch.labels,
                                             ignore_index=UNLABELED, reduction="sum") / labelled
                fabric.backward(probe_loss)
                self.probe_optimizer.step()
                self.probe_optimizer.zero_grad(set_to_none=True)
                logs["probe_loss"] = probe_loss.detach()
            images_seen += batch.size * fabric.world_size
            self.state["step"] = step + 1
            if self.profiler is not None:
                self._report_profile(self.profiler.after_step(step + 1))
            progress.advance(task)
            if ((step + 1) % config.train.log_every == 0 or step + 1 == self.total_steps
                    or (step + 1) % self.steps_per_epoch == 0):
                self._add_collapse_monitor(output, logs)
                self._log_step(step + 1, lr, logs, progress, task)
            every = config.train.checkpoint_every_steps
            if (every and (step + 1) % every == 0 and (step + 1) % self.steps_per_epoch
                    and step + 1 < self.total_steps):
                self._flush_log(progress, task)
                self.save_checkpoint("last.ckpt")
            if step + 1 < self.total_steps and self._stop_requested(step + 1):
                stopping = True
                break
        self._flush_log(progress, task)  # before any checkpoint: a NaN loss is caught first
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)
        self.train_seconds += time.perf_counter() - start
        self.train_images += images_seen
        return stopping

    def _any_labelled(self, labels: torch.Tensor) -> bool:
        """Whether any process's batch holds a labelled image, so the online probe has
        something to learn from. Read on the host, and agreed on under DDP (every process
        skips the same probe steps), so only training sets with unlabelled images (STL-10
        mixes 100k of them with its 5k labelled ones) pay for it."""
        if not self.unlabelled_in_train:
            return True
        found = (labels != UNLABELED).any().float()
        if self.fabric.world_size > 1:
            found = self.fabric.all_reduce(found, reduce_op="max")
        return bool(found > 0)

    def _report_profile(self, summary: dict | None) -> None:
        if summary is None:
            return
        busy = summary["busy_fraction"]
        self.say(f"Profiled {summary['steps']} steps from step {summary['first_step']}: busy "
                 f"{'n/a' if busy is None else f'{100 * busy:.1f}%'} of the window "
                 f"({summary['busy_of']}); trace in {self.profiler.out_dir}.")

    def _add_collapse_monitor(self, output, logs: dict[str, torch.Tensor]) -> None:
        """The spread of the step's backbone features and projector outputs
        (:mod:`mixmask.eval.collapse`), as device tensors read with the other scalars."""
        for name, embeddings in (("feature_std", output.features),
                                 ("embedding_std", output.embedding)):
            if embeddings is not None and len(embeddings) > 1:
                logs[name] = embedding_std(embeddings)
                self.collapse.dims.setdefault(name, embeddings.flatten(1).shape[1])

    def _log_step(self, step: int, lr: float, logs: dict[str, torch.Tensor], progress,
                  task) -> None:
        """Queue a step's scalars: on CUDA they are copied to the host asynchronously and
        read at the next logging step (or the epoch's end), so logging never stalls the
        device; the previous queued row is written now."""
        names = [*logs, _STATE_FINITE]
        values = torch.stack([*(logs[name].detach().float() for name in logs),
                              self._state_finite().float()])
        ready = None
        if values.device.type == "cuda":
            values = values.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._flush_log(progress, task)
        self._pending_log = (step, lr, names, values, ready)

    def _flush_log(self, progress=None, task=None) -> None:
        """Write the queued row, if any; a non-finite loss stops the run here."""
        if self._pending_log is None:
            return
        step, lr, names, values, ready = self._pending_log
        self._pending_log = None
        if ready is not None:
            ready.synchronize()
        row = dict(zip(names, values.tolist(), strict=True))
        state_finite = row.pop(_STATE_FINITE) == 1.0
        # The loss first: a non-finite loss is usually why the weights went too. Only the
        # loss terms: an fp16 overflow step logs an infinite grad_norm that the GradScaler
        # handles (it skips that update), and non-finite weights are the state flag's.
        losses = [value for name, value in row.items() if name.startswith("loss")]
        if (self.config.train.on_nonfinite == "stop"
                and not all(math.isfinite(value) for value in losses)):
            raise self._diverged(step, f"the loss became {row.get('loss')}")
        if not state_finite:
            raise self._diverged(step, "the weights or buffers hold NaN or infinity")
        epoch = round(step / self.steps_per_epoch, 3)  # fractional: where in the schedule
        self.metrics.log({"step": step, "epoch": epoch, "lr": lr, **row})
        self._watch_collapse({"step": step, **row})
        if progress is not None:
            progress.update(task, status=f"loss {row['loss']:.3f}")

    def _watch_collapse(self, row: dict[str, Any]) -> None:
        warning = self.collapse.add(row["step"], row)
        if warning and self.fabric.is_global_zero:
            self.say(warning)

    def _state_finite(self) -> torch.Tensor:
        """0-dim bool on the device: every saved tensor finite, on every process."""
        finite = all_finite(self.state_tensors).to(self.fabric.device)
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite.float(), reduce_op="min") == 1.0
        return finite

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        if self.last_good is None:
            where = ("No checkpoint had been saved yet, so nothing is kept; lower train.lr, use "
                     "train.precision=32, set train.on_nonfinite=skip, or check the data, then "
                     "start again (delete the run folder or choose another out_dir).")
        else:
            path, good_step = self.last_good
            where = (f"The last good checkpoint is {path} (step {good_step}); lower train.lr, "
                     "use train.precision=32, set train.on_nonfinite=skip, or check the data, "
                     "then continue with resume=auto.")
        return TrainingDiverged(f"training diverged by step {step}: {what}. {where}")

    def _end_of_epoch(self, epoch: int, progress, task) -> None:
        config = self.config
        row: dict[str, Any] = {"step": self.state["step"], "epoch": epoch}
        last = epoch == config.train.epochs or self.state["step"] >= self.total_steps
        if self.eval_data is not None and (config.monitor.knn or self.probe_trained) and (
                epoch % config.monitor.knn_every == 0 or last) and self.fabric.is_global_zero:
            # Decoded by loader workers (as at the end of the run): in the main process, a
            # GPU run's monitor would take about as long as its training epoch.
            row.update(evaluate(self.method.module, self.eval_data, config, self.fabric.device,
                                knn=config.monitor.knn, linear=False,
                                probe=self.probe.module if self.probe_trained else None,
                                num_workers=min(config.data.num_workers, 2),
                                show_progress=config.train.progress_bar, progress=progress))
        if self.train_seconds > 0:
            row["images_per_s"] = self.train_images / self.train_seconds
        # Wall time since the run started (data loading, training, monitors): time-to-accuracy.
        row["wall_time_s"] = self.elapsed_before + time.perf_counter() - self.started
        self.last_epoch_metrics = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        self.metrics.log(row)
        self._watch_collapse(row)
        shown = ", ".join(f"{key} {value:.1f}" if abs(value) >= 1 else f"{key} {value:.3g}"
                          for key, value in row.items() if key not in ("step", "epoch"))
        if self.fabric.is_global_zero:
            progress.console.print(f"epoch {epoch}: {shown}")
        every = config.train.checkpoint_every
        if every and epoch % every == 0:
            self.save_checkpoint(f"epoch={epoch}.ckpt")
        self.save_checkpoint("last.ckpt")

    def save_checkpoint(self, name: str) -> None:
        """Save the run's state; never from a non-finite state (then the run stops)."""
        fabric = self.fabric
        if not bool(self._state_finite()):
            raise self._diverged(self.state["step"],
                                 "the weights or buffers hold NaN or infinity")
        content = {
            "method": self.method.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.state["epoch"], "step": self.state["step"],
            "skipped_steps": self.state["skipped_steps"],
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(), "versions": versions(),
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.started,
        }
        own_state = rank_state(self.method.module, self.generator)
        if fabric.world_size > 1:  # every process's random streams, for an exact resume
            rank_states = [None] * fabric.world_size
            torch.distributed.all_gather_object(rank_states, own_state)
        else:
            rank_states = [own_state]
        content["rank_states"] = rank_states
        if self.probe is not None:
            content["probe"] = self.probe.module.state_dict()
            content["probe_optimizer"] = self.probe_optimizer.state_dict()
        if fabric.is_global_zero:
            kept = (f"the last good checkpoint, {self.last_good[0]} (step {self.last_good[1]}), "
                    "is intact" if self.last_good else "no earlier checkpoint exists")
            write_checkpoint(content, self.checkpoint_dir / name, step=self.state["step"],
                             kept=kept)
        self.last_good = (self.checkpoint_dir / name, self.state["step"])
        fabric.barrier()

    def _skipped_files(self) -> list[str]:
        """The training split's unreadable files: left out when loading, or met by the
        DataLoader workers (flags in shared memory, merged over DDP processes, which read
        different files)."""
        if self.train_set is None:
            return []
        flags = self.train_set.read_failures
        if flags is not None and self.fabric.world_size > 1:
            flags = self.fabric.all_reduce(flags.to(self.fabric.device, torch.float32),
                                           reduce_op="max")
        return self.train_set.skipped_files(flags)

    def finish(self) -> dict[str, Any] | None:
        config, fabric = self.config, self.fabric
        bad_files = self._skipped_files()
        summary: dict[str, Any] = {
            "method": config.method.name,
            "masking": config.method.axis.masking if config.method.axis is not None else "none",
            "dataset": config.data.dataset, "backbone": config.model.backbone,
            "epochs": self.state["epoch"], "steps": self.state["step"], "seed": config.train.seed,
        }
        summary.update(self.last_epoch_metrics)
        if self.eval_data is not None and fabric.is_global_zero and (
                config.eval.knn or config.eval.linear):
            self.say("Evaluating the pretrained backbone...")
            workers = min(config.data.num_workers, 2)
            summary.update(evaluate(self.method.module, self.eval_data, config, fabric.device,
                                    knn=config.eval.knn, linear=config.eval.linear,
                                    num_workers=workers,
                                    show_progress=config.train.progress_bar))
            if config.eval.compare_random_init:
                self.say("Evaluating the randomly initialised backbone (same seed)...")
                torch.manual_seed(config.train.seed)
                random_method = build_method(config, self.pixel_stats).to(fabric.device)
                random = evaluate(random_method, self.eval_data, config, fabric.device,
                                  knn=config.eval.knn, linear=config.eval.linear,
                                  num_workers=workers,
                                  show_progress=config.train.progress_bar)
                summary.update({f"{key}_random_init": value for key, value in random.items()})
        summary["wall_time_s"] = self.elapsed_before + time.perf_counter() - self.started
        summary["images_per_s"] = (self.train_images / self.train_seconds
                                   if self.train_seconds else None)
        summary["skipped_steps"] = self.state["skipped_steps"]
        if "test_feature_std" in summary:  # the end-of-run evaluation's test features
            self._watch_collapse({"step": self.state["step"],
                                  "test_feature_std": summary["test_feature_std"]})
        summary.update({name: self.collapse.last[name] for name in self.collapse.last})
        summary["collapsed"] = self.collapse.collapsed
        summary["collapse_dims"] = dict(self.collapse.dims)  # d of 1/sqrt(d), the spread
        summary["bad_images"] = len(bad_files)
        summary["bad_image_files"] = bad_files[:100]
        if bad_files:
            self.say(f"Warning: {len(bad_files)} unreadable image files were skipped (e.g. "
                     f"{bad_files[0]}); summary.json lists them under bad_image_files.")
        summary["versions"] = versions()
        summary["device"] = device_name(fabric.device)
        summary["precision"] = self.config.train.precision  # as resolved (train.precision=auto)
        summary["world_size"] = fabric.world_size
        if self.profiler is not None and self.profiler.summary is not None:
            summary["profile"] = self.profiler.summary
        if not fabric.is_global_zero:
            return None  # other DDP processes report nothing
        write_summary(Path(config.out_dir), summary)
        return summary
