"""The ``mixmask`` command: parse, build, run. User mistakes exit with code 2 and one
sentence, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mixmask import __version__
from mixmask.errors import MixmaskError

EXAMPLES = """examples:
  mixmask recipes                                  # the recipes that ship with mixmask
  mixmask pretrain quickstart data.root=~/data/cifar10
  mixmask pretrain cifar100/mixmask_mocov2_r18 train.device=cuda train.precision=bf16
  mixmask knn runs/quickstart
  mixmask linear runs/quickstart --protocol moco eval.linear_epochs=10
  mixmask finetune runs/quickstart --labels 10% --config configs/eval/semisup_10pct.yaml
  mixmask finetune runs/quickstart --labels 10% --from-scratch
  mixmask detect runs/quickstart --task boxes --config transfer/mosaic
  mixmask segment runs/quickstart --head linear --config transfer/mosaic
  mixmask fewshot runs/quickstart --shots 1 5 10 --episodes 10
  mixmask longtail runs/quickstart --imbalance 100
  mixmask robustness runs/quickstart --corruptions gaussian_noise fog --severities 1 3 5
  mixmask export runs/quickstart --format torchvision --out r18.pth
  mixmask results runs/
  mixmask show-masks configs/cifar100/byol_mixmask_r18.yaml --out masks.png
  mixmask show-masks configs/cifar10/pixmim_vit_tiny.yaml --out pixmim.png
  mixmask reconstruct runs/mae --out reconstruction.png
  mixmask plot runs/quickstart                    # -> runs/quickstart/plots/*.png
  mixmask report runs/quickstart runs/mae --out report.html
  mixmask --quiet linear runs/quickstart          # no bars: one plain line per epoch
  mixmask --import my_method.py pretrain my_method.yaml     # a method defined in your file
