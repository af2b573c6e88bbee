"""Feature spaces for Fréchet distance and precision/recall, and the on-disk cache of real features.

Registry ``FEATURES`` / :func:`get_feature_extractor`:

* ``pixels``: the raw sample flattened, ``(N, prod(shape))``; for synthetic vectors this is the identity.
* ``lenet-mnist`` / ``lenet-fashion``: a small LeNet-style classifier trained by :func:`train_lenet`
  (``onestep train-features <dataset>``) and shipped in ``onestep/metrics/weights``; the features are the
  128-d penultimate activations ``relu(fc1(...))``. Weights are checked against the SHA-256 in
  ``weights/manifest.json`` before use; nothing is ever downloaded.
* ``inception``: optional Inception-v3 pool features through torch-fidelity, with a weights file given
  by path (:func:`check_feature_space` fails before training when the package or the file is missing).
  Inception features on MNIST-like data are not comparable to published CIFAR/ImageNet numbers.

Every extractor takes raw-unit samples (images in ``[0, 1]``, clamped) and runs its network in eval mode
on fixed-size batches (the last one zero-padded), so a sample's features do not depend on how the caller
batched its inputs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from functools import partial
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping, MutableMapping

import torch
from torch import Tensor, nn

from onestep.files import atomic_write_bytes
from onestep.data.image_sets import IMAGE_DATASETS, ImageDataset, RegistryView, lenet_spellings

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"
LENET_FEATURE_DIM = 128
#: LeNet name (``mnist``, ``fashion``) -> the image dataset it is trained on
LENET_DATASETS: Mapping[str, ImageDataset] = RegistryView(
    lambda: {e.lenet: e for e in IMAGE_DATASETS.values() if e.lenet})
#: other spellings (the datamodule's ``fashion_mnist``, ...) -> LeNet name
LENET_ALIASES: Mapping[str, str] = RegistryView(
    lambda: {k: e.lenet for k, e in lenet_spellings().items() if k != e.lenet})


# --------------------------------------------------------------------------------------------- networks
class LeNet(nn.Module):
    """conv5(16)-pool-conv5(32)-pool-conv3(64)-pool-fc(128)-fc(10) on ``(N, 1, 28, 28)`` images in [0, 1]."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 14 x 14
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 7 x 7
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 3 x 3
        )
        self.fc1 = nn.Linear(64 * 3 * 3, LENET_FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(LENET_FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = (x.reshape(-1, 1, 28, 28) - 0.5) / 0.5
        return torch.relu(self.fc1(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.features(x)))


class FeatureExtractor(nn.Module):
    """Base: ``extractor(x_raw) -> (N, dim)`` float32 features, computed on fixed-size padded batches."""

    name: str = "base"
    dim: int | None = None

    def __init__(self, batch_size: int = 256):
        super().__init__()
        self.batch_size = int(batch_size)

    def _features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.eval()
        param = next(self.parameters(), None)
        if param is not None and param.device != x.device:
            self.to(x.device)
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start:start + self.batch_size].float()
            pad = self.batch_size - chunk.shape[0]
            if pad:  # same batch size for every chunk: features independent of the caller's batching
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            out.append(self._features(chunk)[:self.batch_size - pad])
        return torch.cat(out) if out else x.new_zeros((0, self.dim or 0))


class PixelFeatures(FeatureExtractor):
    """``pixels``: the raw sample flattened (identity for vectors); no network, no clamping."""

    name = "pixels"

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).float()


class LeNetFeatures(FeatureExtractor):
    """``lenet-<dataset>``: 128-d penultimate activations of the shipped (SHA-256 checked) LeNet."""

    dim = LENET_FEATURE_DIM

    def __init__(self, dataset: str, weights_path: str | os.PathLike | None = None,
                 sha256: str | None = None, batch_size: int = 256):
        super().__init__(batch_size)
        self.name = f"lenet-{dataset}"
        self.net = LeNet()
        self.net.load_state_dict(load_lenet_state(dataset, weights_path, sha256))
        self.net.eval().requires_grad_(False)

    def _features(self, x: Tensor) -> Tensor:
        return self.net.features(x.clamp(0, 1))


class InceptionFeatures(FeatureExtractor):
    """``inception``: torch-fidelity Inception-v3 2048-d pool features from a local weights file.

    Images are quantised to uint8 (the FID convention) and grey images repeated to 3 channels."""

    name = "inception"
    dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, batch_size: int = 64):
        super().__init__(batch_size)
        check_feature_space("inception", weights_path)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights_path))

    def _features(self, x: Tensor) -> Tensor:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x)[0].reshape(x.shape[0], -1).float()


