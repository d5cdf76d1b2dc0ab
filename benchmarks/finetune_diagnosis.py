"""What a finetuned classifier predicts: read back ``RUN/eval/<NAME>/last.ckpt`` (written by
``mixmask finetune``) and score the run's test split with it, in eval-mode BatchNorm (the
protocol's) and with batch statistics, to tell a collapsed head from stale BatchNorm
running statistics.

    python benchmarks/finetune_diagnosis.py runs/benchmarks/mim_ablation/a2mim_r18 \\
        --name finetune_10pct_scratch data.root=../shared/data/cifar10_jpeg_q75.tar.gz \\
        data.eval_train_subset=5000 data.eval_test_subset=1000

Prints, per BatchNorm mode: top-1 / top-5, how many of the classes are ever predicted, and
the logits' spread over test images (the standard deviation of each class's logit across
images, averaged over classes). Writes the same as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from mixmask.eval.accuracy import topk_accuracy
from mixmask.eval.finetune import Classifier
from mixmask.methods.protocol import PixelStats
from mixmask.runs.checkpoint import load_state, read_checkpoint
from mixmask.runs.folder import build_run_method, evaluation_sets, load_run_config

BATCH = 250


@torch.no_grad()
def scores_of(classifier: Classifier, test_set, batch_statistics: bool) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """Logits and labels of the whole test set; with ``batch_statistics`` BatchNorm
    normalises each batch of :data:`BATCH` by its own statistics (on a copy, so the
    classifier's running statistics stay as saved)."""
    model = copy.deepcopy(classifier).train(batch_statistics)
    loader = torch.utils.data.DataLoader(test_set, batch_size=BATCH, shuffle=False)
    scores, labels = [], []
    for images, targets in loader:
        scores.append(model.scores(images).float())
        labels.append(targets)
    return torch.cat(scores), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.key=value (the data of the test)")
    parser.add_argument("--name", default="finetune_10pct",
                        help="the finetune's result name: RUN/eval/<name>/last.ckpt")
    parser.add_argument("--out", type=Path, default=None,
                        help="default runs/benchmarks/finetune_diagnosis_<run>_<name>.json")
    args = parser.parse_intermixed_args()
    checkpoint = args.run / "eval" / args.name / "last.ckpt"
    if not checkpoint.is_file():
        raise SystemExit(f"no finetune checkpoint at {checkpoint}; run `mixmask finetune` "
                         "on the run first.")
    config = load_run_config(args.run, args.overrides)
    eval_data = evaluation_sets(config)
    train_images = eval_data.train.image_set
    method = build_run_method(config, PixelStats(tuple(train_images.mean),
                                                 tuple(train_images.std)), None, None)
    classifier = Classifier(method.backbone, method.feature_dim, train_images.num_classes)
    state = read_checkpoint(checkpoint, required=("classifier",),
                            what="mixmask finetune checkpoint", other="finetune again")
    load_state(classifier, state["classifier"], checkpoint)
    rows = {}
    for mode, batch_statistics in (("eval-mode BatchNorm", False),
                                   ("batch-statistics BatchNorm", True)):
        scores, labels = scores_of(classifier, eval_data.test, batch_statistics)
        accuracy = topk_accuracy(scores, labels)
        rows[mode] = {"top1": accuracy[1], "top5": accuracy[5],
                      "classes_predicted": int(scores.argmax(1).unique().numel()),
                      "logit_spread": float(scores.std(0).mean())}
    print(f"{args.run} / {args.name} (step {state['step']}), {len(labels)} test images, "
          f"{train_images.num_classes} classes")
    print("| BatchNorm | top-1 | top-5 | classes predicted | logit spread |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, row in rows.items():
        print(f"| {mode} | {row['top1']:.2f} | {row['top5']:.2f} | "
              f"{row['classes_predicted']} | {row['logit_spread']:.1f} |")
    out = args.out or Path("runs/benchmarks") / (
        f"finetune_diagnosis_{args.run.name}_{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "finetune_diagnosis", "run": str(args.run),
                               "name": args.name, "step": state["step"],
                               "machine": platform.platform(), "overrides": args.overrides,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
