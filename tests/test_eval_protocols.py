"""The evaluation protocols: kNN (top-1/top-5 against hand computations), the MoCo linear
protocol (learns, leaves the frozen backbone bit-identical), label subsets and split
files, finetuning (learns, from-scratch init = pretraining's init, exact resume), the
commands' JSON and the results table."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import StopAfter
from PIL import Image
from torch import nn

import mixmask.eval.finetune as finetune_module
from mixmask.cli import main
from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.data.datasets import load_image_set
from mixmask.data.image_set import ImageSet
from mixmask.eval.data import (
    AugmentedLabelled,
    EpochBatches,
    LabelSplitError,
    balanced_label_subset,
    classifier_train_transform,
    label_subset,
)
from mixmask.eval.features import extract_features
from mixmask.eval.finetune import Classifier, FinetuneStopped
from mixmask.eval.knn import knn_accuracy, knn_votes
from mixmask.eval.linear import linear_moco
from mixmask.eval.protocols import run_finetune
from mixmask.models.backbones import build_backbone
from mixmask.train.loop import pretrain
from mixmask.train.step import training_step

CPU = torch.device("cpu")
TINY = ["model.width=0.125", "method.mocov2.proj_hidden_dim=64", "method.mocov2.queue_size=256",
        "train.batch_size=32", "data.num_workers=0", "train.progress_bar=false",
        "method.masking=mixmask", "method.mocov2.symmetric=false", "data.eval_train_subset=200",
        "data.eval_test_subset=100", "train.log_every=1", "eval.knn=false", "eval.linear=false",
        "monitor.knn=false", "monitor.online_probe=false", "data.subset=128", "train.epochs=1"]
# finetune on the run's 200 labelled images: 10% = 20 images, batches of 8: 3 steps/epoch.
FINETUNE = ["eval.finetune_epochs=2", "eval.finetune_batch_size=8"]


def pretrained_run(folder: Path, root: Path, *overrides: str) -> Path:
    run = folder / "run"
    pretrain(load_config(None, [*TINY, f"data.root={root}", f"out_dir={run}", *overrides]))
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from conftest import CIFAR10_TARBALL

    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}")
    return pretrained_run(tmp_path_factory.mktemp("pretrained"), CIFAR10_TARBALL)


# --------------------------------------------------------------------------- kNN


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_votes_top1_and_top5_match_a_hand_computation():
    # Six training features on the unit circle, one class each (class 6 has none).
    bank = torch.tensor([_unit(a) for a in (0, 30, 60, 90, 120, 180)])
    bank_labels = torch.arange(6)
    # Scaled queries: kNN uses cosine similarity, so the length must not matter.
    queries = torch.tensor([_unit(0), _unit(0), _unit(0), _unit(90)]) * torch.tensor(
        [[3.0], [1.0], [0.5], [2.0]])
    votes = knn_votes(bank, bank_labels, queries[:1], num_classes=7, k=5, temperature=0.5)
    # Query at 0 deg: the 5 nearest are 0, 30, 60, 90, 120 deg (cos 1, .866, .5, 0, -.5),
    # each voting exp(cos / 0.5) for its own class; 180 deg (class 5) is not among them.
    expected = [math.exp(2.0), math.exp(math.sqrt(3)), math.exp(1.0), 1.0, math.exp(-1.0),
                0.0, 0.0]
    assert votes[0].tolist() == pytest.approx(expected, rel=1e-5)
    # Labels: 0 (top-1 hit), 4 (5th: top-5 hit only), 5 (outside the 5 voters: a miss),
    # and the 90-deg query's own class 3 (its nearest neighbour).
    labels = torch.tensor([0, 4, 5, 3])
    accuracy = knn_accuracy(bank, bank_labels, queries, labels, num_classes=7, k=5,
                            temperature=0.5)
    assert accuracy == {1: pytest.approx(50.0), 5: pytest.approx(75.0)}


# --------------------------------------------------------------------------- linear (moco)


def _two_shade_set(count: int, seed: int) -> ImageSet:
    """Dark images (class 0) and bright ones (class 1) with pixel noise: linearly
    separable by mean brightness."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    base = torch.where(labels[:, None, None, None] == 1, 190, 60)
    noise = torch.randint(-40, 41, (count, 3, 32, 32), generator=generator)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images=images, paths=None, labels=labels, classes=["dark", "bright"],
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    # Non-trivial running statistics: a protocol that ran BN in train mode would move them.
    encoder[1].running_mean.fill_(0.1)
    encoder[1].running_var.fill_(2.0)
    return encoder


