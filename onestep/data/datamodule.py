"""`OneStepDataModule`: one LightningDataModule for synthetic manifolds and image datasets.

Batches are `(x, idx)`: `x` float32 in normalised space (B, *data_shape), `idx` int64 indices into
`train_data`. Normalisation is the identity for synthetic sets and point files, and `x = 2 p - 1` for
images, where raw pixel values p are in [0, 1] (uint8 input in [0, 255] is divided by 255 first). What
`dataset` may name (a registered name, a `Manifold` class path, a file of points) is :mod:`.sources`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from onestep.options import AtLeastOne, NonNegative, Range, check_options

from .image_sets import IMAGE_DATASETS, IMAGE_SHAPES
from .manifolds import MANIFOLDS, Manifold
from .sampler import ResumableSampler, distributed_context
from .sources import build_manifold, check_samples, dataset_label, load_points, resolve_dataset

__all__ = ["OneStepDataModule", "DATASETS", "IMAGE_SHAPES", "resolve_data_root"]



class _DatasetNames(Sequence):
    """Every dataset name: the manifolds', then the image sets' (:mod:`onestep.data.image_sets`), read from
    the two registries each time, so a dataset registered later is known too."""

    def _names(self) -> tuple[str, ...]:
        return (*MANIFOLDS, *IMAGE_DATASETS)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


DATASETS: Sequence[str] = _DatasetNames()
SPLITS = ("train", "val", "test")
DEFAULT_N_TRAIN_SYNTHETIC = 20000


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: `root` if given, else $ONESTEP_DATA, else the first existing of
    `<repo>/../shared/datasets` and `<cwd>/../shared/datasets`, else `<cwd>/data`."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    if os.environ.get("ONESTEP_DATA"):
        return Path(os.environ["ONESTEP_DATA"]).expanduser()
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "shared" / "datasets"] if len(here.parents) > 3 else []
    candidates.append(Path.cwd().parent / "shared" / "datasets")
    return next((c for c in candidates if c.is_dir()), Path.cwd() / "data")


def split_seed(seed: int, split: str) -> int:
    """A 63-bit seed derived from (`seed`, `split`) so that every split has its own stream."""
    return int(np.random.SeedSequence([int(seed), 7919 + SPLITS.index(split)]).generate_state(2, np.uint64)[0] >> 1)


def points_seed(seed: int) -> int:
    """The seed of the permutation that splits a file of points into test, val and train."""
    return int(np.random.SeedSequence([int(seed), 104729]).generate_state(2, np.uint64)[0] >> 1)


def _check_options(dataset, root, dataset_args):
    """The options a signature cannot declare: the dataset (registries read now) and the folder."""
    source = resolve_dataset(dataset)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"OneStepDataModule: root={root!r} is not allowed; use a folder path (str) or None")
    if dataset_args is not None and not isinstance(dataset_args, dict):
        raise ValueError(f"--data.dataset_args={dataset_args!r} is not a mapping; give the manifold's constructor "
                         "arguments as a mapping, e.g. --data.dataset_args '{radius: 2.0}'")
    if dataset_args and source.kind != "manifold":
        raise ValueError(f"--data.dataset_args applies to a manifold (a name or a class path), not to "
                         f"dataset={dataset!r}; leave it unset")
    return source


class _BatchIndexedDataset(TensorDataset):
    """TensorDataset whose `__getitems__` gathers a whole batch with one indexing op."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


