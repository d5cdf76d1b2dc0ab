"""Collapse is measured, plotted, reported and warned about, and nothing optional takes
down a run that trained (issue 22)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, seeded
from host_sync import HostSyncRecorder

from mixmask.cli import main
from mixmask.config import load_config
from mixmask.errors import IsolatedWorkFailed
from mixmask.eval.collapse import (
    COLLAPSE_PATIENCE,
    COLLAPSE_RATIO,
    CollapseWatch,
    embedding_std,
    spread_problem,
)
from mixmask.methods.siamese.mocov2 import MoCoV2, stale_key_share
from mixmask.pictures.isolated import run_isolated

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- the measure


def test_embedding_std_by_hand():
    # Rows (1, 0) and (0, 1): each coordinate takes 1 and 0 across the batch, std 0.5.
    assert float(embedding_std(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))) == pytest.approx(0.5)
    # The same direction at any length: no spread at all.
    assert float(embedding_std(torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.3, 0.4]]))) == 0.0
    # (1, 0), (-1, 0): coordinate 0 takes 1 and -1 (std 1), coordinate 1 is 0: mean 0.5.
    assert float(embedding_std(torch.tensor([[2.0, 0.0], [-5.0, 0.0]]))) == pytest.approx(0.5)


def test_identical_rows_have_no_spread_and_gaussian_rows_about_one_over_sqrt_d():
    assert float(embedding_std(torch.ones(64, 32) * 0.7)) == 0.0
    for dim in (16, 128, 1024):
        rows = torch.randn(4096, dim, generator=seeded(dim))
        # Each coordinate of a uniform unit vector has variance exactly 1/d; the sample std
        # over B = 4,096 rows is within a few 1/sqrt(2B) (about 1%) of it.
        assert float(embedding_std(rows)) == pytest.approx(1 / math.sqrt(dim), rel=0.04)


def test_the_measure_reads_nothing_back_to_the_host():
    features = torch.randn(32, 64, generator=seeded())
    with HostSyncRecorder() as recorder:
        embedding_std(features)
    assert recorder.syncing_ops == []


# --------------------------------------------------------------------------- the watch


def _rows(values: list[float]) -> list[dict[str, float]]:
    return [{"feature_std": value} for value in values]


def test_the_watch_warns_once_after_patience_logs_below_the_threshold():
    spread = 1 / math.sqrt(64)
    low, high = 0.2 * COLLAPSE_RATIO * spread, spread
    watch = CollapseWatch(dims={"feature_std": 64})
    values = [high, low, low, high, *[low] * COLLAPSE_PATIENCE, low, low]
    warnings = [watch.add(step, row) for step, row in enumerate(_rows(values), 1)]
    first = 4 + COLLAPSE_PATIENCE  # the low run that lasts long enough ends here
    assert [step for step, warning in enumerate(warnings, 1) if warning] == [first]
    assert f"step {first}" in warnings[first - 1] and "learning rate" in warnings[first - 1]
    assert watch.collapsed


def test_the_watch_is_not_fooled_by_one_low_log_and_calls_nan_collapsed():
    spread = 1 / math.sqrt(64)
    watch = CollapseWatch(dims={"feature_std": 64})
    for step, row in enumerate(_rows([spread, 0.0, spread]), 1):
        assert watch.add(step, row) is None
    assert not watch.collapsed
    short = CollapseWatch(dims={"feature_std": 64})
    short.add(1, {"feature_std": float("nan")})
    assert short.collapsed  # a run shorter than the patience: every log it has


def test_one_collapsed_test_set_measure_is_enough():
    watch = CollapseWatch(dims={"feature_std": 64, "test_feature_std": 64},
                          patience={"test_feature_std": 1})
    assert watch.add(5, {"feature_std": 0.1}) is None
    assert "test_feature_std" in watch.add(6, {"test_feature_std": 1e-6})


def test_spread_problem_names_what_a_t_sne_cannot_take():
    spread = torch.randn(200, 16, generator=seeded())
    assert spread_problem(spread) is None
    assert "collapsed" in spread_problem(torch.ones(200, 16))
    assert "one of 1 point" in spread_problem(torch.ones(200, 16))
    nearly = torch.ones(200, 16) + 1e-7 * torch.randn(200, 16, generator=seeded())
    assert "nearly the same point" in spread_problem(nearly)
    broken = spread.clone()
    broken[3, 4] = float("nan")
    assert "NaN" in spread_problem(broken)
    assert "fewer" in spread_problem(spread[:3])


# --------------------------------------------------------------------------- isolation


def _abort(*args, **kwargs):
    os.abort()


def _segfault(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)


def _raise(*args, **kwargs):
    raise ValueError("no figure today")


def _answer(number: int) -> int:
    return number + 1


def test_run_isolated_returns_results_and_turns_crashes_into_one_sentence():
    assert run_isolated(_answer, 41, what="adding") == 42
    with pytest.raises(IsolatedWorkFailed, match="adding crashed .*SIGABRT"):
        run_isolated(_abort, what="adding")
    with pytest.raises(IsolatedWorkFailed, match="killed by SIGSEGV"):
        run_isolated(_segfault, what="adding")
    with pytest.raises(IsolatedWorkFailed, match="ValueError: no figure today"):
        run_isolated(_raise, what="adding")


# A tiny run on the built-in synthetic images whose end-of-run pictures crash the
# interpreter (the t-SNE's way), with and without the isolation.
_CRASHING_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_collapse
    from mixmask.pictures import plots
    from mixmask.cli import main

    plots.write_representation_plots = test_collapse.{crash}
    if {without_isolation}:
        plots.run_isolated = lambda function, *args, what, **kwargs: function(*args, **kwargs)
    sys.exit(main(["pretrain", "configs/quickstart.yaml", "data.dataset=synthetic",
                   "data.subset=64", "data.eval_train_subset=64", "data.eval_test_subset=32",
                   "model.width=0.125", "method.mocov2.queue_size=64",
                   "method.mocov2.proj_hidden_dim=32", "train.batch_size=16", "train.epochs=1",
                   "train.plots=all", "monitor.knn=false", "eval.linear=false",
                   "train.progress_bar=false", "data.num_workers=0", "out_dir={out}"]))
""")


