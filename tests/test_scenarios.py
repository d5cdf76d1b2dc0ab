"""The scenario protocols (SiameseIM's few-shot, long-tail and robustness claims): k-shot
draws, the 95% interval, MSN's logistic regression against scikit-learn's solver, the
CIFAR-LT profile and OLTR groups against the published counts, the corruption means, and
the three commands end to end on a tiny pretrained run (JSON, results rows, plots,
errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
import pytest
import torch
from helpers import seeded

from mixmask.cli import main
from mixmask.eval.data import LabelSplitError
from mixmask.eval.fewshot import interval95, k_shot_indices
from mixmask.eval.logistic import (
    centre_and_normalise_rows,
    fit_logistic,
    logistic_objective,
    logistic_top1,
)
from mixmask.eval.longtail import group_top1, longtail_counts, longtail_indices, shot_groups
from mixmask.eval.results import result_rows
from mixmask.eval.robustness import corruption_table

# --------------------------------------------------------------------------- few-shot


def test_k_shot_draws_exactly_k_per_class_deterministically_and_differently_per_seed():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=seeded(1))]
    chosen = k_shot_indices(labels, 5, seed=3)
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [5] * 10
    assert len(set(chosen.tolist())) == 50
    assert torch.equal(chosen, k_shot_indices(labels, 5, seed=3))
    assert not torch.equal(chosen, k_shot_indices(labels, 5, seed=4))
    with pytest.raises(LabelSplitError, match="fewer than the 31 shots"):
        k_shot_indices(labels, 31, seed=0)


def test_interval95_is_the_normal_interval_of_the_mean_by_hand():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sample variance 5/3.
    assert interval95([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert interval95([7.0]) == 0.0
    assert interval95([3.0, 3.0, 3.0]) == 0.0


def test_rows_are_centred_and_normalised_as_cyanure_preprocess():
    features = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    rows = centre_and_normalise_rows(features)
    # [1, 2, 6] - 3 = [-2, -1, 3], norm sqrt(14); [0, 0, 3] - 1 = [-1, -1, 2], norm sqrt(6).
    expected = torch.tensor([[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]], dtype=torch.float64)
    expected /= torch.tensor([[math.sqrt(14)], [math.sqrt(6)]], dtype=torch.float64)
    assert torch.allclose(rows, expected)


def test_logistic_objective_matches_a_hand_computation():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    rows = torch.tensor([[1.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # logits: [1, 2] (label 0) and [0.5, 0] (label 1); CE = log-sum-exp - the label's logit.
    ce = ((math.log(math.exp(1) + math.exp(2)) - 1) + (math.log(math.exp(0.5) + 1) - 0)) / 2
    expected = ce + 0.5 * 0.1 * (1 + 4)
    assert logistic_objective(weight, rows, labels, 0.1).item() == pytest.approx(expected)


def test_logistic_regression_agrees_with_scikit_learn_on_the_same_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    generator = seeded(0)
    features = torch.randn(90, 6, generator=generator) + torch.arange(3).repeat(30)[:, None]
    labels = torch.arange(3).repeat(30)
    lambd = 0.5  # penalty lambd / n: scikit-learn's C = 1 / lambd (C sum + 1/2 ||W||^2)
    ours = fit_logistic(features, labels, 3, lambd=lambd, max_iterations=500, tolerance=1e-10)
    rows = centre_and_normalise_rows(features).numpy()
    reference = sklearn.LogisticRegression(C=1 / lambd, fit_intercept=False, tol=1e-12,
                                           max_iter=5000).fit(rows, labels.numpy())
    # Multinomial weights are fixed up to adding one vector to every class; the L2 penalty
    # picks the zero-mean one in both solutions.
    assert numpy.allclose(ours.numpy(), reference.coef_, atol=1e-5)


def test_logistic_regression_separates_linearly_separable_features():
    generator = seeded(2)
    centres = torch.eye(8)[:4] * 5
    labels = torch.arange(4).repeat(10)
    features = centres[labels] + 0.3 * torch.randn(40, 8, generator=generator)
    test_labels = torch.arange(4).repeat(25)
    test_features = centres[test_labels] + 0.3 * torch.randn(100, 8, generator=generator)
    weight = fit_logistic(features, labels, 4)
    assert logistic_top1(weight, test_features, test_labels) == 100.0
    assert torch.equal(weight, fit_logistic(features, labels, 4))  # deterministic


# --------------------------------------------------------------------------- long tail


def test_cifar_lt_profile_is_the_published_one():
    # Cao et al. 2019 (LDAM-DRW), CIFAR-10-LT at imbalance 100: 12,406 training images.
    counts = longtail_counts(10, 5000, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406
    assert longtail_counts(10, 5000, 10)[-1] == 500 and sum(longtail_counts(10, 5000, 10)) == 20431
    assert sum(longtail_counts(100, 500, 100)) == 10847  # CIFAR-100-LT at 100


def test_oltr_groups_of_cifar100_lt_are_35_35_30():
    groups = shot_groups(longtail_counts(100, 500, 100), many=100, few=20)
    # The split the long-tail literature reports for CIFAR-100-LT at imbalance 100.
    assert [len(groups[name]) for name in ("many", "medium", "few")] == [35, 35, 30]
    assert groups["many"] == list(range(35)) and groups["few"] == list(range(70, 100))
    # CIFAR-10-LT at 100: every class keeps at least 50, so no few-shot class.
    assert shot_groups(longtail_counts(10, 5000, 100), 100, 20)["few"] == []


def test_longtail_subset_keeps_the_profile_from_each_class_deterministically():
    labels = torch.arange(4).repeat_interleave(40)[torch.randperm(160, generator=seeded(5))]
    chosen, counts = longtail_indices(labels, 8.0, seed=1)
    assert counts == [40, 20, 10, 5]
    assert torch.bincount(labels[chosen], minlength=4).tolist() == counts
    assert torch.equal(chosen, longtail_indices(labels, 8.0, seed=1)[0])
    assert not torch.equal(chosen, longtail_indices(labels, 8.0, seed=2)[0])
    with pytest.raises(LabelSplitError, match="no image of the smallest"):
        longtail_indices(labels, 100.0, seed=0)


def test_group_top1_counts_only_the_group_and_is_none_when_empty():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 0])
    assert group_top1(predictions, labels, [0]) == 50.0
    assert group_top1(predictions, labels, [1, 2]) == 50.0
    assert group_top1(predictions, labels, []) is None


def test_corruption_table_means_by_hand():
    table = corruption_table({"gaussian_noise": {1: 80.0, 5: 40.0},
                              "fog": {1: 70.0, 5: 50.0}})
    assert table["corruption_mean"] == {"gaussian_noise": 60.0, "fog": 60.0}
    assert table["severity_mean"] == {"1": 75.0, "5": 45.0}
    assert table["group_mean"] == {"noise": 60.0, "weather": 60.0}
    assert table["mean_top1"] == 60.0


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from conftest import CIFAR10_TARBALL
    from test_eval_protocols import pretrained_run

    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}")
    return pretrained_run(tmp_path_factory.mktemp("scenarios"), CIFAR10_TARBALL)


def test_fewshot_command_writes_its_contract_and_plot(tiny_run, capsys):
    # The run's evaluation split holds 200 training images (about 20 per class).
    assert main(["fewshot", str(tiny_run), "--shots", "1", "3", "--episodes", "3",
                 "scenarios.fewshot_fractions=[0.1]", "--quiet"]) == 0
    result = json.loads((tiny_run / "eval" / "fewshot.json").read_text())
    assert result["protocol"] == "fewshot" and set(result["shots"]) == {"1", "3"}
    for shots, row in result["shots"].items():
        assert row["train_images"] == 10 * int(shots)
        assert row["mean_top1"] == pytest.approx(sum(row["episode_top1"]) / 3)
        assert row["ci95"] == pytest.approx(interval95(row["episode_top1"]))
        assert row["episode_seeds"] == [0, 1, 2]
    assert set(result["label_fractions"]) == {"10%"}
    assert result["checkpoint"] and result["versions"] and result["device"]
    assert (tiny_run / "plots" / "fewshot.png").stat().st_size > 1000
    rows = {row["protocol"]: row for row in result_rows([tiny_run])}
    assert rows["fewshot_1shot"]["ci95"] == pytest.approx(result["shots"]["1"]["ci95"])
    assert rows["fewshot_10pct"]["top1"] == result["label_fractions"]["10%"]["mean_top1"]
    assert "fewshot: 1-shot" in capsys.readouterr().out.replace("\n", " ")


def test_longtail_command_writes_its_contract(tiny_run):
    assert main(["longtail", str(tiny_run), "--imbalance", "4", "eval.linear_epochs=3",
                 "--quiet"]) == 0
    result = json.loads((tiny_run / "eval" / "longtail.json").read_text())
    counts = result["class_counts"]
    assert counts[0] / counts[-1] == pytest.approx(4, rel=0.25)
    assert result["train_images"] == sum(counts)
    assert {"top1", "many_top1", "medium_top1", "few_top1"} <= set(result)
    # 200 images over 10 classes: at most ~20 per class, so none above 100 (many-shot).
    assert result["many_top1"] is None and result["groups"]["many"] == []
    assert result["test_images"] == 100


def test_robustness_command_and_a_cifar_c_folder(tiny_run, tmp_path):
    # A CIFAR-10-C folder in the official layout: 5 severities x 20 images.
    images = numpy.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=numpy.uint8)
    numpy.save(tmp_path / "fog.npy", images)
    numpy.save(tmp_path / "labels.npy", numpy.tile(numpy.arange(10), 10).astype(numpy.int64))
    assert main(["robustness", str(tiny_run), "--corruptions", "gaussian_noise", "contrast",
                 "--severities", "1", "5", "scenarios.robustness_test_images=30",
                 f"scenarios.robustness_root={tmp_path}", "eval.linear_epochs=2",
                 "--quiet"]) == 0
    result = json.loads((tiny_run / "eval" / "robustness.json").read_text())
    assert set(result["corruptions"]) == {"gaussian_noise", "contrast"}
    assert set(result["corruptions"]["contrast"]) == {"1", "5"}
    cells = [v for row in result["corruptions"].values() for v in row.values()]
    assert result["mean_corrupted_top1"] == pytest.approx(sum(cells) / 4)
    assert result["drop"] == pytest.approx(result["clean_top1"] - result["mean_corrupted_top1"])
    assert result["test_images"] == 30
    published = result["published_set"]
    assert published["layout"] == "cifar_c" and set(published["corruptions"]) == {"fog"}
    assert (tiny_run / "plots" / "robustness.png").is_file()
    protocols = {row["protocol"] for row in result_rows([tiny_run])}
    assert {"robustness_clean", "robustness_corrupted", "robustness_cifar_c"} <= protocols


@pytest.mark.parametrize("argv, message", [
    (["--corruptions", "sunburn"], "unknown corruption 'sunburn'"),
    (["--severities", "6"], "levels 1 to 5"),
])
def test_robustness_refuses_bad_input_in_one_sentence(tiny_run, capsys, argv, message):
    assert main(["robustness", str(tiny_run), *argv, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_robustness_with_the_finetuned_network_scores_what_finetune_scored(tiny_run, capsys):
    assert main(["robustness", str(tiny_run), "--classifier", "finetune_1pct",
                 "--quiet"]) == 2
    assert "needs a finished `mixmask finetune" in capsys.readouterr().err
    assert main(["finetune", str(tiny_run), "--labels", "10%", "eval.finetune_epochs=1",
                 "eval.finetune_batch_size=8", "--quiet"]) == 0
    assert main(["robustness", str(tiny_run), "--classifier", "finetune_10pct",
                 "--corruptions", "fog", "--severities", "2", "--quiet"]) == 0
    result = json.loads((tiny_run / "eval" / "robustness.json").read_text())
    finetuned = json.loads((tiny_run / "eval" / "finetune_10pct.json").read_text())
    assert result["settings"]["classifier"] == "finetune_10pct"
    # The same network on the same centre crops of the whole test split: finetune's own
    # last-epoch test top-1 is the clean score here, computed by another code path.
    assert result["test_images"] == finetuned["test_images"]
    assert result["clean_top1"] == pytest.approx(finetuned["top1"], abs=1e-4)  # fp32 mean there


def test_the_report_shows_the_scenario_rows_and_curves(tiny_run, tmp_path):
    from mixmask.pictures.report import write_report

    assert main(["fewshot", str(tiny_run), "--shots", "1", "--episodes", "2",
                 "scenarios.fewshot_fractions=[]", "--quiet"]) == 0
    assert main(["robustness", str(tiny_run), "--corruptions", "contrast", "--severities",
                 "1", "3", "scenarios.robustness_test_images=20", "eval.linear_epochs=1",
                 "--quiet"]) == 0
    page = write_report([tiny_run], tmp_path / "report.html").read_text()
    for protocol in ("fewshot_1shot", "robustness_clean", "robustness_corrupted"):
        assert f'data-protocol="{protocol}"' in page
    assert "<figcaption>fewshot</figcaption>" in page
    assert "<figcaption>robustness</figcaption>" in page
