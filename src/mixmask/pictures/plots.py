"""Pictures of a run, written to ``RUN/plots/`` (``mixmask plot RUN``; pretraining writes
them at its end).

- ``training.png``: every scalar logged per step (the loss, each loss term, MixMask's
  lambda, the learning rate, the gradient norm, ...), one panel each, against the step.
- ``monitor.png``: the kNN / online-probe top-1 of the per-epoch monitors against the
  epoch and against wall time (time-to-accuracy).
- ``embedding.png``: a t-SNE of test-image features coloured by class.
- ``fewshot.png``, ``robustness.png``: from ``RUN/eval/fewshot.json`` / ``robustness.json``
  when those protocols ran (:mod:`mixmask.pictures.scenario_plots`).
- ``retrieval.png``: test queries (left column) and their nearest training images by
  cosine similarity, framed green when the class matches and red when not.

t-SNE rather than UMAP: scikit-learn's t-SNE needs no compiled extra beyond scikit-learn
(umap-learn pulls numba and llvmlite), is deterministic with a seed, and like kNN it keeps
local neighbourhoods, which is what the kNN protocol measures. Distances between far
clusters mean little in either.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch.utils.data import Subset

from mixmask.data.progress import image_progress
from mixmask.errors import (
    IsolatedWorkFailed,
    MixmaskError,
    UntrustedCheckpointError,
    writing,
)
from mixmask.eval.collapse import COLLAPSE_RATIO, healthy_std, spread_problem
from mixmask.eval.features import extract_features
from mixmask.pictures.isolated import run_isolated
from mixmask.pictures.scenario_plots import write_scenario_plots
from mixmask.runs.folder import (
    evaluation_sets,
    load_run_checkpoint,
    load_run_config,
    pretrained_method,
)
from mixmask.train.fabric import resolve_accelerator, settle_precision

DPI = 100  # pixels per inch of every saved figure (sizes below are in inches)
PANEL_COLUMNS = 3
PANEL_SIZE = (4.0, 3.0)
MONITOR_SIZE = (12.0, 4.0)
EMBEDDING_SIZE = (8.0, 8.0)
RETRIEVAL_QUERIES, RETRIEVAL_NEIGHBOURS = 8, 8
EMBEDDING_POINTS = 1000  # test images in the t-SNE
RETRIEVAL_BANK = 5000  # training images searched for neighbours
# Columns of metrics.csv that are not curves: the x axes and the epoch rows' throughput.
_AXES = ("step", "epoch", "wall_time_s", "images_per_s")
_MONITORS = ("knn_top1", "probe_top1", "linear_top1")


def read_metrics(path: Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """metrics.csv as (step rows, epoch rows), numeric cells only. Step rows carry the
    learning rate; epoch rows (the monitors, throughput, wall time) do not."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise MixmaskError(f"cannot read {path}: {error.strerror or error}.") from None
    steps, epochs = [], []
    for row in rows:
        numbers = {}
        for key, value in row.items():
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError):
                continue  # an empty cell: the key was not logged in this row
        (steps if "lr" in numbers else epochs).append(numbers)
    return steps, epochs


def _step_curves(steps: list[dict[str, float]]) -> list[str]:
    """The step scalars to draw, the loss first, then its terms, lambda, lr, the rest."""
    names = list(dict.fromkeys(key for row in steps for key in row if key not in _AXES))

    def order(name: str) -> tuple[int, str]:
        rank = (0 if name == "loss" else 1 if name.startswith("loss") else
                2 if name.startswith("lambda") else 3 if name == "lr" else 4)
        return rank, name

    return sorted(names, key=order)


