"""Image loaders that need no torchvision: IDX (MNIST, Fashion-MNIST), CIFAR-10 batches, image folders.

All loaders return `uint8` image tensors of shape (N, C, H, W) and `int64` labels (N,). Nothing is
downloaded: a missing file raises `FileNotFoundError` naming the path and where to get the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_idx", "write_idx", "load_mnist", "load_cifar10", "load_image_folder", "IDX_IMAGES", "IDX_LABELS"]

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: ubyte with 3 dims / ubyte with 1 dim
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_ROOT_HINT = "Choose the data folder with `--data.root PATH` or the environment variable ONESTEP_DATA."

_MNIST_SOURCES = {
    False: ("MNIST", ("mnist", "MNIST"), "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    True: (
        "Fashion-MNIST",
        ("fashion_mnist", "FashionMNIST"),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _corrupted(path: Path, why: str) -> ValueError:
    return ValueError(f"IDX file {path} is corrupted or truncated ({why}); delete it and download it again.")


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (raw or `.gz`) into a native-endian numpy array.

    Layout: 4-byte big-endian magic `0x00 0x00 <type> <ndim>`, then `ndim` big-endian uint32 sizes,
    then prod(sizes) items. Checks the magic (and `expected_magic` if given) and the exact byte count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    try:
        if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise _corrupted(path, f"gzip error: {err}") from None
    if len(raw) < 4:
        raise _corrupted(path, f"only {len(raw)} bytes, no header")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_TYPES or ndim == 0:
        raise _corrupted(path, f"bad magic number {magic}; expected {IDX_IMAGES} (images) or {IDX_LABELS} (labels)")
    if expected_magic is not None and magic != expected_magic:
        raise _corrupted(path, f"magic number {magic}, expected {expected_magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupted(path, f"header needs {header} bytes, file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise _corrupted(path, f"shape {dims} needs {expected} bytes, file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed when `path` ends in `.gz`); inverse of `read_idx`."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise ValueError(f"write_idx: unsupported dtype {array.dtype} or shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(_IDX_TYPES[code]).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def _find_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(root: str | Path, split: str = "train", fashion: bool = False) -> tuple[Tensor, Tensor]:
    """MNIST (or Fashion-MNIST) from `<root>/mnist/raw/` (`fashion_mnist/raw/`; torchvision's
    `MNIST/raw/`, `FashionMNIST/raw/` also work). Returns uint8 images (N, 1, 28, 28), int64 labels (N,)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    title, folder_names, url = _MNIST_SOURCES[bool(fashion)]
    root = Path(root).expanduser()
    folders = [root / name / "raw" for name in folder_names]
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for stem, magic in ((f"{prefix}-images-idx3-ubyte", IDX_IMAGES), (f"{prefix}-labels-idx1-ubyte", IDX_LABELS)):
        path = _find_file(folders, stem)
        if path is None:
            raise FileNotFoundError(
                f"{title} file not found: {folders[0] / (stem + '.gz')} (also looked in {folders[1]}). "
                f"Download {stem}.gz from {url} into {folders[0]}. {_ROOT_HINT}"
            )
        arrays.append((path, read_idx(path, expected_magic=magic)))
    (image_path, images), (label_path, labels) = arrays
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{title} files {image_path} and {label_path} do not match: images {images.shape}, "
            f"labels {labels.shape}; expected (N, 28, 28) and (N,). Download them again from {url}."
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: allows only the numpy classes needed to rebuild arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any failure means a bad file
        raise ValueError(
            f"CIFAR-10 batch {source} is corrupted or truncated ({err}); download {_CIFAR_URL} again."
        ) from None
    if len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch {source}: {len(data)} images but {len(labels)} labels; download it again.")
    return data, labels


def load_cifar10(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from `<root>/cifar-10-batches-py/` or `<root>/cifar-10-python.tar.gz` (also under
    `<root>/cifar10/`). Returns uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    root = Path(root).expanduser()
    bases = [root, root / "cifar10", root / "cifar-10"]
    blobs: list[tuple[bytes, str]] = []
    folder = next((b / "cifar-10-batches-py" for b in bases if (b / "cifar-10-batches-py").is_dir()), None)
    tarball = next((b / "cifar-10-python.tar.gz" for b in bases if (b / "cifar-10-python.tar.gz").is_file()), None)
    if folder is not None:
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"CIFAR-10 batch missing: {folder / name}. Download {_CIFAR_URL} and extract it."
                )
            blobs.append(((folder / name).read_bytes(), str(folder / name)))
    elif tarball is not None:
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                for name in names:
                    member = tar.extractfile(f"cifar-10-batches-py/{name}")
                    if member is None:
                        raise KeyError(name)
                    blobs.append((member.read(), f"{tarball}:{name}"))
        except (KeyError, tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise ValueError(
                f"CIFAR-10 archive {tarball} is corrupted or truncated ({err}); download {_CIFAR_URL} again."
            ) from None
    else:
        raise FileNotFoundError(
            f"CIFAR-10 not found: neither {root / 'cifar-10-python.tar.gz'} nor {root / 'cifar-10-batches-py'} "
            f"exists. Download {_CIFAR_URL} into {root}. {_ROOT_HINT}"
        )
    parts = [_read_cifar_batch(blob, source) for blob, source in blobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(path: str | Path, size: int = 32) -> tuple[Tensor, Tensor]:
    """Every image under `path` (recursively, sorted), centre-cropped to a square and resized to
    `size` x `size` RGB: uint8 (N, 3, size, size). Labels index the first-level subfolder (0 if flat).
    Needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("load_image_folder needs Pillow: pip install pillow") from None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}. {_ROOT_HINT}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found under {folder}")
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    class_index = {name: i for i, name in enumerate(classes)}
    images, labels = [], []
    for file in files:
        with Image.open(file) as img:
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        parts = file.relative_to(folder).parts
        labels.append(class_index[parts[0]] if len(parts) > 1 else 0)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