class _FeatureSpaces(MutableMapping):
    """``pixels``, one ``lenet-<name>`` per image dataset with a LeNet (read from the image-dataset registry
    each time) and ``inception``; entries set here (a user's own space) come first."""

    def __init__(self, own: dict[str, Callable[..., FeatureExtractor]]) -> None:
        self._own = own

    def _all(self) -> dict[str, Callable[..., FeatureExtractor]]:
        lenets = {f"lenet-{name}": partial(LeNetFeatures, name) for name in LENET_DATASETS}
        return {"pixels": self._own["pixels"], **lenets, **self._own}

    def __getitem__(self, name: str) -> Callable[..., FeatureExtractor]:
        return self._all()[name]

    def __setitem__(self, name: str, build: Callable[..., FeatureExtractor]) -> None:
        self._own[name] = build

    def __delitem__(self, name: str) -> None:
        del self._own[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


FEATURES: MutableMapping[str, Callable[..., FeatureExtractor]] = _FeatureSpaces(
    {"pixels": PixelFeatures, "inception": InceptionFeatures})


def get_feature_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Build the feature extractor registered under ``name`` (see the module docstring)."""
    if name not in FEATURES:
        raise ValueError(f"unknown feature space {name!r}; known: {', '.join(sorted(FEATURES))}")
    return FEATURES[name](**kwargs)


def check_feature_space(name: str, weights_path: str | os.PathLike | None = None) -> None:
    """Fail early (before training) when feature space ``name`` cannot be built on this machine."""
    if name not in FEATURES:
        raise ValueError(f"unknown feature space {name!r}; known: {', '.join(sorted(FEATURES))}")
    if name.startswith("lenet-"):
        load_lenet_state(name[len("lenet-"):], weights_path)
    elif name == "inception":
        try:
            import torch_fidelity  # noqa: F401
        except Exception as err:  # torchvision (its dependency) may fail to import against CPU torch
            raise RuntimeError("feature space 'inception' needs torch-fidelity (pip install 'onestep[fid]'), "
                               f"which could not be imported: {err}") from err
        if weights_path is None or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"feature space 'inception' needs a local Inception-v3 weights file (FID 'pt_inception-2015-12-05'"
                f" port); got weights_path={weights_path!r}. Download it once on a machine with internet and "
                "pass its path: nothing is downloaded at run time.")


# ------------------------------------------------------------------------------------ weights + SHA-256
def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_lenet_state(dataset: str, weights_path: str | os.PathLike | None = None,
                     sha256: str | None = None) -> dict[str, Tensor]:
    """Read a LeNet state_dict after checking its SHA-256.

    The expected hash is ``sha256`` if given, else the entry of ``manifest.json`` next to the file."""
    if dataset not in LENET_DATASETS:
        raise ValueError(f"no LeNet for dataset {dataset!r}; known: {', '.join(LENET_DATASETS)}")
    path = Path(weights_path) if weights_path is not None else WEIGHTS_DIR / f"lenet-{dataset}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"LeNet weights for {dataset!r} not found at {path}; "
                                f"create them with `onestep train-features {dataset}`")
    expected = sha256 or _read_manifest(path.parent).get(path.name, {}).get("sha256")
    if expected is None:
        raise RuntimeError(f"no SHA-256 known for {path}: pass sha256=... or add it to "
                           f"{path.parent / MANIFEST_NAME}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise RuntimeError(f"LeNet weights file {path} is corrupted or was modified: SHA-256 {actual} != "
                           f"expected {expected}. Restore it (git checkout) or retrain with "
                           f"`onestep train-features {dataset}`.")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ training
def _load_lenet_data(root, entry) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """uint8 train and test images (N, 1, 28, 28) and int64 labels of an image-dataset entry."""
    parts = entry.load(Path(root), image_size=28, seed=0)
    return tuple(torch.as_tensor(p).reshape(-1, 1, 28, 28) if i % 2 == 0 else torch.as_tensor(p).long()
                 for i, p in enumerate(parts))


@torch.no_grad()
def lenet_accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on uint8 ``images``."""
    net.eval()
    correct = sum(int((net(images[i:i + batch_size].float() / 255).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_lenet(dataset: str, root=None, out_path: str | os.PathLike | None = None, epochs: int | None = None,
                seed: int = 0, batch_size: int = 128, lr: float = 2e-3, verbose: bool = True) -> dict:
    """Train the ``lenet-<dataset>`` feature network reproducibly on CPU and write its weights.

    Adam with a one-cycle schedule, random +-2 pixel shifts, seeded init and shuffling, deterministic
    algorithms. Writes a plain state_dict to ``out_path`` (default: the shipped file) and records its
    SHA-256, test accuracy and recipe in ``manifest.json`` next to it. Returns that manifest entry."""
    dataset = LENET_ALIASES.get(dataset, dataset)
    if dataset not in LENET_DATASETS:
        raise ValueError(f"no LeNet for dataset {dataset!r}; known: {', '.join(LENET_DATASETS)}")
    epochs = epochs or (6 if dataset == "mnist" else 15)
    if root is None:
        from onestep.data.datamodule import resolve_data_root

        root = resolve_data_root(None)
    x_train, y_train, x_test, y_test = _load_lenet_data(root, LENET_DATASETS[dataset])
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = LeNet()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                x = x_train[idx].float() / 255
                shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
                x = torch.roll(x, shifts=shift, dims=(2, 3))
                loss = nn.functional.cross_entropy(net(x), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"[lenet-{dataset}] epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - start
    accuracy = lenet_accuracy(net, x_test, y_test)
    out_path = Path(out_path) if out_path is not None else WEIGHTS_DIR / f"lenet-{dataset}.pt"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, buffer)
    atomic_write_bytes(out_path, buffer.getvalue())
    entry = {"sha256": sha256_file(out_path), "dataset": dataset, "test_accuracy": round(accuracy, 5),
             "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
             "train_seconds": round(seconds, 1), "feature_dim": LENET_FEATURE_DIM, "torch": torch.__version__}
    manifest = _read_manifest(out_path.parent)
    manifest[out_path.name] = entry
    atomic_write_bytes(out_path.parent / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    if verbose:
        print(f"[lenet-{dataset}] test accuracy {accuracy:.4f}, {seconds:.0f}s, wrote {out_path}", flush=True)
    return entry


def shipped_weights_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the weights files shipped with onestep (``onestep/metrics/weights/``)."""
    path = Path(path).resolve()
    return path.parent == WEIGHTS_DIR.resolve() and path.is_file()


def main_train_features(argv: list[str] | None = None) -> dict:
    """``onestep train-features <dataset> [--root DIR] [--out PATH] [--force] [--epochs N] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="onestep train-features",
                                     description="Train a LeNet feature network for FD/PRDC on MNIST-like data.")
    parser.add_argument("dataset", choices=sorted([*LENET_DATASETS, *LENET_ALIASES]))
    parser.add_argument("--root", default=None, help="data directory (default: $ONESTEP_DATA, else ../shared/datasets, else ./data)")
    parser.add_argument("--out", default=None, help="weights file to write (its SHA-256 goes to manifest.json beside "
                        "it; use it with --eval.feature_weights_path). Default: the shipped file "
                        "onestep/metrics/weights/lenet-<dataset>.pt, which is replaced only with --force")
    parser.add_argument("--force", action="store_true", help="allow replacing the shipped weights (every FD "
                        "computed with the old file stops being comparable with new ones)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = LENET_ALIASES.get(args.dataset, args.dataset)
    out = Path(args.out) if args.out is not None else WEIGHTS_DIR / f"lenet-{dataset}.pt"
    if shipped_weights_path(out) and not args.force:
        # the shipped file defines the feature space of every published FD: never replace it by accident
        parser.error(f"--out {out} is the shipped lenet-{dataset} weights file; write elsewhere with "
                     f"--out PATH (then --eval.feature_weights_path PATH), or pass --force to replace it")
    return train_lenet(dataset, args.root, out, args.epochs, args.seed)


# ------------------------------------------------------------------------------- real-feature cache
def default_cache_dir() -> Path:
    """``$ONESTEP_CACHE`` if set, else ``~/.cache/onestep``."""
    return Path(os.environ.get("ONESTEP_CACHE", Path.home() / ".cache" / "onestep"))


def reference_features(extractor_name: str, dataset: str, split: str, n: int | None,
                       compute_fn: Callable[[], Tensor], cache_dir: str | os.PathLike | None = None,
                       tag: str | None = None) -> Tensor:
    """Features of the real reference set, cached on disk.

    The cache key is ``(dataset, split, feature space, n)`` plus an optional ``tag`` (e.g. the weights'
    SHA-256 prefix or the data seed); the file is written atomically (temp file + ``os.replace``), so
    concurrent processes never read a half-written file. ``compute_fn()`` is called on a cache miss."""
    key = "-".join(str(p) for p in (dataset, split, extractor_name, f"n{n if n is not None else 'all'}", tag)
                   if p is not None)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / "features" / f"{key.replace('/', '_')}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    feats = compute_fn().detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(feats, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return feats
