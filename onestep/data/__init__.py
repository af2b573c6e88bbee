"""Data layer: synthetic manifolds with a distance to their support, image loaders, point files, and the
datamodule."""

from .datamodule import DATASETS, OneStepDataModule, resolve_data_root
from .image_sets import IMAGE_DATASETS, ImageDataset, register_image_dataset
from .images import load_cifar10, load_image_folder, load_mnist, read_idx, write_idx
from .manifolds import MANIFOLDS, Manifold, get_manifold
from .sources import dataset_kind, register_manifold, resolve_dataset

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "ImageDataset",
    "MANIFOLDS",
    "Manifold",
    "OneStepDataModule",
    "get_manifold",
    "load_cifar10",
    "load_image_folder",
    "load_mnist",
    "dataset_kind",
    "read_idx",
    "register_image_dataset",
    "register_manifold",
    "resolve_data_root",
    "resolve_dataset",
    "write_idx",
]
