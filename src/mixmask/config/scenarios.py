"""The ``scenarios`` section: ``mixmask fewshot``, ``mixmask longtail`` and ``mixmask
robustness``, the label-scarce, imbalanced and corrupted settings in which SiameseIM
(arXiv 2206.01204, sec. 5) reports its largest gains.

Each protocol reads frozen features of the run's backbone (centre crops, BN in eval mode);
docs/evaluation.md says what each measures and the choices made.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScenarioConfig:
    # Few-shot: k labelled images per class, drawn `fewshot_episodes` times (episode e draws
    # with seed `seed` + e); also the class-balanced label fractions (SimCLR's 1% / 10%
    # setting) with the same solver and episodes.
    fewshot_shots: tuple[int, ...] = (1, 5, 10)
    fewshot_episodes: int = 10
    fewshot_fractions: tuple[float, ...] = (0.01, 0.1)
    # The solver of MSN's logistic_eval.py (which SiameseIM's few-shot evaluation follows):
    # multinomial logistic regression without intercept, L2 penalty lambda / n (cyanure's
    # objective: mean loss + lambda/n / 2 ||W||^2), lambda 0.00025, at most 300 passes;
    # ours is full-batch L-BFGS in float64 (mixmask.eval.logistic).
    logistic_lambda: float = 0.00025
    logistic_max_iterations: int = 300
    # Long tail: the CIFAR-LT construction of Cao et al. 2019 (LDAM-DRW): class i keeps
    # n_max x (1 / imbalance)^(i / (C - 1)) training images. Many / medium / few-shot
    # classes: more than `longtail_many` training images / between / fewer than
    # `longtail_few` (Liu et al. 2019, OLTR: 100 and 20).
    longtail_imbalance: float = 100.0
    longtail_many: int = 100
    longtail_few: int = 20
    # Robustness: the corruptions applied to the test split on the fly (empty = all 15 of
    # ImageNet-C / CIFAR-10-C) at these severities; `robustness_root`: a folder of a
    # published set to score as well (CIFAR-10-C .npy files, an ImageNet-C tree, or an
    # ImageNet-A / -R / -Sketch class folder tree).
    robustness_corruptions: tuple[str, ...] = ()
    robustness_severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    robustness_root: str = ""
    # Test images scored per corruption and severity (0 = the whole test split; the first
    # N in a fixed random order otherwise, the clean score on the same N).
    robustness_test_images: int = 0
    # What classifies the corrupted images: "linear" (a cached linear probe trained here on
    # clean features) or a finished `mixmask finetune` of the run, by its result's name
    # ("finetune_10pct", "finetune_100pct": the whole finetuned network).
    robustness_classifier: str = "linear"
    # Seed of the episodes, the long-tail subset and the corruptions' noise.
    seed: int = 0