"""


# The formats of `mixmask export` (mixmask.runs.export.EXPORT_FORMATS; spelled out here so
# that `mixmask --help` does not import torch).
EXPORT_FORMATS = ("torchvision", "timm", "detectron2", "vitdet", "safetensors")

QUIET_HELP = ("no progress bars (as train.progress_bar=false): one plain line per epoch, for "
              "cluster logs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixmask", description="Self-supervised pretraining of vision backbones.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="a module or .py file that registers methods "
                        "or backbones (register_method); repeatable")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--version", action="version", version=f"mixmask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain a backbone from a YAML config")
    pretrain.add_argument("config", help="a recipe's name (quickstart, cifar10/mae_vit_tiny: "
                                         "`mixmask recipes`) or a YAML file")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value overrides")
    _evaluation_parser(commands, "knn", "weighted kNN top-1/top-5 -> RUN/eval/knn.json")
    linear = _evaluation_parser(commands, "linear", "linear classifier on the frozen backbone "
                                "-> RUN/eval/linear_<protocol>.json")
    linear.add_argument("--protocol", choices=("moco", "cached"), default="moco",
                        help="moco: MoCo's protocol (per-epoch augmentation, lr 30); cached: "
                             "standardised cached features (fast); default moco")
    finetune = _evaluation_parser(commands, "finetune", "finetune the whole network with a "
                                  "share of the labels -> RUN/eval/finetune_<N>pct.json")
    finetune.add_argument("--labels", required=True, help="1%%, 10%% or 100%%")
    finetune.add_argument("--from-scratch", action="store_true",
                          help="the same recipe from the random init of train.seed (baseline)")
    detect = _evaluation_parser(commands, "detect", "object detection (Faster R-CNN) or "
                                "instance segmentation (Mask R-CNN) from the run's backbone "
                                "-> RUN/eval/detect_<task>.json")
    detect.add_argument("--task", choices=("boxes", "instances"), default="boxes",
                        help="boxes: Faster R-CNN, box AP; instances: Mask R-CNN, box and "
                             "mask AP; default boxes")
    detect.add_argument("--from-scratch", action="store_true",
                        help="the same recipe from the random init of train.seed (the floor)")
    segment = _evaluation_parser(commands, "segment", "semantic segmentation from the run's "
                                 "backbone -> RUN/eval/segment_<head>.json")
    segment.add_argument("--head", choices=("linear", "uper"), default="linear",
                         help="linear: frozen backbone, per-pixel linear head; uper: UperNet "
                              "head, everything trained; default linear")
    segment.add_argument("--from-scratch", action="store_true",
                         help="the same recipe from the random init of train.seed (the floor)")
    _scenario_parsers(commands)
    export = _run_parser(commands, "export", "backbone weights for torchvision, timm, "
                         "detectron2, ViTDet or safetensors")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="the file to write")
    results = commands.add_parser("results", help="one table of every evaluation of the runs")
    results.add_argument("runs", nargs="+", help="run folders, or folders holding runs")
    results.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    recipes = commands.add_parser(
        "recipes", help="list the recipes that ship with mixmask, or copy one out to edit")
    recipes.add_argument("name", nargs="?", help="a recipe to print (or to --copy)")
    recipes.add_argument("--copy", metavar="DIR", help="write the recipe into DIR")
    show = commands.add_parser(
        "show-masks", help="write a PNG of what a config feeds the model: originals, masks, "
                           "mixed and switched views, erased and Un-Mix views")
    show.add_argument("config", help="YAML config")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.add_argument("--out", help="PNG path (default: OUT_DIR/mask_gallery.png)")
    show.add_argument("--num-images", type=int, default=8, help="even; default 8")
    reconstruct = _run_parser(
        commands, "reconstruct", "write a PNG of a MAE / PixMIM / A2MIM run's predictions on "
        "test images: original, mask, input, low-pass, reconstruction")
    reconstruct.add_argument("--out", required=True, help="PNG path")
    reconstruct.add_argument("--num-images", type=int, default=8, help="default 8")
    plot = _run_parser(commands, "plot", "write RUN/plots/*.png: training curves, monitors "
                       "against epoch and wall time, a t-SNE of test features, a retrieval grid")
    plot.add_argument("--curves-only", action="store_true",
                      help="only the curves of metrics.csv (no checkpoint or data needed)")
    report = commands.add_parser(
        "report", help="one self-contained HTML page of one or several runs: config, "
                       "summary, evaluations, plots, mask gallery")
    report.add_argument("runs", nargs="+", help="run folders, or folders holding runs")
    report.add_argument("--out", default="report.html", help="default report.html")
    for command in commands.choices.values():
        # --quiet after the command too; SUPPRESS keeps the subcommand's default from
        # resetting a --quiet given before it.
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                             help=QUIET_HELP)
    return parser


def _scenario_parsers(commands) -> None:
    """``mixmask fewshot | longtail | robustness``: each flag sets the scenarios.* key of
    :data:`SCENARIOS`."""
    fewshot = _evaluation_parser(commands, "fewshot", "few-shot logistic regression on frozen "
                                 "features, k images per class -> RUN/eval/fewshot.json")
    # The lists take strings: an override after them (`--shots 1 5 eval.x=1`) is split off
    # in _scenario, and a value that is not a number is one sentence there.
    fewshot.add_argument("--shots", nargs="+", metavar="K",
                         help="labelled images per class (scenarios.fewshot_shots; 1 5 10)")
    fewshot.add_argument("--episodes", type=int, metavar="N",
                         help="draws per shot count (scenarios.fewshot_episodes; 10)")
    longtail = _evaluation_parser(commands, "longtail", "linear probe trained on a long-tailed "
                                  "train split (CIFAR-LT) -> RUN/eval/longtail.json")
    longtail.add_argument("--imbalance", type=float, metavar="R",
                          help="largest / smallest class (scenarios.longtail_imbalance; 100)")
    robustness = _evaluation_parser(commands, "robustness", "accuracy under the 15 common "
                                    "corruptions (CIFAR-10-C style) -> RUN/eval/robustness.json")
    robustness.add_argument("--corruptions", nargs="+", metavar="NAME",
                            help="corruptions to apply (scenarios.robustness_corruptions; "
                                 "default all 15)")
    robustness.add_argument("--severities", nargs="+", metavar="S",
                            help="levels 1-5 (scenarios.robustness_severities; 1 2 3 4 5)")
    robustness.add_argument("--classifier", metavar="NAME",
                            help="linear (a probe on clean features, the default) or a "
                                 "finished finetune of the run, e.g. finetune_10pct "
                                 "(scenarios.robustness_classifier)")
    for command in (fewshot, longtail, robustness):
        command.add_argument("--from-scratch", action="store_true",
                             help="the random init of train.seed (the floor) -> "
                                  "RUN/eval/<protocol>_scratch.json")


def _run_parser(commands, name: str, what: str):
    """A command on a run folder: RUN, its config's overrides, --checkpoint."""
    command = commands.add_parser(name, help=what)
    command.add_argument("run", help="a run folder written by `mixmask pretrain`")
    command.add_argument("overrides", nargs="*",
                         help="section.key=value overrides of the run's config")
    command.add_argument("--checkpoint", help="default: RUN/checkpoints/last.ckpt")
    return command


