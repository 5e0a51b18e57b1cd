"""Datasets in standard on-disk formats, image decoding, transforms and the built-in data."""

from cnnkit.data.classify import ClassificationDataset, read_label_csv, scan_image_folder
from cnnkit.data.images import read_image
from cnnkit.data.transforms import AugmentConfig, classify_eval_transform, classify_train_transform

__all__ = [
    "AugmentConfig",
    "ClassificationDataset",
    "classify_eval_transform",
    "classify_train_transform",
    "read_image",
    "read_label_csv",
    "scan_image_folder",
]
