"""Dense transfer (`mixmask detect`, `mixmask segment`): the scores against hand
computations, the proxy's construction, the pyramids' shapes, every parameter learning,
and exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import StopAfter

from mixmask.cli import main
from mixmask.config import ModelConfig
from mixmask.data.dense.mosaic import CifarMosaic
from mixmask.data.dense.sample import IGNORE_INDEX, DenseTarget
from mixmask.data.dense.transforms import flip_sample, resize_sample
from mixmask.data.image_set import ImageSet
from mixmask.eval import dense_training
from mixmask.eval.dense_metrics import (
    coco_average_precision,
    coco_detections,
    coco_ground_truth,
    confusion_matrix,
    segmentation_scores,
)
from mixmask.eval.dense_training import DenseStopped
from mixmask.eval.detect import run_detect
from mixmask.models.backbones import build_backbone
from mixmask.models.dense.detection import build_detector
from mixmask.models.dense.pyramid import DetectionPyramid, MultiScaleMaps, train_for_dense
from mixmask.models.dense.segmentation import LinearSegmenter, UperNetSegmenter
from mixmask.train.schedule import poly_lr, warmup_step_lr

# --------------------------------------------------------------------------- scores


def _target(boxes, labels, image_id=1, size=64, crowd=None) -> DenseTarget:
    boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for row, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[row, y0:y1, x0:x1] = 1
    return DenseTarget(boxes=boxes, labels=torch.tensor(labels), masks=masks,
                       crowd=None if crowd is None else torch.tensor(crowd), image_id=image_id)


def _prediction(target: DenseTarget, scores) -> dict:
    return {"boxes": target.boxes, "labels": target.labels, "scores": torch.tensor(scores),
            "masks": target.masks[:, None].float()}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_is_100_when_the_predictions_are_the_ground_truth(iou_type):
    targets = [_target([[4, 4, 20, 20], [30, 30, 60, 50]], [1, 2], image_id=7),
               _target([[10, 12, 40, 44]], [2], image_id=9)]
    masks = iou_type == "segm"
    truth = coco_ground_truth(targets, [(64, 64)] * 2, 2, masks=masks)
    found = coco_detections([_prediction(t, [0.9] * len(t.labels)) for t in targets], [7, 9],
                            masks=masks)
    scores = coco_average_precision(truth, found, iou_type)
    assert scores == pytest.approx({"ap": 100.0, "ap50": 100.0, "ap75": 100.0})


def test_ap_of_one_hit_one_false_positive_and_one_miss_is_the_hand_computed_value():
    # Two objects of class 1; detections: an exact hit (0.9) and a box on nothing (0.8).
    # By score: hit (precision 1, recall 1/2), false positive (1/2, 1/2). COCO's AP is
    # the mean over 101 recall points 0, 0.01, ..., 1 of the best precision at a recall at
    # least that high: 1 for the 51 points up to 0.50, 0 beyond (never reached). The hit is
    # exact, so every IoU threshold counts it: AP = AP50 = AP75 = 51 / 101.
    target = _target([[4, 4, 20, 20], [30, 30, 60, 50]], [1, 1])
    truth = coco_ground_truth([target], [(64, 64)], 1, masks=False)
    predicted = {"boxes": torch.tensor([[4.0, 4, 20, 20], [40, 2, 60, 20]]),
                 "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.8])}
    scores = coco_average_precision(truth, coco_detections([predicted], [1], masks=False),
                                    "bbox")
    assert scores == pytest.approx({"ap": 100 * 51 / 101, "ap50": 100 * 51 / 101,
                                    "ap75": 100 * 51 / 101})
    # The false positive ranked first: precision at recall 1/2 is 1/2 -> half that AP.
    predicted["scores"] = torch.tensor([0.7, 0.8])
    scores = coco_average_precision(truth, coco_detections([predicted], [1], masks=False),
                                    "bbox")
    assert scores["ap"] == pytest.approx(100 * 0.5 * 51 / 101)


def test_a_crowd_object_is_neither_required_nor_a_false_positive():
    target = _target([[4, 4, 20, 20], [30, 30, 60, 50]], [1, 1], crowd=[False, True])
    truth = coco_ground_truth([target], [(64, 64)], 1, masks=False)
    found = coco_detections([_prediction(target, [0.9, 0.95])], [1], masks=False)
    assert coco_average_precision(truth, found, "bbox")["ap"] == pytest.approx(100.0)


def test_no_detection_scores_zero():
    truth = coco_ground_truth([_target([[4, 4, 20, 20]], [1])], [(64, 64)], 1, masks=False)
    assert coco_average_precision(truth, [], "bbox") == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_miou_is_100_on_identical_maps_and_the_hand_value_on_a_4x4_case():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, IGNORE_INDEX]])
    assert segmentation_scores(confusion_matrix(labels.clamp(max=2), labels, 3))["miou"] == 100
    predicted = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 2], [2, 2, 2, 1]])
    scores = segmentation_scores(confusion_matrix(predicted, labels, 3))
    # 15 scored pixels (one ignored). Class 0: 3 hit, 1 predicted 1, 1 of class 2 predicted
    # 0 -> IoU 3 / (4 + 4 - 3) = 3/5. Class 1: 4 hit, 1 extra -> 4/5. Class 2: 6 of 7 hit,
    # none extra -> 6/7. Pixel accuracy 13/15.
    assert scores["miou"] == pytest.approx(100 * (3 / 5 + 4 / 5 + 6 / 7) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 13 / 15)
    # A class absent from labels and predictions is left out of the mean (nan-mean).
    four = segmentation_scores(confusion_matrix(predicted, labels, 4))
    assert four["miou"] == pytest.approx(scores["miou"]) and four["class_iou"][3] is None


def test_the_schedules_match_hand_values():
    common = dict(iterations=1000, warmup_iterations=100, warmup_factor=0.001,
                  milestones=(0.75, 0.9), gamma=0.1)
    assert warmup_step_lr(0.02, 0, **common) == pytest.approx(0.02 * 0.001)
    assert warmup_step_lr(0.02, 50, **common) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert warmup_step_lr(0.02, 100, **common) == pytest.approx(0.02)
    assert warmup_step_lr(0.02, 749, **common) == pytest.approx(0.02)
    assert warmup_step_lr(0.02, 750, **common) == pytest.approx(0.002)
    assert warmup_step_lr(0.02, 900, **common) == pytest.approx(0.0002)
    assert poly_lr(0.01, 500, iterations=1000, power=0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 0, iterations=1000, power=0.9) == 0.01


# --------------------------------------------------------------------------- data


def _image_set(count: int = 40, side: int = 32) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8,
                           generator=generator)
    return ImageSet(images, None, torch.arange(count) % 10, [f"c{i}" for i in range(10)],
                    (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _mosaic(seed: int = 0, object_size=(32, 32)) -> CifarMosaic:
    return CifarMosaic(_image_set(), split="train", canvases=6, canvas_size=96,
                       objects=(1, 4), object_size=object_size, seed=seed)


def test_every_mosaic_box_encloses_exactly_its_pasted_image_and_masks_equal_boxes():
    mosaic, source = _mosaic(), _image_set()
    counts = []
    for index in range(len(mosaic)):
        canvas, target = mosaic[index]
        counts.append(len(target.labels))
        background = torch.tensor([128, 128, 128], dtype=torch.uint8)[:, None, None]
        covered = torch.zeros(96, 96, dtype=torch.bool)
        for row, (x0, y0, x1, y1) in enumerate(target.boxes.int().tolist()):
            crop = canvas[:, y0:y1, x0:x1]
            # The crop is one of the source images of that label, pixel for pixel.
            matches = [i for i in range(len(source.images))
                       if torch.equal(source.images[i], crop)]
            assert matches and all(int(source.labels[i]) + 1 == int(target.labels[row])
                                   for i in matches)
            mask = torch.zeros(96, 96, dtype=torch.uint8)
            mask[y0:y1, x0:x1] = 1
            assert torch.equal(target.masks[row], mask)
            assert not covered[y0:y1, x0:x1].any()  # no overlap
            covered[y0:y1, x0:x1] = True
            assert (target.semantic[y0:y1, x0:x1] == target.labels[row]).all()
        assert (target.semantic[~covered] == 0).all()
        assert (canvas[:, ~covered] == background[:, :, 0]).all()
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1


def test_the_mosaic_is_deterministic_per_seed_and_differs_across_seeds():
    first, again, other = _mosaic(0), _mosaic(0), _mosaic(1)
    for index in range(3):
        assert torch.equal(first[index][0], again[index][0])
        assert torch.equal(first[index][1].boxes, again[index][1].boxes)
    assert any(not torch.equal(first[i][0], other[i][0]) for i in range(3))
    resized_canvas, resized = _mosaic(0, object_size=(24, 40))[0]
    sides = resized.boxes[:, 2] - resized.boxes[:, 0]
    assert ((sides >= 24) & (sides <= 40)).all()
    assert torch.equal(sides, resized.boxes[:, 3] - resized.boxes[:, 1])


def test_resize_and_flip_move_boxes_masks_and_labels_with_the_image():
    target = _target([[4, 8, 20, 24]], [1], size=64)
    target.semantic = target.masks[0].long()
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[:, 8:24, 4:20] = 255
    resized_image, resized = resize_sample(image, target, image_size=32, max_size=1000)
    assert resized_image.shape == (3, 32, 32)
    assert resized.boxes.tolist() == [[2.0, 4.0, 10.0, 12.0]]
    assert int(resized.masks.sum()) == 64 and int(resized.semantic.sum()) == 64
    flipped_image, flipped = flip_sample(resized_image, resized)
    assert flipped.boxes.tolist() == [[22.0, 4.0, 30.0, 12.0]]  # x -> 32 - x
    assert torch.equal(flipped.masks[0, 4:12, 22:30], torch.ones(8, 8, dtype=torch.uint8))
    assert torch.equal(flipped_image, resized_image.flip(-1))


# --------------------------------------------------------------------------- models


BACKBONES = {
    "resnet": ModelConfig(backbone="resnet18", stem="cifar", width=0.125),
    "convnext": ModelConfig(backbone="convnext_atto", stem="cifar"),
    "vit": ModelConfig(backbone="vit_tiny", patch_size=8),
}


def _backbone(kind: str):
    torch.manual_seed(0)
    backbone, _ = build_backbone(BACKBONES[kind], image_size=32)
    return train_for_dense(backbone)


@pytest.mark.parametrize("kind, strides, channels", [
    ("resnet", [1, 2, 4, 8], [8, 16, 32, 64]),  # CIFAR stem: no stride-4 stem
    ("convnext", [1, 2, 4, 8], [40, 80, 160, 320]),  # CIFAR stem: 3x3 stride 1
    ("vit", [2, 4, 8, 16], [48, 96, 192, 192]),  # ViTDet: t/4, t/2, t, 2t of patch 8
])
def test_the_multi_scale_maps_have_the_pyramid_strides_and_widths(kind, strides, channels):
    maps = MultiScaleMaps(_backbone(kind), probe_size=32)
    assert maps.strides == strides and maps.channels == channels
    features = maps(torch.randn(2, 3, 128, 128))
    assert [tuple(item.shape) for item in features] == [
        (2, width, 128 // stride, 128 // stride)
        for width, stride in zip(channels, strides, strict=True)]
    pyramid = DetectionPyramid(_backbone(kind), 32, probe_size=32)
    levels = pyramid(torch.randn(1, 3, 128, 128))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [item.shape[-1] for item in levels.values()] == [
        128 // stride for stride in (*strides, strides[-1] * 2)]


def _images_and_targets():
    targets = [_target([[10, 10, 42, 42], [60, 70, 100, 110]], [1, 3], size=128),
               _target([[20, 30, 60, 62]], [2], size=128)]
    return [torch.rand(3, 128, 128) for _ in targets], [
        {"boxes": t.boxes, "labels": t.labels, "masks": t.masks} for t in targets]


def _without_gradient(model) -> list[str]:
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and (parameter.grad is None
                                            or not parameter.grad.abs().sum() > 0)]


@pytest.mark.parametrize("kind", ["resnet", "convnext", "vit"])
def test_mask_rcnn_and_upernet_give_every_parameter_a_gradient(kind):
    detector = build_detector(_backbone(kind), "instances", 3, image_size=128, max_size=128,
                              mean=(0.5,) * 3, std=(0.25,) * 3, pyramid_channels=32,
                              probe_size=32)
    images, targets = _images_and_targets()
    losses = detector(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    sum(losses.values()).backward()
    assert _without_gradient(detector) == []
    segmenter = UperNetSegmenter(_backbone(kind), 4, channels=16, probe_size=32)
    logits = segmenter(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 4, 128, 128)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 128, 128))).backward()
    assert _without_gradient(segmenter) == []


def test_faster_rcnn_trains_its_heads_and_the_linear_segmenter_only_its_head():
    detector = build_detector(_backbone("resnet"), "boxes", 3, image_size=128, max_size=128,
                              mean=(0.5,) * 3, std=(0.25,) * 3, pyramid_channels=32,
                              probe_size=32)
    images, targets = _images_and_targets()
    losses = detector(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    assert "loss_mask" not in losses
    sum(losses.values()).backward()
    assert _without_gradient(detector) == []
    backbone = _backbone("vit")
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    segmenter = LinearSegmenter(backbone, 4, probe_size=32).train()
    assert not backbone.training
    logits = segmenter(torch.randn(2, 3, 64, 64))
    logits.sum().backward()
    trained = [name for name, p in segmenter.named_parameters() if p.requires_grad]
    assert trained == ["norm.weight", "norm.bias", "classifier.weight", "classifier.bias"]
    assert all(torch.equal(before[name], value)
               for name, value in backbone.state_dict().items())


# --------------------------------------------------------------------------- commands


FAST = ["transfer.iterations=4", "transfer.batch_size=2", "transfer.train_images=8",
        "transfer.test_images=4", "transfer.image_size=64", "transfer.mosaic_objects=[1,2]",
        "transfer.mosaic_object_size=[24,32]", "transfer.pyramid_channels=16",
        "transfer.segment_channels=16", "transfer.warmup_iterations=2",
        "transfer.checkpoint_every=0", "transfer.eval_batch_size=4",
        "train.progress_bar=false"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    from conftest import CIFAR10_TARBALL
    from test_eval_protocols import pretrained_run

    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}")
    return pretrained_run(tmp_path_factory.mktemp("dense"), CIFAR10_TARBALL)


def test_a_stopped_detection_resumes_to_the_uninterrupted_weights_bit_for_bit(
        dense_run, tmp_path, monkeypatch):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    shutil.copytree(dense_run, reference)
    shutil.copytree(dense_run, stopped)
    _, expected = run_detect(reference, FAST, task="instances")
    assert set(expected) >= {"box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50",
                             "mask_ap75", "protocol", "description", "checkpoint",
                             "wall_time_s", "device", "versions", "settings"}
    assert expected["protocol"] == "detect_instances" and expected["proxy"] is True
    with monkeypatch.context() as patch:
        with pytest.raises(DenseStopped, match="after iteration 2 of 4"):
            run_detect(stopped, FAST, task="instances", stop=StopAfter(2, patch, dense_training))
    assert not (stopped / "eval" / "detect_instances.json").exists()
    _, resumed = run_detect(stopped, FAST, task="instances")
    final = torch.load(stopped / "eval" / "detect_instances" / "last.ckpt", weights_only=True)
    reference_state = torch.load(reference / "eval" / "detect_instances" / "last.ckpt",
                                 weights_only=True)
    assert final["iteration"] == reference_state["iteration"] == 4
    for name, value in reference_state["model"].items():
        assert torch.equal(final["model"][name], value), name
    assert {key: resumed[key] for key in ("box_ap", "mask_ap")} == {
        key: expected[key] for key in ("box_ap", "mask_ap")}
    # Other settings over the same folder are refused, not mixed into it.
    assert main(["detect", str(stopped), "--task", "instances", *FAST, "transfer.lr=0.01"]) == 2


def test_detect_and_segment_write_their_jsons_and_results_tabulates_them(dense_run, tmp_path,
                                                                        capsys):
    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    assert main(["detect", str(run), "--task", "boxes", "--from-scratch", *FAST]) == 0
    assert main(["segment", str(run), "--head", "linear", *FAST]) == 0
    assert main(["segment", str(run), "--head", "uper", *FAST]) == 0
    names = sorted(path.name for path in (run / "eval").glob("*.json"))
    assert names == ["detect_boxes_scratch.json", "segment_linear.json", "segment_uper.json"]
    capsys.readouterr()
    assert main(["results", str(run), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert "detect_boxes_scratch" in table and "segment_uper" in table
    header = table.splitlines()[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True))
            for line in table.strip().splitlines()[1:]]
    assert all(row["miou"] for row in rows if row["protocol"].startswith("segment"))
    assert all(row["box_ap"] for row in rows if row["protocol"].startswith("detect"))


@pytest.mark.parametrize("argv, sentence", [
    (["detect", "{run}", "transfer.dataset=ade20k"], "has no detection annotations"),
    (["segment", "{run}", "transfer.dataset=coco"], "has no segmentation annotations"),
    (["detect", "{run}", "transfer.dataset=coco", "transfer.root={missing}"], "COCO root"),
    (["detect", "{run}", "--from-scratch", "--checkpoint", "x.ckpt"], "takes no --checkpoint"),
    (["detect", "{run}", "transfer.mosaic_objects=[1,9]"], "without overlap"),
    (["segment", "{run}", "transfer.iterations=0"], "must be positive"),
    (["segment", "{run}", "--head", "uper", "transfer.batch_size=1"], "at least 2 images"),
])
def test_dense_mistakes_exit_2_with_one_sentence(dense_run, tmp_path, capsys, argv, sentence):
    filled = [item.format(run=dense_run, missing=tmp_path / "none") for item in argv]
    assert main([*filled[:2], *FAST, *filled[2:]]) == 2  # the case's own settings win
    err = capsys.readouterr().err.strip()
    assert sentence in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_payload_in_the_detection_checkpoint_is_refused_and_runs_nothing(dense_run, tmp_path,
                                                                           capsys):
    from test_checkpoint import PAYLOADS

    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    marker = tmp_path / "owned"
    (run / "eval" / "detect_boxes").mkdir(parents=True)
    torch.save({"model": PAYLOADS["os.system"](marker), "optimizer": {}, "iteration": 1},
               run / "eval" / "detect_boxes" / "last.ckpt")
    capsys.readouterr()
    assert main(["detect", str(run), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "not plain data" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_vitdet_optimizer_decays_the_vits_layers_and_spares_norms_from_weight_decay():
    from types import SimpleNamespace

    from mixmask.errors import ConfigError
    from mixmask.eval.detect import detection_optimizer

    backbone, _ = build_backbone(ModelConfig(backbone="vit_tiny", patch_size=4), 32)
    detector = build_detector(backbone, "boxes", 3, image_size=64, max_size=64,
                              mean=(0.5,) * 3, std=(0.5,) * 3, probe_size=32)
    transfer = SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.1, momentum=0.9,
                               layer_decay=0.5, drop_path=0.1)
    optimizer = detection_optimizer(detector, backbone, transfer)
    assert isinstance(optimizer, torch.optim.AdamW)
    setting = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups
               for p in group["params"]}
    named = dict(detector.named_parameters())
    vit = "backbone.body.backbone."
    # ViT-Tiny has 12 blocks: block i is layer i + 1, scaled 0.5 ** (13 - (i + 1)); the
    # embeddings are layer 0 (0.5 ** 13); the pyramid and heads take the full lr.
    assert setting[id(named[vit + "blocks.11.mlp.fc1.weight"])] == (1e-4 * 0.5, 0.1)
    assert setting[id(named[vit + "blocks.0.attn.qkv.weight"])] == (1e-4 * 0.5 ** 12, 0.1)
    assert setting[id(named[vit + "patch_embed.proj.weight"])] == (1e-4 * 0.5 ** 13, 0.1)
    assert setting[id(named[vit + "patch_embed.proj.bias"])] == (1e-4 * 0.5 ** 13, 0.0)
    assert setting[id(named[vit + "cls_token"])] == (1e-4 * 0.5 ** 13, 0.0)
    assert setting[id(named[vit + "blocks.3.norm1.weight"])] == (1e-4 * 0.5 ** 9, 0.0)
    assert setting[id(named["rpn.head.conv.0.0.weight"])] == (1e-4, 0.1)
    assert setting[id(named["rpn.head.conv.0.0.bias"])] == (1e-4, 0.0)
    assert len(setting) == sum(p.requires_grad for p in detector.parameters())
    assert all(block.drop_path1.drop_prob > 0 for block in backbone.blocks[1:])
    resnet, _ = build_backbone(ModelConfig(backbone="resnet18", width=0.125), 32)
    with pytest.raises(ConfigError, match="needs a ViT backbone"):
        detection_optimizer(resnet, resnet, transfer)


def test_detect_and_segment_train_on_two_ddp_processes(dense_run, tmp_path):
    """``train.devices=2`` (gloo on the CPU): both commands launch two processes, each
    trains on its half of every batch, and only the first writes the JSON, which says so.
    On CPU processes BatchNorm keeps per-process statistics (torch's SyncBN needs GPUs).
    Detection runs in bf16: the boxes reach torchvision in float32 (Fabric's precision
    plugin would have cast them, and torchvision refuses bf16 boxes)."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    mixmask = str(Path(sys.executable).with_name("mixmask"))
    for argv, name in ((["detect", str(run), "--task", "boxes", "train.precision=bf16"],
                        "detect_boxes"),
                       # Two images per process: UperNet's 1x1 pooled maps need two.
                       (["segment", str(run), "--head", "uper", "transfer.batch_size=4"],
                        "segment_uper")):
        done = subprocess.run([mixmask, *argv[:-1], *FAST, argv[-1], "train.devices=2",
                               "train.device=cpu"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((run / "eval" / f"{name}.json").read_text())
        assert result["settings"]["world_size"] == 2
        assert done.stdout.count("Written to") == 1  # rank 0 alone reports
        if name == "detect_boxes":
            assert "per-process statistics" in result["settings"]["bn"]
            assert result["settings"]["precision"] == "bf16"
            assert 0 <= result["box_ap"] <= 100
        else:
            assert 0 <= result["miou"] <= 100
