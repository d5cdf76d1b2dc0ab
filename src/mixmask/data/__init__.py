"""Datasets, augmentations and torch Datasets for pretraining and evaluation."""

from mixmask.data.datasets import DATASET_STATS, ImageSet, load_image_set
from mixmask.data.loaders import EvalDataset, TwoViewDataset
from mixmask.data.transforms import eval_transform, two_view_transform

__all__ = [
    "DATASET_STATS",
    "EvalDataset",
    "ImageSet",
    "TwoViewDataset",
    "eval_transform",
    "load_image_set",
    "two_view_transform",
]
