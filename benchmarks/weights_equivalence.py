"""Weights equivalence across code versions: do two checkouts train the same model?

``run`` pretrains a fixed set of short runs (12 steps on 640 real CIFAR-10 images): the
quickstart recipe over the five Siamese bases, every masking strategy and both data
pipelines, and one run each of the masked-image methods from their CIFAR-10 recipes (MAE,
PixMIM, A2MIM on a ViT and on a ResNet, SiameseIM), and saves each run's final ``method``
state_dict; ``compare`` reports, run by run, which tensors are bit-identical between two
such folders and the largest difference of the others. Run ``run`` once per checkout
(``PYTHONPATH=/old/checkout/src`` for the old one), then ``compare``::

    PYTHONPATH=/tmp/old/src python benchmarks/weights_equivalence.py run /tmp/eq/old
    python benchmarks/weights_equivalence.py run /tmp/eq/new
    python benchmarks/weights_equivalence.py compare /tmp/eq/old /tmp/eq/new

By default the Siamese runs switch this version's fidelity mends off
(``method.mask.generator=exact_count``, ``symmetric_reduction: mean``: the behaviour before
they existed); ``--legacy`` leaves those keys out, for a checkout that predates them. Add
``--data PATH`` for the CIFAR-10 tarball (default ``../shared/data``). Writes
``compare.json`` beside the second folder. Works with checkouts before and after the
package's redesign (``mixmask.engine`` became ``mixmask.train.loop``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10_jpeg_q75.tar.gz"
COMMON = ["train.max_steps=12", "data.subset=640", "data.eval_train_subset=256",
          "data.eval_test_subset=256", "monitor.knn=false", "eval.knn=false",
          "eval.linear=false", "eval.compare_random_init=false", "train.progress_bar=false",
          "data.num_workers=0", "train.log_every=4"]
SMALL_HEADS = {
    "mocov2": [],
    "byol": ["method.byol.proj_hidden_dim=128", "method.byol.pred_hidden_dim=128",
             "method.byol.proj_output_dim=64"],
    "simsiam": ["method.simsiam.proj_hidden_dim=128", "method.simsiam.pred_hidden_dim=32",
                "method.simsiam.proj_output_dim=64"],
    "barlow_twins": ["method.barlow_twins.proj_hidden_dim=128",
                     "method.barlow_twins.proj_output_dim=128"],
    "vicreg": ["method.vicreg.proj_hidden_dim=128", "method.vicreg.proj_output_dim=128"],
}
RUNS = {
    "quickstart_cpu": ["monitor.online_probe=true"],
    "quickstart_device": ["data.pipeline=device", "monitor.online_probe=false"],
    "mocov2_none": ["method.masking=none", "monitor.online_probe=false"],
    "mocov2_erase": ["method.masking=erase", "method.mask.mode=discrete",
                     "method.mask.per_sample=true", "monitor.online_probe=false"],
    "mocov2_sym_both": ["method.masking=both", "method.mocov2.symmetric=true",
                        "monitor.online_probe=false"],
    "byol_unmix": ["method.name=byol", "method.masking=unmix", "train.optimizer=lars",
                   "data.augmentation=byol_cifar", "monitor.online_probe=false",
                   "data.pipeline=device"],
    "simsiam_mixmask": ["method.name=simsiam", "method.masking=mixmask",
                        "method.mask.per_sample=true", "monitor.online_probe=false"],
    "barlow_twins_both": ["method.name=barlow_twins", "method.masking=both",
                          "train.optimizer=lars", "monitor.online_probe=false"],
    "vicreg_erase": ["method.name=vicreg", "method.masking=erase", "method.erase.shape=focal",
                     "monitor.online_probe=false"],
}
# Masked image modelling, from each method's CIFAR-10 recipe: a small decoder, 64 images a
# step (the recipes' batch of 256 is the slow part on a CPU).
MIM = ["train.batch_size=64", "data.augmentation=conservative"]
MIM_RUNS = {
    "mae_vit": ("cifar10/mae_vit_tiny.yaml", [*MIM, "method.mae.decoder_depth=1"]),
    "pixmim_vit": ("cifar10/pixmim_vit_tiny.yaml", [*MIM, "method.mae.decoder_depth=1"]),
    "a2mim_vit": ("cifar10/a2mim_vit_tiny.yaml", MIM),
    "a2mim_resnet": ("cifar10/a2mim_r18.yaml", [*MIM, "model.width=0.25"]),
    "siameseim_vit": ("cifar10/siameseim_vit_tiny.yaml",
                      [*MIM, "method.siameseim.predictor_depth=1"]),
}
# The fidelity mends of the method-protocol change, switched off.
MENDS_OFF = {"mocov2": ["method.mocov2.symmetric_reduction=mean"],
             "byol": ["method.byol.symmetric_reduction=mean"],
             "simsiam": ["method.simsiam.symmetric_reduction=mean"],
             "barlow_twins": [], "vicreg": []}


def _pretrain():
    try:
        from mixmask.train.loop import pretrain
    except ImportError:  # a checkout from before the redesign
        from mixmask.engine import pretrain
    return pretrain


def planned_runs(data: Path, legacy: bool) -> dict[str, tuple[Path, list[str]]]:
    """Run name -> (recipe, overrides without out_dir)."""
    runs = {}
    for name, extra in RUNS.items():
        method = next((item.split("=", 1)[1] for item in extra
                       if item.startswith("method.name=")), "mocov2")
        overrides = [f"data.root={data}", *COMMON, *SMALL_HEADS[method], *extra]
        if not legacy:
            overrides += ["method.mask.generator=exact_count", *MENDS_OFF[method]]
        runs[name] = (ROOT / "configs" / "quickstart.yaml", overrides)
    for name, (recipe, extra) in MIM_RUNS.items():
        runs[name] = (ROOT / "configs" / recipe, [f"data.root={data}", *COMMON, *extra])
    return runs


def run(out: Path, data: Path, legacy: bool, only: list[str] | None) -> None:
    from mixmask.config import load_config

    pretrain = _pretrain()
    out.mkdir(parents=True, exist_ok=True)
    for name, (recipe, overrides) in planned_runs(data, legacy).items():
        if only and name not in only:
            continue
        pretrain(load_config(recipe, [*overrides, f"out_dir={out / name}"]))
        checkpoint = torch.load(out / name / "checkpoints" / "last.ckpt", weights_only=True)
        torch.save(checkpoint["method"], out / f"{name}.pt")
        print(f"{name}: saved {out / f'{name}.pt'}", flush=True)


def compare(first: Path, second: Path) -> list[dict]:
    rows = []
    for path in sorted(second.glob("*.pt")):
        if not (first / path.name).is_file():
            continue
        old = torch.load(first / path.name, weights_only=True)
        new = torch.load(path, weights_only=True)
        shared = sorted(set(old) & set(new))
        differing = {}
        for key in shared:
            if torch.is_tensor(old[key]) and not torch.equal(old[key], new[key]):
                differing[key] = (old[key].double() - new[key].double()).abs().max().item()
        rows.append({"run": path.stem, "tensors": len(shared),
                     "bit_identical": len(shared) - len(differing),
                     "differing": differing, "only_first": sorted(set(old) - set(new)),
                     "only_second": sorted(set(new) - set(old))})
    print(f"{'run':<20} {'identical':>12}  differing (max |diff|)")
    for row in rows:
        groups: dict[str, float] = {}
        for key, diff in row["differing"].items():
            group = key.split(".")[0] + (" buffers" if "running_" in key
                                         or "num_batches" in key else " params")
            groups[group] = max(groups.get(group, 0.0), diff)
        shown = ", ".join(f"{group} ({diff:.3g})" for group, diff in groups.items()) or "none"
        print(f"{row['run']:<20} {row['bit_identical']:>5}/{row['tensors']:<6}  {shown}")
    (second / "compare.json").write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("out", type=Path)
    run_parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    run_parser.add_argument("--legacy", action="store_true",
                            help="a checkout without the fidelity-mend keys")
    run_parser.add_argument("--only", nargs="*", choices=[*RUNS, *MIM_RUNS])
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, args.data, args.legacy, args.only)
    else:
        compare(args.first, args.second)


if __name__ == "__main__":
    main()
