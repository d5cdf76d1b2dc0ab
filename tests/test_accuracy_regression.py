"""Accuracy regression: a few-minute real pretrain must beat the random-init backbone.

Peers' users were bitten by silent accuracy regressions, so CI pretrains the quickstart
recipe (MixMask + MoCo v2, quarter-width ResNet-18) on a class-balanced subset of real
CIFAR-10 and checks the kNN top-1 gain over the same backbone at initialisation.

Calibration (2-core CPU, torch 2.14.1; `python benchmarks/pretrain_vs_random.py
--regression-test --seeds 0 1 2 data.root=../shared/data/cifar10_jpeg_q75.tar.gz`):
CALIBRATION
"""

from pathlib import Path

import pytest

from mixmask.config import load_config
from mixmask.engine import pretrain

REGRESSION_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
REGRESSION_OVERRIDES = (
    "data.subset=2560", "data.eval_train_subset=5000", "data.eval_test_subset=1000",
    "train.epochs=4", "monitor.knn=false", "monitor.online_probe=false", "eval.linear=false",
    "train.progress_bar=false",
)
MIN_KNN_GAIN = 0.0


@pytest.mark.slow
def test_pretraining_beats_random_init_on_knn(tmp_path, cifar10_tarball):
    config = load_config(REGRESSION_CONFIG, [*REGRESSION_OVERRIDES, f"data.root={cifar10_tarball}",
                                             "eval.compare_random_init=true",
                                             f"out_dir={tmp_path / 'run'}"])
    summary = pretrain(config)
    gain = summary["knn_top1"] - summary["knn_top1_random_init"]
    assert gain >= MIN_KNN_GAIN, (
        f"kNN top-1 {summary['knn_top1']:.2f} vs random init "
        f"{summary['knn_top1_random_init']:.2f}: gain {gain:.2f} < {MIN_KNN_GAIN}")
