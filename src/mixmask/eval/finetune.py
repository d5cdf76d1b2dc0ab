"""Finetuning the whole network with a linear classifier: semi-supervised (1% / 10% of the
labels) and full (100%), from the pretrained backbone or, for the baseline, from the
random init of the same seed.

The recipe is Barlow Twins' ``evaluate.py --weights finetune`` (Zbontar et al. 2021,
sec. 4 and its README's semi-supervised commands), the semi-supervised protocol of the
papers the MixMask paper compares with (its own code is unreleased): SGD with momentum
0.9, one lr for the head (0.5) and one for the backbone (0.002), weight decay 0, cosine
decay per epoch over 20 epochs, batch 256, BN in train mode, RandomResizedCrop + flip
(CIFAR: pad-crop-flip), the head initialised N(0, 0.01) with zero bias, the centre-crop
test after every epoch (evaluate.py reports the best epoch; we report the last and the
best, and say which is which).

Training runs on Fabric (devices, precision, DDP) through :func:`mixmask.train.step.training_step`,
as pretraining does; the state is saved at every epoch's end, every
``train.checkpoint_every_steps`` steps and on a stop signal, and the same command
continues it exactly (the batches and augmentation are a pure function of seed, epoch and
image).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mixmask.data.batch import Batch
from mixmask.errors import ConfigError, MixmaskError
from mixmask.eval.accuracy import EpochRecord, topk_accuracy
from mixmask.eval.data import AugmentedLabelled, EpochBatches, train_loader
from mixmask.methods.protocol import StepOutput
from mixmask.ops.mixing import sample_unmix
from mixmask.ops.optim import layer_decay_lr_scale, no_decay_bias_norm_and_tokens
from mixmask.ops.optim import parameter_groups as named_groups
from mixmask.ops.tensors import all_finite
from mixmask.runs.checkpoint import (
    check_same_settings,
    load_optimizer_state,
    load_state,
    read_checkpoint,
    save_on_rank_zero,
)
from mixmask.train.schedule import cosine_epoch_lr, warmup_cosine_lr
from mixmask.train.step import training_step


def mix_for_classification(images: Tensor, labels: Tensor, num_classes: int, *,
                           mixup_alpha: float, cutmix_alpha: float, smoothing: float,
                           generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mixup / CutMix of a labelled batch with soft targets: timm's ``Mixup`` as MAE's
    finetuning runs it (``mode="batch"``, ``switch_prob=0.5``, ``mix_prob=1``,
    ``correct_lam=True``). One draw per batch: with both alphas positive, CutMix or Mixup
    with probability 1/2 each; ``lam ~ Beta(alpha, alpha)`` of the chosen one; the partner
    is the reversed batch (timm's ``x.flip(0)``); CutMix's ``lam`` is corrected to the kept
    area. Targets are ``lam * y + (1 - lam) * y[partner]`` with label-smoothed one-hots
    ``y`` (``smoothing / K`` off, ``1 - smoothing + smoothing / K`` on).

    The pixels come from :func:`mixmask.ops.mixing.sample_unmix` (Un-Mix uses the same two
    mixes with the same box rule); returns ``(mixed images, targets [B, K])``."""

    if mixup_alpha > 0 and cutmix_alpha > 0:
        # One host read per step, to pick the alpha the draw uses.
        use_cutmix = bool(torch.rand((), generator=generator, device=generator.device) < 0.5)
    else:
        use_cutmix = cutmix_alpha > 0
    drawn = sample_unmix(images, generator=generator, p_mixup=0.0 if use_cutmix else 1.0,
                         alpha=cutmix_alpha if use_cutmix else mixup_alpha)
    off = smoothing / num_classes
    one_hot = torch.full((len(labels), num_classes), off, device=images.device)
    one_hot.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    lam = drawn.lam[:, None].to(one_hot.dtype)
    return drawn.mixed_images, lam * one_hot + (1 - lam) * one_hot[drawn.partner_index]