def _crashing_run(tmp_path: Path, crash: str, without_isolation: bool):
    out = tmp_path / f"run-{crash}-{without_isolation}"
    script = _CRASHING_RUN.format(tests=str(TESTS), crash=crash, out=str(out),
                                  without_isolation=without_isolation)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return done, out


@pytest.mark.parametrize("crash, name", [("_abort", "SIGABRT"), ("_segfault", "SIGSEGV")])
def test_a_crash_while_drawing_leaves_a_finished_run_with_exit_0(tmp_path, crash, name):
    done, out = _crashing_run(tmp_path, crash, without_isolation=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "summary.json").is_file()
    said = " ".join(done.stdout.split())  # rich wraps long lines
    assert said.count("Note: some plots were not written") == 1, said[-2000:]
    assert f"crashed (the process was killed by {name})" in said, said[-2000:]
    assert (out / "plots" / "training.png").is_file()  # the curves are still drawn


def test_the_same_crash_without_the_isolation_kills_the_run(tmp_path):
    # What the test above guards against: the harness can tell isolation from none.
    done, out = _crashing_run(tmp_path, "_abort", without_isolation=True)
    assert done.returncode == -signal.SIGABRT, (done.returncode, done.stderr[-2000:])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory):
    """Issue 22's command: two steps of Barlow Twins with MixMask leave every test image
    with the same eval-mode features."""
    from conftest import CIFAR10_TARBALL

    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}")
    out = tmp_path_factory.mktemp("collapsed") / "run"
    # Every plot (train.plots=all, the default), as a user's run draws them.
    code = main(["pretrain", "configs/quickstart.yaml", "data.dataset=imagefolder",
                 f"data.root={CIFAR10_TARBALL}", "data.subset=256", "train.batch_size=32",
                 "train.max_steps=2", "model.width=0.125", "method.name=barlow_twins",
                 "method.masking=mixmask", "data.eval_train_subset=500",
                 "data.eval_test_subset=200", "eval.linear=false",
                 "eval.compare_random_init=false", "train.progress_bar=false",
                 f"out_dir={out}"])
    return code, out


def test_a_collapsed_run_ends_with_exit_0_a_note_and_collapsed_true(collapsed_run, capsys):
    code, out = collapsed_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["collapsed"] is True
    assert summary["test_feature_std"] < COLLAPSE_RATIO / math.sqrt(
        summary["collapse_dims"]["test_feature_std"])
    from mixmask.runs.checkpoint import nonfinite_tensors, read_checkpoint

    assert nonfinite_tensors(read_checkpoint(out / "checkpoints" / "last.ckpt")["method"]) == []
    assert (out / "plots" / "embedding.png").is_file()  # the note in the t-SNE's place
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    assert "features collapsed" in capsys.readouterr().out
    assert main(["knn", str(out), "data.eval_train_subset=200", "data.eval_test_subset=100",
                 "train.progress_bar=false"]) == 0


