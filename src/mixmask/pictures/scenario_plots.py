"""Pictures of the scenario protocols, drawn from their results into ``RUN/plots/``:

- ``fewshot.png``: mean test top-1 against labelled images per class (log axis), with the
  95% interval of the episodes as a band, and the label fractions beside it;
- ``robustness.png``: top-1 against corruption severity, one thin line per corruption, the
  mean over corruptions bold, the clean score at severity 0;
- ``*_scratch.png``: the same for the random-init floor (``--from-scratch``).

``mixmask fewshot | robustness`` draw theirs after writing the JSON (in a child process:
a picture never takes down an evaluation that finished), ``mixmask plot RUN`` redraws
them, and the HTML report shows them with the run's other plots.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from mixmask.errors import MixmaskError
from mixmask.pictures.isolated import run_isolated

DPI = 110


def fewshot_figure(result: dict[str, Any]):
    import matplotlib.pyplot as plt

    shots = sorted(result.get("shots", {}).items(), key=lambda item: int(item[0]))
    fractions = list(result.get("label_fractions", {}).items())
    figure, axes = plt.subplots(1, 2 if fractions else 1, figsize=(8 if fractions else 5, 3.4),
                                dpi=DPI, squeeze=False,
                                gridspec_kw={"width_ratios": [2, 1] if fractions else [1]})
    axis = axes[0][0]
    if shots:
        x = [int(k) for k, _ in shots]
        mean = [row["mean_top1"] for _, row in shots]
        ci = [row["ci95"] for _, row in shots]
        axis.plot(x, mean, marker="o", color="C0")
        axis.fill_between(x, [m - c for m, c in zip(mean, ci, strict=True)],
                          [m + c for m, c in zip(mean, ci, strict=True)], color="C0", alpha=0.2,
                          label="95% interval of the episodes")
        axis.set_xscale("log")
        axis.set_xticks(x, [str(value) for value in x])
        axis.legend(loc="lower right", fontsize="small")
    axis.set_xlabel("labelled images per class")
    axis.set_ylabel("test top-1 %")
    axis.set_title("few-shot: logistic regression on frozen features", fontsize="medium")
    axis.grid(alpha=0.3)
    if fractions:
        side = axes[0][1]
        side.bar(range(len(fractions)), [row["mean_top1"] for _, row in fractions],
                 yerr=[row["ci95"] for _, row in fractions], color="C1", capsize=4)
        side.set_xticks(range(len(fractions)), [name for name, _ in fractions])
        side.set_xlabel("share of the labels")
        side.set_title("label fractions", fontsize="medium")
        side.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def robustness_figure(result: dict[str, Any]):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8), dpi=DPI)
    clean = result["clean_top1"]
    for index, (name, row) in enumerate(result.get("corruptions", {}).items()):
        severities = sorted(int(s) for s in row)
        axis.plot([0, *severities], [clean, *(row[str(s)] for s in severities)],
                  color=plt.get_cmap("tab20")(index % 20), linewidth=1, alpha=0.8,
                  label=name.replace("_", " "))
    means = sorted((int(s), value) for s, value in result.get("severity_mean", {}).items())
    if means:
        axis.plot([0, *(s for s, _ in means)], [clean, *(v for _, v in means)], color="black",
                  linewidth=2.5, marker="o", label="mean")
    axis.set_xlabel("severity (0 = clean)")
    axis.set_ylabel("test top-1 %")
    axis.set_title(f"robustness: clean {clean:.1f}%, mean corrupted "
                   f"{result['mean_corrupted_top1']:.1f}%", fontsize="medium")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="x-small", ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return figure


FIGURES = {"fewshot": fewshot_figure, "robustness": robustness_figure}


def write_scenario_plots(run: Path) -> list[Path]:
    """``RUN/plots/<protocol>.png`` for each scenario result in ``RUN/eval/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (protocol, draw), suffix in itertools.product(FIGURES.items(), ("", "_scratch")):
        path = run / "eval" / f"{protocol}{suffix}.json"
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
            figure = draw(result)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MixmaskError(f"{path} cannot be drawn ({error}).") from None
        (run / "plots").mkdir(exist_ok=True)
        out = run / "plots" / f"{protocol}{suffix}.png"
        figure.savefig(out)
        plt.close(figure)
        written.append(out)
    return written


def draw_scenario_plots(run: Path, say) -> None:
    """:func:`write_scenario_plots` in a child process; a failure or crash is one note."""
    try:
        written = run_isolated(write_scenario_plots, run, what="drawing the scenario plots")
    except Exception as error:  # noqa: BLE001 - optional work never fails a finished evaluation
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        say(f"Note: the plot was not written: {first_line}")
        return
    for path in written:
        say(f"Plot: {path}")
