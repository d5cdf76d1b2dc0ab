"""Datasets, augmentations, torch Datasets and the training loaders for pretraining and
evaluation."""

from mixmask.data.batch import UNLABELED, Batch
from mixmask.data.datasets import DATASET_STATS, load_image_set
from mixmask.data.gpu_augment import BatchedViewAugment
from mixmask.data.image_set import ImageSet
from mixmask.data.loaders import EpochBatchSampler, EvalDataset, MultiViewDataset
from mixmask.data.multi_size_augment import MultiSizeViewAugment
from mixmask.data.pipeline import build_train_loader
from mixmask.data.transforms import eval_transform, view_transform
from mixmask.data.views import AUGMENTATION_PRESETS, ViewConfig, preset_views

__all__ = [
    "AUGMENTATION_PRESETS",
    "DATASET_STATS",
    "UNLABELED",
    "Batch",
    "BatchedViewAugment",
    "EpochBatchSampler",
    "EvalDataset",
    "ImageSet",
    "MultiSizeViewAugment",
    "MultiViewDataset",
    "ViewConfig",
    "build_train_loader",
    "eval_transform",
    "load_image_set",
    "preset_views",
    "view_transform",
]
