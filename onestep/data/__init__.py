"""Data layer: synthetic manifolds with a distance to their support, image loaders, and the datamodule."""

from .datamodule import DATASETS, OneStepDataModule, resolve_data_root
from .images import load_cifar10, load_image_folder, load_mnist, read_idx, write_idx
from .manifolds import MANIFOLDS, Manifold, get_manifold

__all__ = [
    "DATASETS",
    "MANIFOLDS",
    "Manifold",
    "OneStepDataModule",
    "get_manifold",
    "load_cifar10",
    "load_image_folder",
    "load_mnist",
    "read_idx",
    "resolve_data_root",
    "write_idx",
]
