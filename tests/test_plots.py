"""Run plots (mixmask plot RUN, and pretraining's end): the curves of a known metrics.csv
read back from the figures, PNG files of the expected pixel size, the nearest-neighbour
search against a hand case, and progress output with and without --quiet."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.pictures import plots
from mixmask.train.loop import pretrain

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["data.dataset=synthetic", "data.subset=32", "data.eval_train_subset=32",
        "data.eval_test_subset=16", "data.num_workers=0", "model.width=0.125",
        "method.mocov2.proj_hidden_dim=32", "method.mocov2.queue_size=64",
        "train.batch_size=16", "train.epochs=2", "train.log_every=1", "monitor.knn=true",
        "monitor.knn_every=1",
        "monitor.online_probe=false", "eval.linear=false", "eval.knn=false",
        "eval.compare_random_init=false"]


def _write_metrics(path: Path) -> None:
    """Five logged steps (loss, two terms, lambda, lr) and two epoch rows with kNN."""
    columns = ["step", "epoch", "lr", "loss_clean", "loss_mixmask", "lambda_mixmask", "loss",
               "knn_top1", "images_per_s", "wall_time_s"]
    rows = [{"step": s, "epoch": s / 5, "lr": 0.1 * s, "loss_clean": 2.0 - 0.1 * s,
             "loss_mixmask": 2.5 - 0.1 * s, "lambda_mixmask": 0.5, "loss": 4.5 - 0.2 * s}
            for s in range(1, 6)]
    rows.insert(3, {"step": 3, "epoch": 1, "knn_top1": 20.0, "images_per_s": 50.0,
                    "wall_time_s": 60.0})
    rows.append({"step": 5, "epoch": 2, "knn_top1": 30.0, "images_per_s": 55.0,
                 "wall_time_s": 180.0})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_metrics_split_into_step_and_epoch_rows(tmp_path):
    _write_metrics(tmp_path / "metrics.csv")
    steps, epochs = plots.read_metrics(tmp_path / "metrics.csv")
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5]
    assert [row["knn_top1"] for row in epochs] == [20.0, 30.0]
    assert "knn_top1" not in steps[0] and "lr" not in epochs[0]


def test_the_training_figure_draws_every_logged_point(tmp_path):
    _write_metrics(tmp_path / "metrics.csv")
    steps, _ = plots.read_metrics(tmp_path / "metrics.csv")
    figure = plots.training_figure(steps)
    drawn = {axis.get_title(): axis.lines[0] for axis in figure.axes if axis.get_visible()}
    # The loss first, then its terms, lambda and the learning rate.
    assert list(drawn) == ["loss", "loss_clean", "loss_mixmask", "lambda_mixmask", "lr"]
    assert list(drawn["loss"].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(drawn["loss"].get_ydata()) == pytest.approx([4.3, 4.1, 3.9, 3.7, 3.5])
    assert list(drawn["lr"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_the_monitor_figure_plots_top1_against_epoch_and_minutes(tmp_path):
    _write_metrics(tmp_path / "metrics.csv")
    _, epochs = plots.read_metrics(tmp_path / "metrics.csv")
    by_epoch, by_time = plots.monitor_figure(epochs).axes
    assert list(by_epoch.lines[0].get_xdata()) == [1, 2]
    assert list(by_time.lines[0].get_xdata()) == [1.0, 3.0]  # 60 s and 180 s
    assert list(by_time.lines[0].get_ydata()) == [20.0, 30.0]
    assert plots.monitor_figure([]) is None


def test_curve_pngs_have_the_figure_size(tmp_path):
    _write_metrics(tmp_path / "metrics.csv")
    written = plots.write_curve_plots(tmp_path)
    assert [path.name for path in written] == ["training.png", "monitor.png"]
    with Image.open(tmp_path / "plots" / "training.png") as image:
        image.verify()  # a valid PNG
    with Image.open(tmp_path / "plots" / "training.png") as image:
        # Five curves: two rows of three 400 x 300 px panels.
        assert (image.format, image.size) == ("PNG", (1200, 600))
    with Image.open(tmp_path / "plots" / "monitor.png") as image:
        assert image.size == (1200, 400)


def test_nearest_neighbours_by_cosine_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[2.0, 0.1], [0.0, -3.0]])
    # Query 1 points along x: bank 0 (cos ~1), then bank 2 (cos ~0.74).
    # Query 2 points along -y: bank 3 and bank 0 are both at cos 0; bank 1 is at -1.
    indices = plots.nearest_neighbours(queries, bank, 2)
    assert indices[0].tolist() == [0, 2]
    assert set(indices[1].tolist()) == {0, 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("plots") / "run"
    # The CLI draws a run's pictures (train.plots=all, the default) once pretrain() returns.
    assert main(["pretrain", str(RECIPE), *TINY, "train.progress_bar=false",
                 f"out_dir={out_dir}"]) == 0
    return out_dir


def test_pretrain_from_python_draws_no_pictures(tmp_path):
    # The engine trains and saves; pictures are the CLI's (mixmask.pictures), so a Python
    # caller's run has none unless it asks.
    out_dir = tmp_path / "run"
    tiny = [*TINY, "train.epochs=1", "monitor.knn=false"]
    pretrain(load_config(RECIPE, [*tiny, "train.progress_bar=false", f"out_dir={out_dir}"]))
    assert (out_dir / "summary.json").is_file() and not (out_dir / "plots").exists()


def test_pretraining_ends_with_every_plot(run):
    names = sorted(path.name for path in (run / "plots").glob("*.png"))
    assert names == ["embedding.png", "monitor.png", "retrieval.png", "training.png"]
    with Image.open(run / "plots" / "embedding.png") as image:
        assert image.size == (800, 800)
    with Image.open(run / "plots" / "retrieval.png") as image:
        assert image.size == (900, 800)  # 1 query + 8 neighbours wide, 8 rows
    _, epochs = plots.read_metrics(run / "metrics.csv")
    monitor = plots.monitor_figure(epochs)
    assert len(monitor.axes[0].lines[0].get_xdata()) == 2  # kNN after each of 2 epochs


def test_plot_command_rewrites_curves_only(run, capsys):
    (run / "plots" / "training.png").unlink()
    assert main(["plot", str(run), "--curves-only"]) == 0
    assert "training.png" in capsys.readouterr().out
    assert (run / "plots" / "training.png").is_file()


def test_plot_of_a_folder_that_is_no_run_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "is it a run folder" in capsys.readouterr().err


def test_an_evaluation_shows_progress_unless_quiet(run, capsys):
    assert main(["knn", str(run), "train.progress_bar=true"]) == 0
    shown = capsys.readouterr().out
    assert "features (train)" in shown and "img/s" in shown
    assert main(["knn", str(run), "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert "features (" not in quiet and "img/s" not in quiet
    assert "top-1" in quiet.lower() or "knn" in quiet.lower()