def _evaluation_parser(commands, name: str, what: str):
    command = _run_parser(commands, name, what)
    command.add_argument("--config", dest="protocol_file", metavar="YAML",
                         help="a protocol's settings merged over the run's config before the "
                              "overrides: a file or a shipped protocol's name, e.g. "
                              "cifar_linear_moco (`mixmask recipes` lists them)")
    return command


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow the flags (`finetune RUN --labels 10% eval.finetune_epochs=1`):
    # argparse gives the positional list only what precedes the first flag.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.quiet and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, "train.progress_bar=false"]
    try:
        from mixmask.methods.registry import import_plugin

        for module in args.imports:
            import_plugin(module)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "show-masks":
            return _show_masks(args)
        if args.command == "reconstruct":
            return _reconstruct(args)
        if args.command in ("detect", "segment"):
            return _dense(args)
        if args.command in SCENARIOS:
            return _scenario(args)
        if args.command == "export":
            return _export(args)
        if args.command == "results":
            return _results(args)
        if args.command == "recipes":
            return _recipes(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "report":
            return _report(args)
        return _evaluate(args)
    except MixmaskError as error:
        print(f"mixmask: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mixmask recipes | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _plot(args) -> int:
    from mixmask.pictures.plots import write_plots

    written, skipped = write_plots(Path(args.run), args.overrides, checkpoint=args.checkpoint,
                                   representation=not args.curves_only)
    for path in written:
        print(f"wrote {path}")
    if skipped:
        print(f"Note: no embedding or retrieval plot: {skipped}")
    return 0


def _report(args) -> int:
    from mixmask.pictures.report import write_report
    from mixmask.runs.folder import find_runs

    print(f"wrote {write_report(find_runs(args.runs), Path(args.out))}")
    return 0


def _pretrain(args) -> int:
    from rich.console import Console

    from mixmask.config import load_config
    from mixmask.pictures.plots import draw_end_of_run_plots
    from mixmask.train.loop import pretrain

    config = load_config(args.config, args.overrides)
    console = Console()
    if config.method.ignored_keys:
        console.print(f"Note: {', '.join(config.method.ignored_keys)} from {args.config} "
                      f"ignored: method '{config.method.name}' has no masking axis.")
    summary = pretrain(config, console=console)
    if summary is not None:  # global rank 0
        # The pictures are the CLI's: pretrain() trains and saves, and Python callers
        # (benchmarks, tests) draw what they want with mixmask.pictures.plots.
        draw_end_of_run_plots(Path(config.out_dir), config.train.plots, say=console.print)
        _print_summary(console, summary, Path(config.out_dir))
    return 0


def _show_masks(args) -> int:
    from mixmask.config import load_config
    from mixmask.pictures.masks import GALLERY_ROWS, gallery_from_config
    from mixmask.pictures.mim_gallery import is_mim_method, mim_gallery_from_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(config.out_dir) / "mask_gallery.png"
    if is_mim_method(config.method.name):
        path = mim_gallery_from_config(config, out, num_images=args.num_images)
        print(f"wrote {path} (rows: original, mask, input, low-pass)")
        return 0
    path = gallery_from_config(config, out, num_images=args.num_images)
    print(f"wrote {path} (rows: {', '.join(GALLERY_ROWS)})")
    return 0


def _reconstruct(args) -> int:
    from mixmask.pictures.mim_gallery import reconstruct_run

    path = reconstruct_run(Path(args.run), args.out, overrides=args.overrides,
                           checkpoint=args.checkpoint, num_images=args.num_images)
    print(f"wrote {path} (rows: original, mask, input, low-pass, reconstruction, + visible)")
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
    from rich.console import Console

    from mixmask.eval import protocols

    console = Console()
    run = Path(args.run)
    common = dict(checkpoint=args.checkpoint, protocol_file=args.protocol_file,
                  console=console)
    if args.command == "knn":
        path, result = protocols.run_knn(run, args.overrides, **common)
    elif args.command == "linear":
        path, result = protocols.run_linear(run, args.overrides, protocol=args.protocol,
                                            **common)
    else:
        path, result = protocols.run_finetune(run, args.overrides, labels=args.labels,
                                              from_scratch=args.from_scratch, **common)
    if not _first_process():
        return 0
    best = (f"; best epoch {result['best_epoch']}: top-1 {result['best_top1']:.2f}"
            if "best_epoch" in result else "")
    last = " (last epoch)" if "best_epoch" in result else ""
    console.print(f"{result['protocol']}: top-1 {result['top1']:.2f}%, top-5 "
                  f"{result['top5']:.2f}%{last}{best}. Protocol: {result['description']}. "
                  f"Written to {path}")
    return 0


def _first_process() -> bool:
    """Not a DDP process other than global rank 0 (``train.devices`` > 1): one report."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _dense(args) -> int:
    from rich.console import Console

    console = Console()
    common = dict(from_scratch=args.from_scratch, checkpoint=args.checkpoint,
                  protocol_file=args.protocol_file, console=console)
    if args.command == "detect":
        from mixmask.eval.detect import run_detect

        path, result = run_detect(Path(args.run), args.overrides, task=args.task, **common)
        keys = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
    else:
        from mixmask.eval.segment import run_segment

        path, result = run_segment(Path(args.run), args.overrides, head=args.head, **common)
        keys = ("miou", "pixel_accuracy")
    if not _first_process():
        return 0
    numbers = ", ".join(f"{key} {result[key]:.2f}" for key in keys if key in result)
    console.print(f"{result['protocol']}: {numbers}. Protocol: {result['description']}. "
                  f"Written to {path}")
    return 0


# The scenario commands, each flag -> the scenarios.* key it sets.
SCENARIOS = {"fewshot": {"shots": "fewshot_shots", "episodes": "fewshot_episodes"},
             "longtail": {"imbalance": "longtail_imbalance"},
             "robustness": {"corruptions": "robustness_corruptions",
                            "severities": "robustness_severities",
                            "classifier": "robustness_classifier"}}


def _scenario(args) -> int:
    import json

    from rich.console import Console

    from mixmask.pictures.scenario_plots import draw_scenario_plots

    console = Console()
    flags = []
    for flag, key in SCENARIOS[args.command].items():
        value = getattr(args, flag)
        if isinstance(value, list):  # overrides written after the list belong to overrides
            args.overrides += [item for item in value if "=" in item]
            value = [item for item in value if "=" not in item]
            if flag != "corruptions" and not all(item.isdigit() for item in value):
                raise MixmaskError(f"--{flag} takes whole numbers, got {' '.join(value)}.")
            value = value if flag == "corruptions" else [int(item) for item in value]
        if value is not None:
            flags.append(f"scenarios.{key}={json.dumps(value)}")
    common = dict(checkpoint=args.checkpoint, protocol_file=args.protocol_file,
                  console=console, from_scratch=args.from_scratch)
    # Flags after the overrides: `--shots 1 5` wins over a scenarios.fewshot_shots= given too.
    overrides = [*args.overrides, *flags]
    if args.command == "fewshot":
        from mixmask.eval.fewshot import run_fewshot

        path, result = run_fewshot(Path(args.run), overrides, **common)
        numbers = "; ".join(f"{name}: {row['mean_top1']:.2f} +- {row['ci95']:.2f}"
                            for name, row in [*((f"{k}-shot", v) for k, v in
                                                result["shots"].items()),
                                              *result["label_fractions"].items()])
    elif args.command == "longtail":
        from mixmask.eval.longtail import run_longtail

        path, result = run_longtail(Path(args.run), overrides, **common)
        numbers = ", ".join(f"{key} {result[key]:.2f}" if result[key] is not None
                            else f"{key} - (no such class)"
                            for key in ("top1", "many_top1", "medium_top1", "few_top1"))
    else:
        from mixmask.eval.robustness import run_robustness

        path, result = run_robustness(Path(args.run), overrides, **common)
        numbers = (f"clean top-1 {result['clean_top1']:.2f}, mean corrupted "
                   f"{result['mean_corrupted_top1']:.2f} (drop {result['drop']:.2f})")
    console.print(f"{result['protocol']}: {numbers}. Protocol: {result['description']}. "
                  f"Written to {path}")
    if args.command in ("fewshot", "robustness"):
        draw_scenario_plots(Path(args.run), console.print)
    return 0


def _export(args) -> int:
    from mixmask.data import DATASET_STATS
    from mixmask.methods import PixelStats
    from mixmask.runs.export import backbone_state, export_backbone
    from mixmask.runs.folder import build_run_method, load_run_checkpoint, load_run_config

    run = Path(args.run)
    config = load_run_config(run, args.overrides)
    checkpoint_path, content = load_run_checkpoint(run, args.checkpoint)
    method = build_run_method(config, None, checkpoint_path, content)
    report = export_backbone(backbone_state(method), config.model, args.format, args.out,
                             image_size=config.data.image_size,
                             pixel_stats=PixelStats(*DATASET_STATS[config.data.dataset]))
    print(f"wrote {report['out']}: {report['tensors']} tensors for {report['target']}.")
    for note in report["notes"]:
        print(f"  {note}")
    return 0


def _recipes(args) -> int:
    from mixmask.config import resolve_recipe
    from mixmask.config.catalog import copy_recipe, pretraining_recipes, protocol_files

    if args.copy:
        if not args.name:
            raise MixmaskError("name the recipe to copy: mixmask recipes NAME --copy DIR.")
        print(f"wrote {copy_recipe(args.name, args.copy)}")
        return 0
    if args.name:
        sys.stdout.write(resolve_recipe(args.name, protocol=True).read_text())
        return 0
    rows = pretraining_recipes()
    width = max(len(row["name"]) for row in rows)
    print(f"{'recipe':<{width}}  {'method':<12} {'masking':<8} {'backbone':<9} {'dataset':<12} "
          "what it is")
    for row in rows:
        print(f"{row['name']:<{width}}  {row['method']:<12} {row['masking']:<8} "
              f"{row['backbone']:<9} {row['dataset']:<12} {row['about']}")
    print("\nprotocol files (--config of knn, linear, finetune, fewshot, longtail, robustness; "
          "transfer/: of detect, segment):")
    for row in protocol_files():
        print(f"  {row['name'].removeprefix('eval/'):<24} {row['about']}")
    print("\nmixmask pretrain NAME [section.key=value ...]; mixmask recipes NAME --copy DIR "
          "writes one out to edit.")
    return 0


def _results(args) -> int:
    from mixmask.eval.results import format_table, result_rows
    from mixmask.runs.folder import find_runs

    problems: list[str] = []
    rows = result_rows(find_runs(args.runs), problems)
    if not rows:
        unread = f" ({problems[0]})" if problems else ""
        raise MixmaskError("no readable evaluation results (RUN/eval/*.json) in the given "
                           f"runs{unread}; run `mixmask knn|linear|finetune RUN` first.")
    sys.stdout.write(format_table(rows, args.format))
    for problem in problems:
        print(f"Note: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