class _PositionedLoader(DataLoader):
    """The training DataLoader, resumable through Lightning's loader-state interface.

    Lightning stores ``state_dict()`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and
    calls ``load_state_dict`` on the new loader of a resumed run before iterating it. The state is the
    :class:`ResumableSampler` position of the *trained* samples: batches already fetched for the next step
    (``ready - processed`` of the fit loop's progress) and batches prefetched by worker processes are
    handed back to the stream."""

    owner: "OneStepDataModule | None" = None
    last_iterator = None
    #: collate the next batch before handing out the current one (Lightning does not prefetch a loader
    #: with a length), so a batch hook's background work overlaps the current training step
    lookahead = False
    _held = 0  # batches collated by the lookahead and not handed out yet

    def __iter__(self):
        if self._held:  # a pass abandoned with a batch collated ahead (Lightning cut the epoch short):
            self.sampler.handed_out -= self._held * self.batch_size  # hand its indices back to the stream
            self._held = 0
        self.last_iterator = super().__iter__()
        return self._ahead(self.last_iterator) if self.lookahead else self.last_iterator

    def _ahead(self, iterator):
        self._held = 0
        for batch in iterator:
            if self._held:
                yield held
            held, self._held = batch, 1
        if self._held:
            self._held = 0
            yield held

    def _not_trained_batches(self) -> int:
        it = self.last_iterator  # multi-process iterators count batches sent to and received from workers
        in_flight = max(0, getattr(it, "_send_idx", 0) - getattr(it, "_rcvd_idx", 0)) if it is not None else 0
        in_flight += self._held
        trainer = getattr(self.owner, "trainer", None)
        loop = getattr(trainer, "fit_loop", None)
        if loop is None:
            return in_flight
        progress = loop.epoch_loop.batch_progress.current
        return in_flight + max(0, progress.ready - progress.processed)

    def state_dict(self) -> dict:
        position = self.sampler.state_dict(not_trained=self._not_trained_batches() * self.batch_size)
        return {"position": {**position, "batch_size": self.batch_size}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "position" in state_dict:
            self.sampler.load_state_dict(state_dict["position"])


def _collate_gathered(batch: tuple[Tensor, ...] | list) -> tuple[Tensor, ...]:
    if isinstance(batch, tuple):  # already gathered by __getitems__
        return batch
    return tuple(torch.stack(column) for column in zip(*batch))


class _HookedCollate:
    """Collate, then hand the batch to ``hook(x, idx, draw)``, ``draw = data_epoch * N + idx`` naming this
    draw of each sample (used to solve a batch's coupling ahead of its training step)."""

    def __init__(self, hook, sampler: ResumableSampler) -> None:
        self.hook, self.sampler = hook, sampler

    def __call__(self, batch: tuple[Tensor, ...] | list) -> tuple[Tensor, ...]:
        x, idx = _collate_gathered(batch)
        self.hook(x, idx, self.sampler.data_epoch * self.sampler.n + idx)
        return x, idx


class OneStepDataModule(L.LightningDataModule):
    """Data for every generator: a synthetic manifold (see `MANIFOLDS`), an image set or a file of points.

    Args:
        dataset: synthetic 8gaussians, moons2d, rings2d, spiral2d, checker2d, helix3d, torus3d, sphere3d,
            sphere64, helix64; images mnist, fashion_mnist, cifar10, image_folder (`DATASETS`); a name
            registered with `register_manifold`; a `Manifold` subclass by class path (`my_module.MyManifold`);
            a `.npy`/`.npz`/`.pt` file of points, raw units, shape (n, D): test = the first `n_test` of a
            permutation seeded by `seed`, val = the next `n_val`, train = the next `n_train` (default: the
            rest). A file has no known support, so the manifold metrics are skipped (`skipped_metrics`).
        batch_size: training batch size.
        n_train: training set size (synthetic default 20000; images: the first `n_train`, default all).
        n_val, n_test: validation / test set sizes. Images: test = the first `n_test` images of the
            test file, val = its last `n_val` images.
        root: data folder (else $ONESTEP_DATA, else `../shared/datasets`); for `image_folder`, the folder.
        noise_std: training noise of a synthetic manifold (default: the manifold's own).
        seed: seeds the synthetic splits (one derived seed per split) and the shuffling order.
        num_workers: DataLoader workers.
        image_size: side of `image_folder` images.
        dataset_args: constructor arguments of a manifold given by name or class path.
    """

    def __init__(
        self,
        dataset: str = "8gaussians",
        batch_size: Annotated[int, AtLeastOne] = 256,
        n_train: Annotated[int, Range(ge=1, note="or None: all")] | None = None,
        n_val: Annotated[int, AtLeastOne] = 2048,
        n_test: Annotated[int, AtLeastOne] = 2048,
        root: str | None = None,
        noise_std: Annotated[float, Range(ge=0, note="or None: the manifold's default")] | None = None,
        seed: Annotated[int, Range(ge=0, lt=2**63)] = 0,
        num_workers: Annotated[int, NonNegative] = 0,
        image_size: Annotated[int, AtLeastOne] = 32,
        dataset_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        source = _check_options(dataset, root, dataset_args)
        options = dict(batch_size=batch_size, n_train=n_train, n_val=n_val, n_test=n_test, noise_std=noise_std,
                       seed=seed, num_workers=num_workers, image_size=image_size)
        check_options(type(self), options, prefix="OneStepDataModule: ", say_allowed=True)
        self.save_hyperparameters()
        self.dataset = dataset
        self.dataset_label = dataset_label(dataset)  # the dataset in run names (a file: its file name)
        self.batch_size, self.n_val, self.n_test = batch_size, n_val, n_test
        self.seed, self.num_workers = int(seed), num_workers
        self.is_image = source.kind == "image"
        self.manifold: Manifold | None = None
        self.points: Tensor | None = None
        #: metric group -> why it is not computed for this data (recorded in the evaluation protocol)
        self.skipped_metrics: dict[str, str] = {}
        if source.kind != "manifold" and noise_std is not None:
            raise ValueError(
                f"OneStepDataModule: noise_std={noise_std!r} applies only to synthetic manifolds, "
                f"not to dataset={dataset!r}; leave it unset (None)"
            )
        if self.is_image:
            self.n_train = n_train
            self.data_shape: tuple[int, ...] = IMAGE_DATASETS[dataset].data_shape(image_size)
        elif source.kind == "points":
            self.points = load_points(source.path)
            self.n_train = self._point_train_size(n_train)
            self.data_shape = (self.points.shape[1],)
            self.skipped_metrics = {"manifold": "no distance to the support is known for a file of points"}
        else:
            self.manifold = build_manifold(source.manifold, dataset, dataset_args, noise_std)
            self.n_train = DEFAULT_N_TRAIN_SYNTHETIC if n_train is None else n_train
            self.data_shape = (self.manifold.ambient_dim,)
        self.root = resolve_data_root(root) if self.is_image else (Path(root) if root else None)
        self.image_size = image_size
        self.num_classes: int | None = IMAGE_DATASETS[dataset].num_classes if self.is_image else None
        self.train_data: Tensor | None = None
        self.val_data: Tensor | None = None
        self.test_data: Tensor | None = None
        self._labels: dict[str, Tensor] = {}
        # set by a model that prepares each training batch ahead of its step (see PairingPipeline);
        # called in this process only, so it is ignored when num_workers > 0
        self.train_batch_hook = None

    def _point_train_size(self, n_train: int | None) -> int:
        """The training split of a point file (all points not held out by default); refuses too few points."""
        n, held = len(self.points), self.n_val + self.n_test
        if n - held < max(1, n_train or 1):
            wanted = f"n_train={n_train}" if n_train else "at least 1 training point"
            raise ValueError(
                f"--data.dataset={self.dataset}: {n} points are too few for n_test={self.n_test} + n_val={self.n_val}"
                f" + {wanted}; use smaller --data.n_test/--data.n_val{'/--data.n_train' if n_train else ''} "
                "or a file with more points")
        return n - held if n_train is None else n_train

    # ----------------------------------------------------------------- normalisation
    def normalize(self, x_raw: Tensor) -> Tensor:
        """Raw -> model space: identity (synthetic); images `2 p - 1` with p in [0, 1] (uint8 / 255)."""
        if not self.is_image:
            return x_raw
        x = x_raw.float() / 255.0 if x_raw.dtype == torch.uint8 else x_raw
        return x * 2.0 - 1.0

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space -> raw units: identity (synthetic); images `(x + 1) / 2`, pixels in [0, 1] (not clamped)."""
        if not self.is_image:
            return x
        return (x + 1.0) * 0.5

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Build `train_data`, `val_data`, `test_data` (normalised float32). Idempotent. Before fitting, refuse
        a batch larger than one process's share of the training set: the loader would silently shrink it to
        the whole set (and an exact-OT coupling of that size can take minutes per step)."""
        self._build_splits()
        if stage == "fit":
            world = distributed_context(self.trainer)[0]
            share = len(self.train_data) // world
            if self.batch_size > share:
                per = f" per process ({world} processes)" if world > 1 else ""
                raise ValueError(
                    f"--data.batch_size={self.batch_size} is larger than the training set: {share} samples of "
                    f"dataset={self.dataset!r}{per}; use --data.batch_size <= {share} or a larger --data.n_train")

    def _build_splits(self) -> None:
        if self.train_data is not None:
            return
        if self.manifold is not None:
            sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
            for split, n in sizes.items():
                generator = torch.Generator().manual_seed(split_seed(self.seed, split))
                samples = self.manifold.sample(n, generator)
                check_samples(self.manifold, self.dataset, samples, n)
                setattr(self, f"{split}_data", samples.float())
            return
        if self.points is not None:
            order = torch.randperm(len(self.points), generator=torch.Generator().manual_seed(points_seed(self.seed)))
            bounds = {"test": (0, self.n_test), "val": (self.n_test, self.n_test + self.n_val)}
            held = self.n_test + self.n_val
            bounds["train"] = (held, held + self.n_train)
            for split, (start, end) in bounds.items():
                setattr(self, f"{split}_data", self.points[order[start:end]].contiguous())
            return
        train_x, train_y, test_x, test_y = self._load_images()
        n_train = len(train_x) if self.n_train is None else self._clamp("n_train", self.n_train, len(train_x))
        n_test = self._clamp("n_test", self.n_test, len(test_x))
        n_val = self._clamp("n_val", self.n_val, len(test_x))
        parts = {
            "train": (train_x[:n_train], train_y[:n_train]),
            "val": (test_x[len(test_x) - n_val :], test_y[len(test_x) - n_val :]),
            "test": (test_x[:n_test], test_y[:n_test]),
        }
        for split, (images, labels) in parts.items():
            setattr(self, f"{split}_data", self.normalize(images).contiguous())
            self._labels[split] = labels.clone()

    def _load_images(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return IMAGE_DATASETS[self.dataset].load(self.root, image_size=self.image_size,
                                                 seed=split_seed(self.seed, "test"))

    def _clamp(self, option: str, wanted: int, available: int) -> int:
        if wanted > available:
            warnings.warn(
                f"OneStepDataModule: {option}={wanted} exceeds the {available} "
                f"{'images' if self.is_image else 'points'} available for "
                f"dataset={self.dataset!r}; using {available}",
                stacklevel=3,
            )
        return min(wanted, available)

    def _split_data(self, split: str) -> Tensor:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; use one of {', '.join(SPLITS)}")
        self.setup()
        return getattr(self, f"{split}_data")

    # ----------------------------------------------------------------- access
    def reference(self, split: str = "test", n: int | None = None) -> Tensor:
        """The first `n` samples of `split` in raw units (all if `n` is None). For a synthetic set,
        `n` beyond the stored split draws `n` fresh samples from that split's seed (images and point files:
        the whole split, with a warning)."""
        data = self._split_data(split)
        if n is None or n <= len(data):
            return self.denormalize(data[:n]).clone()
        if self.manifold is not None:
            generator = torch.Generator().manual_seed(split_seed(self.seed, split))
            return self.manifold.sample(n, generator).float()
        self._clamp(f"reference(split={split!r}, n)", n, len(data))
        return self.denormalize(data).clone()

    def labels(self, split: str = "train") -> Tensor:
        """int64 class labels aligned with `<split>_data` (image datasets only)."""
        if not self.is_image:
            raise ValueError(f"labels() exists only for image datasets, not for dataset={self.dataset!r}")
        self._split_data(split)
        return self._labels[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled `(x, idx)` batches of `batch_size` per process (the global batch is `batch_size` times
        the number of processes). The order is a `ResumableSampler` seeded from `seed`: a fresh
        permutation per epoch, dealt round-robin across DDP ranks, resumable anywhere (the loader's
        `state_dict`, which Lightning keeps in checkpoints). Lightning keeps this sampler under DDP
        instead of inserting its own."""
        data = self._split_data("train")
        world, rank = distributed_context(self.trainer)
        sampler = ResumableSampler(len(data), seed=split_seed(self.seed, "train"), num_replicas=world, rank=rank,
                                   batch_size=self.batch_size)
        dataset = _BatchIndexedDataset(data, torch.arange(len(data), dtype=torch.long))
        # a generator of its own, so creating the iterator never draws from the global RNG
        generator = torch.Generator().manual_seed(split_seed(self.seed, "train") ^ 0x5EED)
        loader = _PositionedLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler.num_samples >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate_gathered if self.train_batch_hook is None or self.num_workers > 0
            else _HookedCollate(self.train_batch_hook, sampler),
            generator=generator,
        )
        loader.owner = self  # reads the fit loop's progress when the position is saved
        loader.lookahead = isinstance(loader.collate_fn, _HookedCollate)
        return loader

    def __repr__(self) -> str:
        return (
            f"OneStepDataModule(dataset={self.dataset!r}, data_shape={self.data_shape}, "
            f"batch_size={self.batch_size}, n_train={self.n_train}, seed={self.seed})"
        )