@pytest.mark.parametrize("batchnorm", [False, True])
def test_linear_moco_learns_a_separable_task_and_leaves_the_backbone_bit_identical(batchnorm):
    encoder = _tiny_encoder()
    encoder.train()  # the protocol must switch BN to eval itself, and restore the mode
    before = copy.deepcopy(encoder.state_dict())
    train_images, test_images = _two_shade_set(64, seed=1), _two_shade_set(40, seed=2)
    transform = classifier_train_transform(32, train_images.mean, train_images.std)
    train_set = AugmentedLabelled(train_images, torch.arange(64), transform, seed=0)
    from mixmask.data.loaders import EvalDataset
    from mixmask.data.transforms import eval_transform

    test_set = EvalDataset(test_images, eval_transform(32, test_images.mean, test_images.std,
                                                       resize_from_larger=False))
    test_features, test_labels = extract_features(encoder, test_set, device=CPU)
    epochs_seen = []
    record = linear_moco(encoder, encoder, train_set, test_features, test_labels,
                         feature_dim=8, num_classes=2, epochs=10, lr=3.0, weight_decay=0.0,
                         batch_size=16, milestones=(0.6, 0.8), seed=0, device=CPU,
                         batchnorm=batchnorm,
                         on_epoch=lambda epoch, row: epochs_seen.append(epoch))
    assert epochs_seen == list(range(1, 11))
    summary = record.summary()
    assert summary["best_top1"] >= 95.0 and summary["top1"] >= 90.0, record.history
    assert summary["top5"] == 100.0  # two classes: top-5 holds both
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # weights, BN buffers, batch counters
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())


# --------------------------------------------------------------------------- label subsets


def test_balanced_subsets_are_class_balanced_and_deterministic_per_seed():
    labels = torch.cat([torch.full((200,), 0), torch.full((100,), 1), torch.full((300,), 2)])
    labels = labels[torch.randperm(600, generator=torch.Generator().manual_seed(3))]
    subset = balanced_label_subset(labels, 0.10, seed=5)
    counts = torch.bincount(labels[subset], minlength=3).tolist()
    assert counts == [20, 10, 30]  # 10% of each class
    assert len(set(subset.tolist())) == len(subset)  # no image twice
    assert torch.equal(subset, balanced_label_subset(labels, 0.10, seed=5))
    assert not torch.equal(subset, balanced_label_subset(labels, 0.10, seed=6))
    one_percent = balanced_label_subset(labels, 0.01, seed=5)
    assert torch.bincount(labels[one_percent], minlength=3).tolist() == [2, 1, 3]
    with pytest.raises(LabelSplitError):
        balanced_label_subset(labels, 1.5, seed=0)


def _imagenet_like_tree(root: Path, classes: list[str], per_class: int) -> Path:
    """train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/... at 100 px (files stay on disk)."""
    for split, count in (("train", per_class), ("val", 2)):
        for shade, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (100, 100), (40 * shade, k, 0)).save(
                    folder / f"{wnid}_{k + (1000 if split == 'val' else 0)}.JPEG")
    return root


