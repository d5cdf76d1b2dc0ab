"""The ``mixmask`` command: parse, build, run. User mistakes exit with code 2 and one
sentence, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixmask.errors import MixmaskError

EXAMPLES = """examples:
  mixmask pretrain configs/quickstart.yaml data.root=~/data/cifar10
  mixmask pretrain configs/cifar100/mixmask_mocov2_r18.yaml train.device=cuda train.precision=bf16
  mixmask knn runs/quickstart
  mixmask linear runs/quickstart eval.linear_epochs=50
  mixmask show-masks configs/cifar100/byol_mixmask_r18.yaml --out masks.png
  mixmask --import my_method.py pretrain my_method.yaml     # a method defined in your file
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixmask", description="Self-supervised pretraining of vision backbones.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="a module or .py file that registers methods "
                        "or backbones (register_method); repeatable")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain a backbone from a YAML config")
    pretrain.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value overrides")
    for name, what in (("knn", "weighted kNN top-1"), ("linear", "linear-probe top-1")):
        command = commands.add_parser(name, help=f"{what} of a pretrained run's backbone")
        command.add_argument("run", help="a run folder written by `mixmask pretrain`")
        command.add_argument("overrides", nargs="*",
                             help="section.key=value overrides of the run's config")
        command.add_argument("--checkpoint", help="default: RUN/checkpoints/last.ckpt")
    show = commands.add_parser(
        "show-masks", help="write a PNG of what a config feeds the model: originals, masks, "
                           "mixed and switched views, erased and Un-Mix views")
    show.add_argument("config", help="YAML config")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.add_argument("--out", help="PNG path (default: OUT_DIR/mask_gallery.png)")
    show.add_argument("--num-images", type=int, default=8, help="even; default 8")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from mixmask.methods.registry import import_plugin

        for module in args.imports:
            import_plugin(module)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "show-masks":
            return _show_masks(args)
        return _evaluate(args)
    except MixmaskError as error:
        print(f"mixmask: error: {error}", file=sys.stderr)
        return 2


def _pretrain(args) -> int:
    from rich.console import Console

    from mixmask.config import load_config
    from mixmask.engine import pretrain

    config = load_config(args.config, args.overrides)
    console = Console()
    if config.method.ignored_keys:
        console.print(f"Note: {', '.join(config.method.ignored_keys)} from {args.config} "
                      f"ignored: method '{config.method.name}' has no masking axis.")
    summary = pretrain(config, console=console)
    if summary is not None:  # global rank 0
        _print_summary(console, summary, Path(config.out_dir))
    return 0


def _show_masks(args) -> int:
    from mixmask.config import load_config
    from mixmask.viz import GALLERY_ROWS, gallery_from_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(config.out_dir) / "mask_gallery.png"
    path = gallery_from_config(config, out, num_images=args.num_images)
    print(f"wrote {path} (rows: {', '.join(GALLERY_ROWS)})")
    return 0


def _print_summary(console, summary: dict, out_dir: Path) -> None:
    from rich.table import Table

    rows = []
    for key in ("knn_top1", "linear_top1"):
        if key in summary:
            random = summary.get(f"{key}_random_init")
            rows.append((key, f"{summary[key]:.2f}", "-" if random is None else f"{random:.2f}"))
    if "probe_top1" in summary:
        rows.append(("online probe (last epoch)", f"{summary['probe_top1']:.2f}", "-"))
    if rows:
        table = Table(title="result (top-1 %, test set)")
        table.add_column("metric")
        table.add_column("pretrained", justify="right")
        table.add_column("random init", justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print("No evaluation: the dataset has no labels, or the monitors and "
                      "evaluation are off.")
    speed = (f"{summary['images_per_s']:.0f} training images/s"
             if summary.get("images_per_s") else "no training step in this invocation")
    skipped = summary.get("skipped_steps", 0)
    skipped_note = f", {skipped} non-finite steps skipped" if skipped else ""
    console.print(f"{summary['steps']} steps in {summary['wall_time_s']:.0f} s ({speed}"
                  f"{skipped_note}). Run folder: {out_dir}")


def _evaluate(args) -> int:
    import torch

    from mixmask.config import load_config
    from mixmask.data.splits import load_eval_data
    from mixmask.engine import (
        load_checkpoint_file,
        load_state,
        nonfinite_tensors,
        resolve_accelerator,
    )
    from mixmask.eval import evaluate
    from mixmask.methods import PixelStats, build_method

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise MixmaskError(f"{run} is not a run folder (no config.yaml); pass the out_dir of "
                           "`mixmask pretrain`.")
    config = load_config(run / "config.yaml", args.overrides)
    default_checkpoint = run / "checkpoints" / "last.ckpt"
    checkpoint_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint
    if not checkpoint_path.is_file():
        raise MixmaskError(f"no checkpoint at {checkpoint_path}; has the run saved one yet?")
    checkpoint = load_checkpoint_file(checkpoint_path,
                                      other="pass another one with --checkpoint PATH")
    bad = nonfinite_tensors(checkpoint["method"])
    if bad:
        raise MixmaskError(f"checkpoint {checkpoint_path} holds non-finite values ({len(bad)} "
                           f"tensors, e.g. {bad[0]}): it comes from a diverged run; evaluate an "
                           "earlier one with --checkpoint PATH.")
    eval_data, reason = load_eval_data(config)
    if eval_data is None:
        raise MixmaskError(f"cannot evaluate: {reason}.")
    train_set = eval_data.train.image_set
    method = build_method(config, PixelStats(tuple(train_set.mean), tuple(train_set.std)))
    load_state(method, checkpoint["method"], checkpoint_path)
    device = torch.device(resolve_accelerator(config.train.device))
    torch.manual_seed(config.train.seed)
    results = evaluate(method.to(device), eval_data, config, device,
                       knn=args.command == "knn", linear=args.command == "linear")
    results.update(checkpoint=str(checkpoint_path), step=checkpoint["step"])
    (run / f"eval_{args.command}.json").write_text(json.dumps(results, indent=2))
    key = f"{args.command}_top1"
    print(f"{key}: {results[key]:.2f}% (checkpoint step {checkpoint['step']}); "
          f"written to {run / f'eval_{args.command}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