class Classifier(nn.Module):
    """A backbone and a linear head; its forward is a training step (cross-entropy on the
    batch's first view), so :func:`mixmask.train.step.training_step` and Fabric drive it as they
    drive a pretraining method.

    ``head_std``: the head's init, N(0, 0.01) (Barlow Twins' evaluate.py) or MAE's
    trunc_normal(std=2e-5) (``main_finetune.py``); the bias is 0 in both. With
    ``mixup_alpha`` or ``cutmix_alpha`` the loss is the soft-target cross-entropy of
    :func:`mix_for_classification` (batches of one image are left unmixed);
    ``label_smoothing`` applies either way."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *,
                 head_std: float = 0.01, truncated: bool = False, label_smoothing: float = 0.0,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        if truncated:
            nn.init.trunc_normal_(self.head.weight, std=head_std)
        else:
            nn.init.normal_(self.head.weight, mean=0.0, std=head_std)
        nn.init.zeros_(self.head.bias)

    def scores(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def forward(self, batch: Batch, generator: torch.Generator | None = None,
                progress: float = 0.0) -> StepOutput:
        images, labels = batch.views[0], batch.labels
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and len(labels) > 1:
            if generator is None:
                raise ValueError("Mixup / CutMix needs the step's generator.")
            images, targets = mix_for_classification(
                images, labels, self.num_classes, mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha, smoothing=self.label_smoothing,
                generator=generator)
            loss = F.cross_entropy(self.scores(images).float(), targets)
        else:
            loss = F.cross_entropy(self.scores(images).float(), labels,
                                   label_smoothing=self.label_smoothing)
        return StepOutput(loss, {"loss": loss.detach()})


def parameter_groups(classifier: Classifier, *, lr_backbone: float, lr_head: float,
                     recipe: str = "sgd", weight_decay: float = 0.0, layer_decay: float = 1.0,
                     min_lr: float = 0.0) -> list[dict[str, Any]]:
    """The optimizer's groups, each with its peak ``base_lr`` and its ``min_lr``.

    ``"sgd"`` (Barlow Twins): the head at ``lr_head``, the backbone at ``lr_backbone``,
    weight decay on every parameter (evaluate.py's single ``weight_decay``).
    ``"mae"`` (``main_finetune.py`` + ``util/lr_decay.py: param_groups_lrd``): one lr
    (``lr_head`` is the peak; the caller passes blr x batch / 256), no weight decay on 1-D
    parameters and tokens. Either way ``layer_decay < 1`` scales a ViT's groups by
    ``layer_decay ** (depth + 1 - layer id)`` (BEiT / MAE: embeddings 0, block i at i + 1,
    final norm and head at depth + 1), the floor too (MAE scales ``min_lr`` with the group).
    """

    scale = None
    if layer_decay != 1.0:
        depth = getattr(classifier.backbone, "depth", None)
        if depth is None:
            raise ConfigError("layer-wise lr decay needs a ViT backbone (its blocks).")
        scale = layer_decay_lr_scale(depth, layer_decay)
    if recipe == "mae":
        groups = named_groups(classifier.named_parameters(),
                              exclude_from_decay=no_decay_bias_norm_and_tokens, lr_scale=scale)
        peaks = {id(group): lr_head for group in groups}
    else:
        head = named_groups(classifier.head.named_parameters(prefix="head"))
        body = named_groups(classifier.backbone.named_parameters(prefix="backbone"),
                            lr_scale=scale)
        groups = [*head, *body]
        peaks = {**{id(group): lr_head for group in head},
                 **{id(group): lr_backbone for group in body}}
    out = []
    for group in groups:
        lr = peaks[id(group)] * group.pop("lr_scale")
        group.setdefault("weight_decay", weight_decay)
        group.pop("param_names")
        group.update(base_lr=lr, lr=lr, min_lr=min_lr * lr / peaks[id(group)] if lr else 0.0)
        out.append(group)
    return out


@torch.no_grad()
def test_accuracy(model: Classifier, test_set: Dataset, *, device: torch.device,
                  batch_size: int = 256, num_workers: int = 0,
                  autocast: Callable[[], Any] | None = None) -> dict[int, float]:
    """Top-1 / top-5 (percent) of ``model`` on ``test_set`` in eval mode (then back)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(test_set, batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    scores, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if autocast is not None:
                with autocast():
                    scores.append(model.scores(images).float())
            else:
                scores.append(model.scores(images).float())
            labels.append(targets.to(device))
    finally:
        model.train(was_training)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def _has_drop_path(model: nn.Module) -> bool:
    return any(type(module).__name__ == "DropPath" for module in model.modules())


class FinetuneStopped(MixmaskError):
    """A stop signal ended finetuning at a step boundary; the state was saved."""


@dataclass(frozen=True)
class FinetuneSchedule:
    """A finetuning recipe's optimisation: ``recipe`` ``"sgd"`` (SGD momentum 0.9, the lr
    set once per epoch on a cosine) or ``"mae"`` (AdamW (0.9, 0.999), the lr set every step
    by :func:`~mixmask.train.schedule.warmup_cosine_lr`, ``lr_head`` the peak, from
    ``warmup_epochs`` down to ``min_lr``); see :func:`parameter_groups` for
    ``layer_decay``."""

    epochs: int
    batch_size: int
    lr_backbone: float
    lr_head: float
    weight_decay: float
    seed: int
    recipe: str = "sgd"
    layer_decay: float = 1.0
    min_lr: float = 0.0
    warmup_epochs: float = 0.0


def finetune(*, fabric: Fabric, classifier: Classifier, train_set: AugmentedLabelled,
             test_set: Dataset, schedule: FinetuneSchedule, checkpoint_path: Path,
             settings: dict[str, Any], num_workers: int = 0, checkpoint_every_steps: int = 0,
             stop=None, say: Callable[[str], None] = print,
             progress: Callable[[int], None] | None = None,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None
             ) -> tuple[EpochRecord, float]:
    """Finetune ``classifier`` as ``schedule`` says (resuming from ``checkpoint_path``
    when it holds the same ``settings``); returns the test record of every epoch and the
    wall time spent, resumed parts included. ``stop.received`` (a signal name) ends it at
    the next step boundary, saved, with :class:`FinetuneStopped`."""
    run = _Finetune(fabric, classifier, train_set, schedule, checkpoint_path, settings,
                    num_workers=num_workers, say=say)
    while run.state["step"] < run.total_steps:
        epoch = run.train_epoch(stop, checkpoint_every_steps, progress)
        accuracy = {1: 0.0, 5: 0.0}
        if fabric.is_global_zero:
            autocast = getattr(fabric, "autocast", None)
            accuracy = test_accuracy(run.model.module, test_set, device=fabric.device,
                                     num_workers=num_workers, autocast=autocast)
        accuracy = fabric.broadcast(accuracy, src=0)
        run.record.add(epoch + 1, accuracy[1], accuracy[5])
        if on_epoch is not None:
            on_epoch(epoch + 1, {"top1": accuracy[1], "top5": accuracy[5]})
        run.save()
        if stop is not None and stop.received is not None and (
                run.state["step"] < run.total_steps):
            raise FinetuneStopped(
                f"stopped by {stop.received} after epoch {epoch + 1} of {schedule.epochs}; "
                f"saved {checkpoint_path}. Run the same command again to continue.")
    return run.record, run.state["wall_time_s"] + time.perf_counter() - run.started


def _build_optimizer(classifier: Classifier, schedule: FinetuneSchedule
                     ) -> torch.optim.Optimizer:
    groups = parameter_groups(classifier, lr_backbone=schedule.lr_backbone,
                              lr_head=schedule.lr_head, recipe=schedule.recipe,
                              weight_decay=schedule.weight_decay,
                              layer_decay=schedule.layer_decay, min_lr=schedule.min_lr)
    if schedule.recipe == "mae":
        return torch.optim.AdamW(groups, lr=schedule.lr_head, betas=(0.9, 0.999),
                                 weight_decay=schedule.weight_decay)
    return torch.optim.SGD(groups, lr=schedule.lr_head, momentum=0.9,
                           weight_decay=schedule.weight_decay)


class _Finetune:
    """One finetuning run's state: the Fabric-wrapped model and optimizer, the batches,
    the step counter and history (resumed from the checkpoint), and saving."""

    def __init__(self, fabric: Fabric, classifier: Classifier, train_set: AugmentedLabelled,
                 schedule: FinetuneSchedule, checkpoint_path: Path, settings: dict[str, Any],
                 *, num_workers: int, say: Callable[[str], None]):
        self.fabric, self.schedule = fabric, schedule
        self.checkpoint_path, self.settings = checkpoint_path, settings
        self.model, self.optimizer = fabric.setup(classifier,
                                                  _build_optimizer(classifier, schedule))
        self.batches = EpochBatches(len(train_set), schedule.batch_size, seed=schedule.seed,
                                    rank=fabric.global_rank, world_size=fabric.world_size)
        self.loader = train_loader(train_set, self.batches, num_workers=num_workers,
                                   pin_memory=fabric.device.type == "cuda")
        self.steps_per_epoch = self.batches.batches_per_epoch
        self.total_steps = schedule.epochs * self.steps_per_epoch
        self.state = {"step": 0, "history": [], "wall_time_s": 0.0}
        if checkpoint_path.is_file():
            _resume(checkpoint_path, settings, self.model, self.optimizer, self.state)
            say(f"Resumed {checkpoint_path} at step {self.state['step']} of "
                f"{self.total_steps}.")
        self.record = EpochRecord(list(self.state["history"]))
        self.started = time.perf_counter()
        self.state_tensors = [tensor for tensor in (*self.model.parameters(),
                                                    *self.model.buffers())
                              if tensor.is_floating_point()]
        self.generator = torch.Generator(device=fabric.device).manual_seed(schedule.seed)
        self.drop_path = _has_drop_path(self.model)

    def train_epoch(self, stop, checkpoint_every_steps: int,
                    progress: Callable[[int], None] | None) -> int:
        """Train to the end of the current epoch (from a resumed step within it); returns
        the epoch's index. A stop signal saves and raises :class:`FinetuneStopped`."""
        fabric, schedule, optimizer, state = (self.fabric, self.schedule, self.optimizer,
                                              self.state)
        epoch, start_batch = divmod(state["step"], self.steps_per_epoch)
        if schedule.recipe == "sgd":
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(group["base_lr"], epoch, schedule.epochs)
        self.batches.set_epoch(epoch, start_batch)
        self.model.train()
        for images, labels in self.loader:
            batch = Batch.from_views(images.to(fabric.device, non_blocking=True),
                                     labels=labels.to(fabric.device, non_blocking=True))
            if schedule.recipe == "mae":
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(
                        group["base_lr"], group["min_lr"], state["step"] / self.steps_per_epoch,
                        warmup_epochs=schedule.warmup_epochs, epochs=schedule.epochs)
            # The step's draws (Mixup / CutMix from the generator; drop-path, which timm
            # draws from torch's global generators) are a function of (seed, step), so a
            # resumed finetune draws what the uninterrupted one drew.
            step_seed = schedule.seed * 1_000_003 + state["step"]
            self.generator.manual_seed(step_seed)
            if self.drop_path:
                torch.manual_seed(step_seed)
            training_step(self.model, optimizer, batch, self.generator,
                          state["step"] / self.total_steps, backward=fabric.backward)
            state["step"] += 1
            if progress is not None:
                progress(len(labels) * fabric.world_size)
            at_epoch_end = state["step"] % self.steps_per_epoch == 0
            if stop is not None and stop.received is not None and not at_epoch_end:
                self.save()
                raise FinetuneStopped(
                    f"stopped by {stop.received} after step {state['step']} of "
                    f"{self.total_steps}; saved {self.checkpoint_path}. Run the same command "
                    "again to continue exactly where it stopped.")
            if (checkpoint_every_steps and state["step"] % checkpoint_every_steps == 0
                    and not at_epoch_end):
                self.save()
        return epoch

    def save(self) -> None:
        """The finetune checkpoint, written atomically; never from a non-finite state."""
        state, path = self.state, self.checkpoint_path
        if not bool(all_finite(self.state_tensors)):
            raise MixmaskError(
                f"finetuning diverged by step {state['step']}: the weights hold NaN or "
                f"infinity, so nothing was saved; lower eval.finetune_lr_backbone / "
                f"eval.finetune_lr_head or use train.precision=32 (the last good state is "
                f"{path if path.is_file() else 'none'}).")
        content = {"classifier": self.model.module.state_dict(),
                   "optimizer": self.optimizer.state_dict(), "step": state["step"],
                   "history": self.record.history, "settings": self.settings,
                   "wall_time_s": state["wall_time_s"] + time.perf_counter() - self.started}
        save_on_rank_zero(content, path, is_global_zero=self.fabric.is_global_zero,
                          where=f"step {state['step']}")
        self.fabric.barrier()


def _resume(path: Path, settings: dict[str, Any], model, optimizer, state: dict) -> None:
    checkpoint = read_checkpoint(path, required=("classifier", "optimizer", "step", "history"),
                                 other="delete it to finetune from the start",
                                 what="mixmask finetune checkpoint")
    check_same_settings(checkpoint.get("settings", {}), settings, path.parent, "finetune")
    load_state(model.module, checkpoint["classifier"], path)
    load_optimizer_state(optimizer, checkpoint["optimizer"], path)
    state.update(step=checkpoint["step"], history=checkpoint["history"],
                 wall_time_s=checkpoint.get("wall_time_s", 0.0))