def test_a_split_file_selects_exactly_the_listed_train_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXMASK_CACHE", str(tmp_path / "cache"))
    classes = ["n01440764", "n01443537", "n01484850"]
    root = _imagenet_like_tree(tmp_path / "imagenet", classes, per_class=6)
    train_set = load_image_set("imagefolder", str(root), "train")
    test_set = load_image_set("imagefolder", str(root), "test")
    listed = ["n01443537_4.JPEG", "n01440764_0.JPEG", "n01484850_5.JPEG", "n01440764_3.JPEG"]
    split_file = tmp_path / "1percent.txt"
    split_file.write_text("\n".join(listed) + "\n\n")
    indices, description = label_subset(train_set, "1%", seed=0, split_file=str(split_file))
    chosen = [Path(train_set.paths[i]) for i in indices.tolist()]
    assert sorted(path.name for path in chosen) == sorted(listed)
    # Labels come from the class folders; nothing comes from the test split.
    assert [classes[int(train_set.labels[i])] for i in indices] == [p.parent.name
                                                                     for p in chosen]
    assert not {p.resolve() for p in chosen} & {Path(p).resolve() for p in test_set.paths}
    assert str(split_file) in description
    split_file.write_text("n01440764_0.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(LabelSplitError, match="not in the train split"):
        label_subset(train_set, "1%", seed=0, split_file=str(split_file))


def test_drawn_subsets_come_from_the_train_split_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXMASK_CACHE", str(tmp_path / "cache"))
    root = _imagenet_like_tree(tmp_path / "imagenet", ["a", "b"], per_class=20)
    train_set = load_image_set("imagefolder", str(root), "train")
    test_files = {Path(p).resolve() for p in load_image_set("imagefolder", str(root),
                                                            "test").paths}
    indices, _ = label_subset(train_set, "10%", seed=0)
    assert torch.bincount(train_set.labels[indices]).tolist() == [2, 2]
    assert all(Path(train_set.paths[i]).resolve() not in test_files for i in indices)


def test_epoch_batches_keep_the_last_batch_pad_it_under_ddp_and_resume():
    batches = EpochBatches(10, 4, seed=1)
    batches.set_epoch(2)
    whole = [[index for index, epoch in batch] for batch in batches]
    assert [len(batch) for batch in whole] == [4, 4, 2]
    assert sorted(sum(whole, [])) == list(range(10))
    batches.set_epoch(2, start_batch=1)
    assert [[i for i, _ in batch] for batch in batches] == whole[1:]
    ranks = [EpochBatches(10, 4, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shards = [list(sampler) for sampler in ranks]
    assert [len(batch) for batch in shards[0]] == [len(batch) for batch in shards[1]] == [2, 2, 1]
    # The two processes' shards of each batch are that batch (its last one padded).
    assert [i for i, _ in shards[0][0] + shards[1][0]] == whole[0]


# --------------------------------------------------------------------------- finetune


def test_a_few_finetune_steps_on_real_cifar_lower_the_loss(cifar10_tarball):
    image_set = load_image_set("imagefolder", str(cifar10_tarball), "train", subset=64)
    config = load_config(None, ["model.width=0.125"])
    torch.manual_seed(0)
    backbone, dim = build_backbone(config.model, image_size=32)
    classifier = Classifier(backbone, dim, 10)
    transform = classifier_train_transform(32, image_set.mean, image_set.std)
    items = AugmentedLabelled(image_set, torch.arange(64), transform, seed=0)
    images, labels = zip(*(items[(index, 0)] for index in range(64)), strict=True)
    batch = Batch.from_views(torch.stack(images), labels=torch.tensor(labels))
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
    losses = [training_step(classifier, optimizer, batch, None, 0.0).loss.item()
              for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


def _backbone_parameters(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The backbone's parameters (not BN buffers, which any forward in train mode moves)."""
    names = {name for name, _ in build_backbone(
        load_config(None, ["model.width=0.125"]).model, image_size=32)[0].named_parameters()}
    return {name: state[prefix + name] for name in names}


def test_from_scratch_starts_from_pretrainings_random_init(tmp_path, cifar10_tarball):
    # lr 1e-30 everywhere (0 is refused): pretraining's checkpoint keeps its initial weights
    # up to ~1e-29, and so do both finetunes; the engine's init and the finetune's
    # --from-scratch init must agree (another init differs by ~1e-2).
    run = pretrained_run(tmp_path, cifar10_tarball, "train.lr=1e-30")
    zero = ["eval.finetune_lr_backbone=1e-30", "eval.finetune_lr_head=1e-30", *FINETUNE]
    _, scratch = run_finetune(run, zero, labels="10%", from_scratch=True)
    _, pretrained = run_finetune(run, zero, labels="10%")
    init = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["method"]
    expected = _backbone_parameters(init, "backbone.")
    for name in ("finetune_10pct_scratch", "finetune_10pct"):
        state = torch.load(run / "eval" / name / "last.ckpt", weights_only=True)["classifier"]
        got = _backbone_parameters(state, "backbone.")
        for key, value in expected.items():
            assert torch.allclose(got[key], value, rtol=0, atol=1e-20), (name, key)
    assert scratch["checkpoint"] is None and scratch["from_scratch"] is True
    assert pretrained["checkpoint"].endswith("last.ckpt")
    # A trained run's backbone is not that init: the pretrained finetune starts elsewhere.
    trained = pretrained_run(tmp_path / "trained", cifar10_tarball)
    trained_state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    trained_backbone = _backbone_parameters(trained_state["method"], "backbone.")
    assert any((value - trained_backbone[key]).abs().max() > 1e-6
               for key, value in expected.items())


def test_a_stopped_finetune_resumes_into_the_uninterrupted_result(tmp_path, tiny_run,
                                                                  monkeypatch):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    shutil.copytree(tiny_run, reference)
    shutil.copytree(tiny_run, stopped)
    _, expected = run_finetune(reference, FINETUNE, labels="10%")
    with monkeypatch.context() as patch:
        with pytest.raises(FinetuneStopped, match="after step 4 of 6"):
            run_finetune(stopped, FINETUNE, labels="10%",
                         stop=StopAfter(4, patch, finetune_module))
    saved = torch.load(stopped / "eval" / "finetune_10pct" / "last.ckpt", weights_only=True)
    assert saved["step"] == 4 and len(saved["history"]) == 1  # mid-epoch 2
    assert not (stopped / "eval" / "finetune_10pct.json").exists()
    _, resumed = run_finetune(stopped, FINETUNE, labels="10%")
    assert resumed["history"] == expected["history"]
    final = torch.load(stopped / "eval" / "finetune_10pct" / "last.ckpt", weights_only=True)
    reference_state = torch.load(reference / "eval" / "finetune_10pct" / "last.ckpt",
                                 weights_only=True)
    for name, value in reference_state["classifier"].items():
        assert torch.equal(final["classifier"][name], value), name
    # Other settings over the same folder are refused, not mixed into it.
    code = main(["finetune", str(stopped), "--labels", "10%", *FINETUNE,
                 "eval.finetune_lr_head=0.1"])
    assert code == 2


# --------------------------------------------------------------------------- commands


def test_every_protocol_command_writes_its_json_and_results_tabulates_them(tiny_run,
                                                                            capsys):
    run = tiny_run
    assert main(["knn", str(run), "eval.knn_k=20"]) == 0
    assert main(["linear", str(run), "--protocol", "cached", "eval.linear_epochs=2"]) == 0
    assert main(["linear", str(run), "--protocol", "moco", "eval.linear_epochs=2"]) == 0
    assert main(["finetune", str(run), "--labels", "1%", *FINETUNE]) == 0
    assert main(["finetune", str(run), "--labels", "1%", "--from-scratch", *FINETUNE]) == 0
    names = {"knn", "linear_cached", "linear_moco", "finetune_1pct", "finetune_1pct_scratch"}
    assert {path.stem for path in (run / "eval").glob("*.json")} >= names
    for name in names:
        result = json.loads((run / "eval" / f"{name}.json").read_text())
        assert result["protocol"] == name
        for key in ("top1", "top5", "checkpoint", "wall_time_s", "description", "settings"):
            assert key in result, (name, key)
        assert 0 <= result["top1"] <= result["top5"] <= 100
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert knn["settings"] == {"k": 20, "temperature": 0.1}
    finetune = json.loads((run / "eval" / "finetune_1pct.json").read_text())
    assert finetune["settings"]["train_images"] == 10  # 1% of 200, one image per class
    assert finetune["reported"].startswith("top1/top5: last epoch")
    capsys.readouterr()
    assert main(["results", str(run.parent), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_protocol = {row["protocol"]: row for row in rows}
    assert set(by_protocol) >= names
    assert by_protocol["finetune_1pct_scratch"]["init"] == "random"
    assert float(by_protocol["knn"]["top1"]) == pytest.approx(knn["top1"])
    assert main(["results", str(run)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | method |") and "linear_moco" in table


@pytest.mark.parametrize("argv, message", [
    (["finetune", "{run}", "--labels", "5%"], "--labels must be one of"),
    (["finetune", "{run}", "--labels", "1%", "--from-scratch", "--checkpoint", "x.ckpt"],
     "takes no --checkpoint"),
    (["knn", "{run}", "eval.knn_k=0"], "eval.knn_k"),
    (["linear", "{run}", "--protocol", "cached", "eval.linear_lr=-1"], "eval.linear_lr"),
    (["knn", "{missing}"], "is not a run folder"),
    (["results", "{missing}"], "is not a run folder"),
])
def test_evaluation_mistakes_exit_2_with_one_sentence(tiny_run, tmp_path, capsys, argv,
                                                      message):
    argv = [item.format(run=tiny_run, missing=tmp_path / "nothing") for item in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_command_writes_weights_that_load_strictly_into_torchvision(tmp_path, capsys):
    import torchvision

    from mixmask.config import save_config
    from mixmask.methods import build_method

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config(None, ["model.width=1.0", "model.stem=imagenet",
                                "method.mocov2.queue_size=256", "train.batch_size=32",
                                f"out_dir={run}"])
    save_config(config, run / "config.yaml")
    torch.manual_seed(1)
    method = build_method(config)
    torch.save({"method": method.state_dict(), "step": 3}, run / "checkpoints" / "last.ckpt")
    out = tmp_path / "r18.pth"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    assert "torchvision.models.resnet18()" in capsys.readouterr().out
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.randn(2, 3, 64, 64)
    model.eval(), method.eval()
    with torch.no_grad():
        assert torch.equal(model(images), method.features(images))
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit code 2
        main(["export", str(run), "--format", "onnx", "--out", str(out)])
    assert exit_info.value.code == 2


def test_an_evaluation_over_files_with_a_bad_one_completes_and_counts_it(tmp_path):
    from test_datasets_layouts import folder_with_bad_files

    root, bad = folder_with_bad_files(tmp_path / "data", 100, [41], size=100, fmt="png")
    for i in range(20):  # a readable test split
        path = root / "test" / "ab"[i % 2] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 100), (5 * i, 50, 0)).save(path)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="Skipped"):  # pretraining meets it too
        pretrain(load_config(None, [*TINY, "data.dataset=imagefolder", f"data.root={root}",
                                    "data.subset=0", "data.eval_train_subset=0",
                                    "data.eval_test_subset=0", "train.batch_size=50",
                                    "train.max_steps=1", f"out_dir={run}"]))
    with pytest.warns(UserWarning, match="Skipped"):
        assert main(["knn", str(run)]) == 0
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["bad_images"] == 1 and result["bad_image_files"] == bad
    assert result["train_images"] == 100  # the bad file's neighbour took its place
