"""SiameseIM as a method (ViT, and our ConvNet variant): the masks, the predictor's inputs,
the EMA target, UniGrad under two gloo processes, learning on real CIFAR images, and a run
through `mixmask pretrain` that every evaluation protocol reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data import preset_views, view_transform
from mixmask.data.batch import Batch
from mixmask.data.datasets import load_image_set
from mixmask.methods import PixelStats, build_method
from mixmask.ops.losses.unigrad import unigrad_loss
from mixmask.ops.optim import build_optimizer
from mixmask.train.loop import pretrain
from mixmask.train.step import training_step

VIT = ["method.siameseim.projector_depth=1", "method.siameseim.predictor_depth=1",
       "data.root=/nonexistent"]
R18 = [*VIT, "model.width=0.25"]
STATS = PixelStats((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _method(recipe: str, *overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(f"configs/cifar10/{recipe}.yaml", list(overrides)), STATS)


def _full_crop_batch(views: list[torch.Tensor]) -> Batch:
    batch = views[0].shape[0]
    box = torch.tensor([[0, 0, 32, 32]] * batch)
    flips = torch.zeros(batch, dtype=torch.bool)
    return Batch(views, torch.full((batch,), -1), [box, box.clone()], [flips, flips.clone()])


@pytest.mark.parametrize("recipe, overrides, grid, masked", [
    ("siameseim_vit_tiny", VIT, 8, 38),
    ("siameseim_r18", R18, 4, 10),
])
def test_every_sample_masks_the_same_count(recipe, overrides, grid, masked):
    method = _method(recipe, *overrides)
    assert (method.grid, method.masked_count) == (grid, masked)
    mask = method.sample_mask(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert mask.shape == (16, grid * grid) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [masked] * 16
    assert len({tuple(row.tolist()) for row in mask}) > 1  # per sample, not one for all


def test_the_predictor_reads_cls_visible_tokens_and_one_query_per_view2_patch(monkeypatch):
    method = _method("siameseim_vit_tiny", *VIT).eval()
    seen = {}
    original = method.predictor.forward

    def spy(sequence):
        seen["shape"] = tuple(sequence.shape)
        return original(sequence)

    monkeypatch.setattr(method.predictor, "forward", spy)
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    mask = method.sample_mask(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    online, keep = method.online_tokens(views[0], mask, torch.Generator())
    # cls + the 26 visible patches of 64, in patch order.
    assert online.shape == (2, 1 + 26, 192) and keep.shape == (2, 26)
    assert torch.equal(keep, torch.stack([torch.nonzero(~row).flatten() for row in mask]))
    from mixmask.ops.relative_position import relative_position_embedding

    batch = _full_crop_batch(views)
    relative = relative_position_embedding(batch.boxes[0], batch.flips[0], batch.boxes[1],
                                           batch.flips[1], 8, 192)
    prediction = method.predict(online, keep, relative)
    assert seen["shape"] == (2, 1 + 26 + 64, 192) and prediction.shape == (2, 64, 192)


def test_the_target_is_the_ema_of_encoder_linear_and_projector_but_not_the_predictor():
    method = _method("siameseim_vit_tiny", *VIT)
    names = {name.split(".")[0] for name, _ in method.named_parameters()}
    assert {"target_backbone", "target_decoder_embed", "target_projector"} <= names
    assert not any(name.startswith("target_predictor") for name in names)
    assert not any(param.requires_grad for name, param in method.named_parameters()
                   if name.startswith("target_"))
    # The patch embedding stays at its random init (and so its copy).
    assert not method.backbone.patch_embed.proj.weight.requires_grad
    optimizer = build_optimizer("adamw", method.parameter_groups("adamw"), lr=1e-2,
                                weight_decay=0.05, betas=(0.9, 0.95))
    batch = _full_crop_batch([torch.randn(4, 3, 32, 32) for _ in range(2)])
    before = {name: param.detach().clone() for name, param in method.named_parameters()}
    output = method.training_step(batch, torch.Generator().manual_seed(0), 0.5)
    output.loss.backward()
    assert all(param.grad is None for name, param in method.named_parameters()
               if name.startswith("target_"))
    optimizer.step()
    momentum = 1 - 0.5 * (1 + 0) * (1 - 0.995)  # cosine at progress 0.5: cos(pi / 2) = 0
    method.after_optimizer_step(output, 0.5)
    online = dict(method.named_parameters())
    name = "blocks.0.attn.qkv.weight"
    expected = momentum * before[f"target_backbone.{name}"] + (1 - momentum) * online[
        f"backbone.{name}"].detach()
    assert torch.allclose(online[f"target_backbone.{name}"], expected, atol=1e-7)
    assert torch.equal(online["target_backbone.patch_embed.proj.weight"],
                       before["backbone.patch_embed.proj.weight"])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        inputs, targets, weight = _loss_problem()
        local = slice(3 * rank, 3 * rank + 3)

        def mean_over_processes(tensor):
            dist.all_reduce(tensor)
            return tensor / 2

        loss = unigrad_loss(inputs[local] @ weight, targets[local], all_reduce=mean_over_processes)
        loss.backward()
        gradient = weight.grad.clone()
        dist.all_reduce(gradient)  # what DDP does: the mean of the processes' gradients
        torch.save(gradient / 2, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _loss_problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 5, 8, generator=generator)
    targets = torch.randn(6, 5, 8, generator=generator)
    weight = torch.randn(8, 8, generator=generator).requires_grad_(True)
    return inputs, targets, weight


def test_two_gloo_processes_give_the_single_process_gradient_of_the_global_batch(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    from test_distributed import free_port

    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    inputs, targets, weight = _loss_problem()
    unigrad_loss(inputs @ weight, targets).backward()
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"rank{rank}.pt"), weight.grad, atol=1e-6)


def _real_batch(tarball, count: int = 16) -> tuple[Batch, PixelStats]:
    image_set = load_image_set("imagefolder", str(tarball), "train", subset=count)
    transforms = [view_transform(view, image_set.mean, image_set.std)
                  for view in preset_views("siameseim_cifar", 32)]
    torch.manual_seed(0)
    views, boxes, flips = [[], []], [[], []], [[], []]
    for index in range(count):
        image = image_set.load_pil(index)
        for view, transform in enumerate(transforms):
            tensor, box, flipped = transform(image)
            views[view].append(tensor)
            boxes[view].append(box)
            flips[view].append(flipped)
    batch = Batch([torch.stack(v) for v in views], torch.full((count,), -1),
                  [torch.tensor(b) for b in boxes], [torch.tensor(f) for f in flips])
    return batch, PixelStats(tuple(image_set.mean), tuple(image_set.std))


@pytest.mark.parametrize("recipe, overrides", [
    ("siameseim_vit_tiny", VIT),
    ("siameseim_r18", R18),
    ("siameseim_r18", [*R18, "method.siameseim.fill=mix"]),
])
def test_a_few_steps_on_a_repeated_real_batch_lower_the_loss(cifar10_tarball, recipe,
                                                             overrides):
    batch, stats = _real_batch(cifar10_tarball)
    torch.manual_seed(0)
    method = build_method(load_config(f"configs/cifar10/{recipe}.yaml", overrides), stats)
    optimizer = build_optimizer("adamw", method.parameter_groups("adamw"), lr=1e-3,
                                weight_decay=0.05, betas=(0.9, 0.95))
    losses = []
    for _ in range(10):
        # The same masks every step (both generators reseeded): a repeated batch.
        generator = torch.Generator().manual_seed(0)
        method.mask_generator.seeded = False
        losses.append(training_step(method, optimizer, batch, generator, 0.0).loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("recipe, extra", [
    ("siameseim_vit_tiny", ["method.siameseim.projector_depth=1",
                            "method.siameseim.predictor_depth=1"]),
    ("siameseim_r18", ["model.width=0.25", "method.siameseim.projector_depth=1",
                       "method.siameseim.predictor_depth=1"]),
])
def test_a_pretrain_run_is_complete_and_every_protocol_reads_it(tmp_path, cifar10_tarball,
                                                                recipe, extra, monkeypatch):
    import mixmask.eval.finetune as finetune

    finetuned = {}  # finetuning trains every weight, the ones frozen for pretraining too
    real_groups = finetune.parameter_groups

    def recording_groups(classifier, **kwargs):
        finetuned["frozen"] = [name for name, parameter in classifier.named_parameters()
                               if not parameter.requires_grad]
        return real_groups(classifier, **kwargs)

    monkeypatch.setattr(finetune, "parameter_groups", recording_groups)
    run = tmp_path / "run"
    summary = pretrain(load_config(f"configs/cifar10/{recipe}.yaml", [
        *extra, f"data.root={cifar10_tarball}", "data.subset=64", "data.num_workers=0",
        "data.eval_train_subset=100", "data.eval_test_subset=50", "train.batch_size=32",
        "train.epochs=1", "train.warmup_epochs=0", "train.progress_bar=false",
        "monitor.knn=false", "monitor.online_probe=false", "eval.knn=true",
        "eval.linear=false", f"out_dir={run}"]))
    assert summary["method"] == "siameseim" and summary["steps"] == 2
    for item in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / item).is_file(), item
    fast = ["eval.finetune_epochs=1", "eval.finetune_batch_size=16", "eval.linear_epochs=1"]
    assert main(["finetune", str(run), "--labels", "10%", *fast]) == 0
    assert finetuned["frozen"] == []
    assert main(["linear", str(run), "--protocol", "cached", *fast]) == 0
    assert main(["knn", str(run)]) == 0
    for protocol in ("finetune_10pct", "linear_cached", "knn"):
        result = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert result["method"] == "siameseim" and 0 <= result["top1"] <= 100


def test_the_masking_axis_is_refused(capsys):
    assert main(["pretrain", "configs/cifar10/siameseim_vit_tiny.yaml",
                 "method.masking=mixmask"]) == 2
    assert "no masking axis" in capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("method.siameseim.mask_ratio=1.0", "mask_ratio"),
    ("method.siameseim.predictor_depth=0", "predictor_depth"),
    ("model.backbone=vgg11", "model.backbone"),
])
def test_bad_settings_are_refused(capsys, override, words):
    code = main(["pretrain", "configs/cifar10/siameseim_vit_tiny.yaml", override,
                 "data.root=/nonexistent"])
    assert code == 2 and words in capsys.readouterr().err


def test_every_config_loads():
    for dataset in ("cifar10", "cifar100"):
        vit = load_config(f"configs/{dataset}/siameseim_vit_tiny.yaml")
        assert (vit.method.name, vit.model.global_pool, vit.train.grad_clip) == (
            "siameseim", "avg", 1.0)
        assert load_config(f"configs/{dataset}/siameseim_r18.yaml").model.backbone == "resnet18"
    base = load_config("configs/imagenet/siameseim_vit_base.yaml")
    assert (base.train.epochs, base.train.batch_size, base.train.lr, base.train.betas) == (
        1600, 4096, 1e-3, (0.9, 0.95))
    assert round(base.method.siameseim.mask_ratio * 196) == 118
