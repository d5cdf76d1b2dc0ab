"""Linear classifiers on a frozen backbone: two protocols.

``moco`` (``mixmask linear --protocol moco``): MoCo's ``main_lincls.py`` (He et al. 2020,
sec. 4.1), which the MixMask paper's linear evaluation follows: the backbone frozen with
BN in eval mode, each epoch's training images freshly augmented (RandomResizedCrop + flip;
CIFAR: pad-crop-flip), a linear layer initialised N(0, 0.01) with zero bias on the raw
features, SGD lr 30, momentum 0.9, weight decay 0, 100 epochs with x0.1 steps at 60 and 80
(per epoch, as ``adjust_learning_rate`` there), centre-crop test after every epoch.

``cached`` (``--protocol cached``, and the end-of-pretraining probe): centre-crop features
extracted once, no per-epoch augmentation: minutes instead of hours, at a small cost in
accuracy. Features are standardised with the training set's mean and std (like MAE's
affine-free BN before the classifier), so one learning rate (0.1) works for every backbone
width, where MoCo's raw-feature lr 30 suits only some methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmask.eval.accuracy import EpochRecord, topk_accuracy
from mixmask.eval.data import AugmentedLabelled, EpochBatches, train_loader


def _milestone_epochs(epochs: int, milestones: tuple[float, ...]) -> list[int]:
    return [int(fraction * epochs) for fraction in milestones]


def _init_like_moco(classifier: nn.Linear) -> nn.Linear:
    # main_lincls.py: fc.weight ~ N(0, 0.01), fc.bias = 0.
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


def train_linear_probe(train_features: Tensor, train_labels: Tensor, *, num_classes: int,
                       epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                       milestones: tuple[float, ...] = (0.6, 0.8), seed: int = 0,
                       test_features: Tensor | None = None, test_labels: Tensor | None = None,
                       record: EpochRecord | None = None) -> nn.Module:
    """Train a linear classifier (with the standardisation folded in) on cached features;
    with test features and a ``record``, the test top-1/top-5 of every epoch go into it."""
    device = train_features.device
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    inputs = (train_features - mean) / std
    classifier = nn.Linear(inputs.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-inputs.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [int(f * epochs * steps_per_epoch) for f in milestones], gamma=0.1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator).to(device)
        for start in range(0, inputs.shape[0], batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(inputs[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if record is not None and test_features is not None:
            with torch.no_grad():
                scores = classifier((test_features - mean) / std)
            accuracy = topk_accuracy(scores, test_labels)
            record.add(epoch + 1, accuracy[1], accuracy[5])
    with torch.no_grad():  # fold the standardisation into the classifier
        folded = nn.Linear(inputs.shape[1], num_classes).to(device)
        folded.weight.copy_(classifier.weight / std)
        folded.bias.copy_(classifier.bias - (classifier.weight * (mean / std)).sum(dim=1))
    return folded


@torch.no_grad()
def accuracy(classifier: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (classifier(features).argmax(dim=1) == labels).float().mean().item()


def linear_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                test_labels: Tensor, *, num_classes: int, **probe_options) -> float:
    classifier = train_linear_probe(train_features, train_labels, num_classes=num_classes,
                                    **probe_options)
    return accuracy(classifier, test_features, test_labels)


def state_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer (BN running statistics included)."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()
            if torch.is_tensor(value)}


def changed_tensors(module: nn.Module, snapshot: dict[str, Tensor]) -> list[str]:
    """Names of the tensors of ``module`` that differ, bit for bit, from ``snapshot``."""
    return [name for name, value in module.state_dict().items()
            if torch.is_tensor(value) and not torch.equal(value, snapshot[name])]


def linear_moco(encoder: nn.Module, encode: Callable[[Tensor], Tensor],
                train_set: AugmentedLabelled,
                test_features: Tensor, test_labels: Tensor, *, feature_dim: int,
                num_classes: int, epochs: int, lr: float, weight_decay: float,
                batch_size: int, milestones: tuple[float, ...], seed: int,
                device: torch.device, num_workers: int = 0, batchnorm: bool = False,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                progress: Callable[[int], None] | None = None) -> EpochRecord:
    """MoCo's linear protocol; returns the test top-1/top-5 of every epoch.

    batchnorm: a BatchNorm without affine parameters (eps 1e-6) before the linear layer,
    batch statistics in training and running ones at test time: MAE's ``main_linprobe.py``
    head, which SiameseIM's linear probe keeps (ViT features differ in scale per channel).

    encoder: the frozen network (put in eval mode here, and checked unchanged after);
    encode: images -> features [B, feature_dim] (e.g. ``method.features``);
    train_set: the labelled training images with their augmentation, drawn anew each epoch
        (seeded per (seed, epoch, image): the same on every run and worker count);
    test_features: the centre-crop test features, extracted once (the backbone is frozen
        in eval mode, so they are the same every epoch).
    on_epoch(epoch, {"top1", "top5", "loss"}) after each epoch; progress(images) per batch.
    """
    was_training = encoder.training
    encoder.eval()
    frozen = [param for param in encoder.parameters() if param.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    before = state_snapshot(encoder)
    torch.manual_seed(seed)
    classifier: nn.Module = _init_like_moco(nn.Linear(feature_dim, num_classes))
    if batchnorm:
        classifier = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6),
                                   classifier)
    classifier = classifier.to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    steps = _milestone_epochs(epochs, milestones)
    batches = EpochBatches(len(train_set), batch_size, seed=seed)
    loader = train_loader(train_set, batches, num_workers=num_workers,
                          pin_memory=device.type == "cuda")
    record = EpochRecord()
    try:
        for epoch in range(epochs):
            # MoCo's adjust_learning_rate: lr x 0.1 for each milestone epoch passed.
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1 ** sum(epoch >= step for step in steps)
            batches.set_epoch(epoch)
            classifier.train()
            loss_sum, seen = torch.zeros((), device=device), 0
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                with torch.no_grad():
                    features = encode(images).float()
                loss = F.cross_entropy(classifier(features), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(labels)
                seen += len(labels)
                if progress is not None:
                    progress(len(labels))
            classifier.eval()
            with torch.no_grad():
                scores = classifier(test_features)
            accuracy = topk_accuracy(scores, test_labels)
            record.add(epoch + 1, accuracy[1], accuracy[5])
            if on_epoch is not None:
                on_epoch(epoch + 1, {"top1": accuracy[1], "top5": accuracy[5],
                                     "loss": (loss_sum / max(seen, 1)).item()})
    finally:
        for param in frozen:
            param.requires_grad_(True)
        encoder.train(was_training)
    changed = changed_tensors(encoder, before)
    if changed:  # a frozen-backbone protocol that moved the backbone is a bug, never a result
        raise RuntimeError(f"the linear protocol changed the frozen backbone ({changed[:3]}).")
    return record
