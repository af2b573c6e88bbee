"""The image datasets: one registry entry per dataset, read by everything that knows about images.

An entry says the image shape, how to load the train and test images, the number of classes and the
dataset's default feature network (a LeNet trained by ``onestep train-features``, feature space
``lenet-<lenet>``). The datamodule (:data:`IMAGE_SHAPES`, ``num_classes``, loading), the evaluation
callback's default feature space, the LeNet trainer and the feature-space registry all read
:data:`IMAGE_DATASETS`, so adding an image dataset is one :func:`register_image_dataset` call (plus its
configs)::

    register_image_dataset(ImageDataset("kmnist", (1, 28, 28), load_kmnist, num_classes=10))

Names are read when they are needed (not copied at import), so a dataset registered by a user's module
(in a suite's ``imports:``) is known everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .images import load_cifar10, load_image_folder, load_mnist

#: ``load(root, image_size=..., seed=...) -> (train_images, train_labels, test_images, test_labels)``:
#: uint8 (or [0, 1] float) images ``(N, C, H, W)`` and int64 labels; ``seed`` seeds any held-out split the
#: loader has to make itself (an image folder), ``image_size`` is for loaders that resize
Loader = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class ImageDataset:
    """One image dataset.

    Args:
        name: the ``--data.dataset`` name.
        shape: ``(C, H, W)`` of one image (for ``sized`` sets, the shape at the default ``image_size``).
        load: the :data:`Loader`.
        num_classes: number of label classes (None: unlabelled).
        lenet: short name of the dataset's LeNet feature network (feature space ``lenet-<lenet>``, weights
            ``onestep/metrics/weights/lenet-<lenet>.pt``); None: evaluated in pixels only by default.
        aliases: other spellings that the feature-space lookup and ``onestep train-features`` accept.
        sized: images are resized to ``(C, image_size, image_size)`` (``--data.image_size``).
    """

    name: str
    shape: tuple[int, int, int]
    load: Loader = field(repr=False)
    num_classes: int | None = None
    lenet: str | None = None
    aliases: tuple[str, ...] = ()
    sized: bool = False

    def data_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.shape[0], image_size, image_size) if self.sized else self.shape

    @property
    def feature_space(self) -> str | None:
        """The default feature space besides ``pixels`` (``lenet-<lenet>``), or None."""
        return f"lenet-{self.lenet}" if self.lenet else None


IMAGE_DATASETS: dict[str, ImageDataset] = {}


def register_image_dataset(entry: ImageDataset) -> ImageDataset:
    """Add (or replace) an image dataset; returns it."""
    IMAGE_DATASETS[entry.name] = entry
    return entry


def find_image_dataset(name: str) -> ImageDataset | None:
    """The entry called ``name`` or with ``name`` as an alias or LeNet name (case-insensitive), else None."""
    key = str(name).lower()
    for entry in IMAGE_DATASETS.values():
        if key == entry.name.lower() or key in entry.aliases or key == entry.lenet:
            return entry
    return None


class RegistryView(Mapping):
    """A read-only mapping computed from the registry each time it is read (never a stale copy)."""

    def __init__(self, build: Callable[[], dict]) -> None:
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


#: dataset name -> image shape
IMAGE_SHAPES: Mapping[str, tuple[int, int, int]] = RegistryView(
    lambda: {name: entry.shape for name, entry in IMAGE_DATASETS.items()})


def lenet_spellings() -> dict[str, ImageDataset]:
    """Every name that selects a dataset with a LeNet (dataset names, LeNet names, aliases) -> its entry."""
    found = {}
    for entry in IMAGE_DATASETS.values():
        if entry.lenet:
            found.update({spelling: entry for spelling in (entry.name, entry.lenet, *entry.aliases)})
    return found


def lenet_feature_spaces() -> list[str]:
    """The ``lenet-<name>`` feature spaces of the registered datasets, in registration order."""
    return list(dict.fromkeys(e.feature_space for e in IMAGE_DATASETS.values() if e.feature_space))


# ---------------------------------------------------------------------------------------- the built-ins
def _mnist_loader(fashion: bool) -> Loader:
    def load(root: Path, **_) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (*load_mnist(root, "train", fashion), *load_mnist(root, "test", fashion))
    return load


def _load_cifar10(root: Path, **_) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (*load_cifar10(root, "train"), *load_cifar10(root, "test"))


def _load_image_folder(root: Path, image_size: int = 32, seed: int = 0, **_) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All images of the folder; a seeded tenth (at least one) is held out as the test split."""
    images, labels = load_image_folder(root, image_size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_held = max(1, len(images) // 10) if len(images) > 1 else 0
    held, kept = order[:n_held], order[n_held:]
    if n_held == 0:
        held = kept
    return images[kept], labels[kept], images[held], labels[held]


for _entry in (
    ImageDataset("mnist", (1, 28, 28), _mnist_loader(False), num_classes=10, lenet="mnist"),
    ImageDataset("fashion_mnist", (1, 28, 28), _mnist_loader(True), num_classes=10, lenet="fashion",
                 aliases=("fashion-mnist", "fashionmnist")),
    ImageDataset("cifar10", (3, 32, 32), _load_cifar10, num_classes=10),
    ImageDataset("image_folder", (3, 32, 32), _load_image_folder, sized=True),
):
    register_image_dataset(_entry)