def test_the_report_says_a_run_collapsed(collapsed_run, tmp_path):
    code, out = collapsed_run
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    assert "<b>Collapsed:</b>" in page.read_text()


# --------------------------------------------------------------------------- MoCo's queue


def test_the_stale_key_share_by_hand():
    # r = C / N: 4,096 keys of a symmetric loss cover 2,048 of 5,000 images, r = 0.4096.
    assert stale_key_share(4096, 5000, 2) == pytest.approx(0.4096 ** 2 / 2)
    assert stale_key_share(5000, 5000, 1) == pytest.approx(0.5)
    assert stale_key_share(7500, 5000, 1) == pytest.approx(1 - 0.5 ** 2 / 2)
    assert stale_key_share(10**6, 5000, 1) == 1.0


def test_the_stale_key_share_matches_a_simulation():
    # Shuffle N images per epoch, queue the last C; count images whose previous key is
    # still queued when they come back.
    images, covered = 2000, 700
    generator = torch.Generator().manual_seed(0)
    orders = [torch.randperm(images, generator=generator) for _ in range(2)]
    position = {int(image): index for index, image in enumerate(orders[0])}
    hits = sum((images - position[int(image)]) + index < covered
               for index, image in enumerate(orders[1]))
    assert hits / images == pytest.approx(stale_key_share(covered, images, 1), abs=0.02)


def test_moco_says_at_start_when_its_queue_covers_too_much_of_the_set():
    config = load_config(ROOT / "configs" / "quickstart.yaml", [])
    warnings = MoCoV2.data_warnings(config, 5000)
    # One key an image (symmetric: false): 4,096 keys cover 82% of 5,000 images.
    assert len(warnings) == 1 and "34% of them" in warnings[0], warnings
    assert warnings[0].startswith("Note:")  # measured harmless on the quickstart's kNN
    assert MoCoV2.data_warnings(config, 50_000) == []  # 8%: 0.34% of images
    assert MoCoV2.data_warnings(config, 2_000)[0].startswith("Warning:")  # every image


# --------------------------------------------------------------------------- results


def test_results_print_the_good_rows_and_name_the_bad_file(tmp_path, capsys):
    for name, text in (("good", json.dumps({"protocol": "knn", "top1": 41.5, "top5": 90.0})),
                       ("bad", '{"protocol": "knn", "top1": 4')):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text("{}\n")
        (run / "eval" / "knn.json").write_text(text)
    assert main(["results", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "41.50" in captured.out and str(tmp_path / "good") in captured.out
    assert str(tmp_path / "bad" / "eval" / "knn.json") in captured.err


def test_a_crash_while_drawing_the_reports_gallery_is_a_note_on_the_page(tmp_path, monkeypatch):
    from mixmask.config import save_config
    from mixmask.pictures import report

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, ["data.dataset=synthetic", f"out_dir={run}"]),
                run / "config.yaml")
    monkeypatch.setattr(report, "_mask_gallery", _segfault)
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(page)]) == 0
    text = " ".join(page.read_text().split())
    assert "Not drawn: drawing the mask gallery crashed (the process was killed by SIGSEGV)" \
        in text


def test_mixmask_plot_with_a_crash_in_its_pictures_exits_2_with_one_sentence(
        collapsed_run, monkeypatch, capsys):
    from mixmask.pictures import plots

    code, out = collapsed_run
    monkeypatch.setattr(plots, "write_representation_plots", _abort)
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "killed by SIGABRT" in err, err


class _OnTheDevice(torch.Tensor):
    """Features as extract_features returns them on a GPU: usable only after ``.cpu()``
    (a CUDA tensor cannot index or be indexed by a host tensor)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        raise RuntimeError(f"{getattr(func, '__name__', func)} on a tensor still on the device")


def test_the_pictures_bring_device_features_to_the_host_first(collapsed_run, monkeypatch):
    # Every GPU run ended with "no plots written" (host labels indexed by device indices).
    from mixmask.eval import features as features_module
    from mixmask.pictures import plots

    code, out = collapsed_run
    extract = features_module.extract_features

    def on_the_device(*args, **kwargs):
        features, labels = extract(*args, **kwargs)
        return features.as_subclass(_OnTheDevice), labels.as_subclass(_OnTheDevice)

    monkeypatch.setattr(features_module, "extract_features", on_the_device)
    written, notes = plots.write_representation_plots(out, ["train.progress_bar=false"])
    assert sorted(path.name for path in written) == ["embedding.png", "retrieval.png"]
