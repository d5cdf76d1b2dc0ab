"""Datasets, augmentations and torch Datasets for pretraining and evaluation."""

from mixmask.data.datasets import DATASET_STATS, ImageSet, load_image_set
from mixmask.data.loaders import EvalDataset, TwoCropDataset, TwoViewDataset
from mixmask.data.transforms import TWO_VIEW_PRESETS, eval_transform, two_view_transform

__all__ = [
    "DATASET_STATS",
    "EvalDataset",
    "ImageSet",
    "TWO_VIEW_PRESETS",
    "TwoCropDataset",
    "TwoViewDataset",
    "eval_transform",
    "load_image_set",
    "two_view_transform",
]