def training_figure(steps: list[dict[str, float]], collapse_dims: dict[str, int] | None = None):
    """One panel per step scalar against the step; ``PANEL_COLUMNS`` panels a row. The
    collapse monitor's panels (``collapse_dims``: name -> d) show 1/sqrt(d), the spread of
    embeddings spread over the sphere, and the threshold below which the run is called
    collapsed."""
    import matplotlib.pyplot as plt

    names = _step_curves(steps)
    rows = max(1, math.ceil(len(names) / PANEL_COLUMNS))
    figure, axes = plt.subplots(rows, PANEL_COLUMNS, squeeze=False, figsize=(
        PANEL_SIZE[0] * PANEL_COLUMNS, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    for index, axis in enumerate(axes.flat):
        if index >= len(names):
            axis.set_visible(False)
            continue
        name = names[index]
        points = [(row["step"], row[name]) for row in steps if name in row]
        # Markers while the points are few enough to count (one logged step draws no line).
        axis.plot([x for x, _ in points], [y for _, y in points], linewidth=1.2,
                  marker="o" if len(points) <= 30 else None, markersize=3)
        if collapse_dims and name in collapse_dims:
            spread = healthy_std(collapse_dims[name])
            axis.axhline(spread, color="tab:green", linestyle="--", linewidth=1,
                         label=f"1/sqrt({collapse_dims[name]}): spread")
            axis.axhline(COLLAPSE_RATIO * spread, color="tab:red", linestyle=":", linewidth=1,
                         label="collapsed below")
            axis.legend(fontsize="small")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if name == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return figure


def monitor_figure(epochs: list[dict[str, float]]):
    """Top-1 of each per-epoch monitor against the epoch (left) and wall time (right);
    None when the run logged no monitor."""
    import matplotlib.pyplot as plt

    names = [name for name in _MONITORS if any(name in row for row in epochs)]
    if not names:
        return None
    figure, (by_epoch, by_time) = plt.subplots(1, 2, figsize=MONITOR_SIZE, dpi=DPI,
                                               layout="constrained")
    for name in names:
        rows = [row for row in epochs if name in row]
        by_epoch.plot([row["epoch"] for row in rows], [row[name] for row in rows],
                      marker="o", label=name)
        timed = [row for row in rows if "wall_time_s" in row]
        by_time.plot([row["wall_time_s"] / 60 for row in timed], [row[name] for row in timed],
                     marker="o", label=name)
    for axis, label in ((by_epoch, "epoch"), (by_time, "wall time (minutes)")):
        axis.set_xlabel(label)
        axis.set_ylabel("top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    by_epoch.set_title("monitors against epoch")
    by_time.set_title("monitors against wall time")
    return figure


def embedding_figure(features: torch.Tensor, labels: torch.Tensor, classes: list[str], *,
                     seed: int = 0, title: str = ""):
    """A t-SNE of L2-normalised ``features`` (cosine geometry, as the kNN protocol's),
    one colour per class."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    normalised = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
    perplexity = min(30.0, max(2.0, (len(normalised) - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                  ).fit_transform(normalised)
    figure, axis = plt.subplots(figsize=EMBEDDING_SIZE, dpi=DPI, layout="constrained")
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for label in sorted(set(labels.tolist())):
        chosen = (labels == label).cpu().numpy()
        name = classes[label] if label < len(classes) else str(label)
        axis.scatter(points[chosen, 0], points[chosen, 1], s=8,
                     color=colours(label % colours.N), label=name)
    if len(classes) <= 20:
        axis.legend(markerscale=2, fontsize="small", loc="best")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title or f"t-SNE of {len(points)} test images")
    return figure


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [Q, k] of each query's ``k`` most cosine-similar rows of ``bank``."""
    similarity = (torch.nn.functional.normalize(queries.float(), dim=1)
                  @ torch.nn.functional.normalize(bank.float(), dim=1).T)
    return similarity.topk(k, dim=1).indices


def retrieval_figure(query_images: torch.Tensor, query_labels: torch.Tensor,
                     neighbour_images: torch.Tensor, neighbour_labels: torch.Tensor):
    """Rows: a query ([Q, 3, H, W] in [0, 1]) then its neighbours ([Q, K, 3, H, W]),
    framed green (same class) or red."""
    import matplotlib.pyplot as plt

    queries, neighbours = neighbour_images.shape[:2]
    figure, axes = plt.subplots(queries, neighbours + 1, squeeze=False, dpi=DPI,
                                figsize=(neighbours + 1, queries), layout="constrained")
    for row in range(queries):
        cells = [(query_images[row], None)] + [
            (neighbour_images[row, column],
             bool(neighbour_labels[row, column] == query_labels[row]))
            for column in range(neighbours)]
        for column, (image, same) in enumerate(cells):
            axis = axes[row, column]
            axis.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            colour = "black" if same is None else "green" if same else "red"
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(1 if same is None else 3)
    axes[0, 0].set_title("query", fontsize="small")
    axes[0, 1].set_title("nearest training images", fontsize="small", loc="left")
    return figure


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with writing(path) as path:
            figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
    return path


def _collapse_dims(run: Path) -> dict[str, int]:
    """summary.json's ``collapse_dims`` (name -> d), or {} (a run not finished or older)."""
    import json

    try:
        dims = json.loads((run / "summary.json").read_text()).get("collapse_dims", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(dims, dict):
        return {}
    return {name: dim for name, dim in dims.items() if isinstance(dim, int) and dim > 0}


def write_curve_plots(run: Path) -> list[Path]:
    """training.png and (with monitors) monitor.png from ``RUN/metrics.csv``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or opened
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        raise MixmaskError(f"{run} has no metrics.csv: is it a run folder written by "
                           "`mixmask pretrain`?")
    steps, epochs = read_metrics(metrics)
    folder = run / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    if steps:
        written.append(_save(training_figure(steps, _collapse_dims(run)),
                             folder / "training.png"))
    monitors = monitor_figure(epochs)
    if monitors is not None:
        written.append(_save(monitors, folder / "monitor.png"))
    return written


def note_figure(title: str, note: str):
    """A figure that says why a picture is not there (it takes the picture's place)."""
    import textwrap

    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(EMBEDDING_SIZE[0], 2.5), dpi=DPI)
    axis.set_axis_off()
    axis.text(0.5, 0.6, title, ha="center", va="center", fontsize="large", weight="bold")
    axis.text(0.5, 0.3, textwrap.fill(note, 70), ha="center", va="center")
    return figure


def write_representation_plots(run: Path, overrides: list[str] = (), *,
                               checkpoint: str | None = None, console=None
                               ) -> tuple[list[Path], list[str]]:
    """embedding.png and retrieval.png of a run's checkpoint on its labelled data, and the
    notes on what could not be drawn (collapsed features: the t-SNE needs spread, so a
    note takes its place)."""
    import matplotlib

    matplotlib.use("Agg")

    config = load_run_config(run, list(overrides))
    checkpoint_path, content = load_run_checkpoint(run, checkpoint)
    eval_data = evaluation_sets(config)
    accelerator = resolve_accelerator(config.train.device)
    settle_precision(config, accelerator)
    device = torch.device(accelerator)
    method = pretrained_method(config, eval_data, checkpoint_path, content, device)
    sets = {"test": Subset(eval_data.test, range(min(EMBEDDING_POINTS, len(eval_data.test)))),
            "train": Subset(eval_data.train, range(min(RETRIEVAL_BANK, len(eval_data.train))))}
    features = {}
    for name, dataset in sets.items():
        with image_progress(f"features for plots ({name})", len(dataset),
                            enabled=config.train.progress_bar, console=console) as advance:
            features[name] = extract_features(method, dataset, device=device,
                                              encode=method.features, progress=advance,
                                              num_workers=0, precision=config.train.precision)
    # On the host from here: extract_features leaves them on the model's device, and the
    # t-SNE, the neighbour search and the pixel lookups below all index host tensors.
    (test_features, test_labels), (bank_features, bank_labels) = (
        tuple(tensor.cpu() for tensor in features[name]) for name in ("test", "train"))
    folder = run / "plots"
    folder.mkdir(exist_ok=True)
    classes = list(eval_data.train.image_set.classes or [])
    step = content.get("step")
    title = f"t-SNE of {len(test_labels)} test images ({config.method.name}, step {step})"
    notes = []
    problem = spread_problem(test_features)
    if problem is None:
        embedding = embedding_figure(test_features, test_labels, classes,
                                     seed=config.train.seed, title=title)
    else:  # never handed to t-SNE: scikit-learn's crashes the process on identical rows
        notes.append(f"no t-SNE: {problem}")
        embedding = note_figure(title, f"Not drawn: {problem}.")
    written = [_save(embedding, folder / "embedding.png")]
    queries = _spread(len(test_labels), RETRIEVAL_QUERIES)
    neighbours = nearest_neighbours(test_features[queries], bank_features,
                                    min(RETRIEVAL_NEIGHBOURS, len(bank_labels)))
    written.append(_save(retrieval_figure(
        _pixels(eval_data.test.image_set, queries),
        test_labels[queries],
        torch.stack([_pixels(eval_data.train.image_set, row.tolist()) for row in neighbours]),
        bank_labels[neighbours]), folder / "retrieval.png"))
    return written, notes


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``count`` (a class-balanced prefix's classes)."""
    return sorted({round(i * (count - 1) / max(1, wanted - 1)) for i in range(min(wanted, count))})


def _pixels(image_set, indices: list[int]) -> torch.Tensor:
    """Images of an ImageSet as float [N, 3, H, W] in [0, 1] (the stored pixels, before
    any evaluation transform), resized to the first one's size."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    tensors = [pil_to_tensor(image_set.load_pil(index)).float() / 255 for index in indices]
    size = list(tensors[0].shape[1:])
    return torch.stack([resize(tensor, size, antialias=True) if list(tensor.shape[1:]) != size
                        else tensor for tensor in tensors])


def write_plots(run: Path, overrides: list[str] = (), *, checkpoint: str | None = None,
                representation: bool = True) -> tuple[list[Path], str | None]:
    """Every plot of a run; returns the files and, when the embedding and retrieval plots
    could not be drawn (no labels, no test split, no checkpoint), the reason."""
    written = write_curve_plots(run) + write_scenario_plots(run)
    if not representation:
        return written, None
    try:
        # In a child process: features, t-SNE and figures call into torch, scikit-learn
        # and matplotlib, and a crash there must not take this process with it.
        pictures, notes = run_isolated(write_representation_plots, run,
                                       list(overrides), checkpoint=checkpoint,
                                       what="drawing the embedding and retrieval plots")
    except (UntrustedCheckpointError, IsolatedWorkFailed):
        raise  # a file that could run code, or a crash: an error, not a plot left out
    except MixmaskError as error:
        return written, str(error)
    return written + pictures, "; ".join(notes) or None


__all__ = ["embedding_figure", "monitor_figure", "nearest_neighbours", "read_metrics",
           "retrieval_figure", "training_figure", "write_plots"]


def draw_end_of_run_plots(out_dir: Path, which: str, say=print) -> None:
    """RUN/plots/*.png after pretraining, as ``train.plots`` asks (``all``, ``curves``,
    ``none``); a plot that cannot be drawn costs a note, never the run (it is saved)."""
    if which == "none":
        return
    try:
        written, skipped = write_plots(out_dir, representation=which == "all")
    except Exception as error:  # noqa: BLE001 - optional work never fails a saved run
        # The run itself is finished and saved; a picture is not worth failing it.
        # (A crash in a plotting library happens in a child process: an error here.)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        say(f"Note: some plots were not written: {first_line}")
        return
    if written:
        say(f"Plots: {', '.join(path.name for path in written)} in {written[0].parent}.")
    if skipped:
        say(f"Note: {skipped}")
