"""Where ``--data.dataset`` comes from: a registered name, a ``Manifold`` class path or a file of points.

* a registered name: an image set (:data:`onestep.data.image_sets.IMAGE_DATASETS`, image folders included)
  or a manifold (:data:`onestep.data.manifolds.MANIFOLDS`; a user's module adds one with
  :func:`register_manifold`, imported through ``PYTHONPATH`` or a suite's ``imports:``);
* a dotted class path ``my_module.MyManifold`` to a :class:`Manifold` subclass, built with
  ``--data.dataset_args`` (a mapping of its constructor's arguments);
* a path to a file of points (``.npy``, ``.npz``, ``.pt``): raw units, shape ``(n, D)``. No distance to a
  support is known for such data, so the manifold metrics are skipped (the recorded protocol says so).

Registries are read at call time, so a dataset registered after import is known to every check. A
dataset's *kind* (``image`` or ``vector``) picks its method's default config (``configs/<method>/<kind>.yaml``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .image_sets import IMAGE_DATASETS
from .manifolds import MANIFOLDS, Manifold

__all__ = ["DatasetSource", "POINT_SUFFIXES", "dataset_kind", "dataset_label", "load_points", "register_manifold",
           "resolve_dataset"]

POINT_SUFFIXES = (".npy", ".npz", ".pt")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
HOW_TO_ADD = ("to add a dataset give a Manifold subclass by class path (--data.dataset my_module.MyManifold, its "
              "module on PYTHONPATH), a file of points (--data.dataset points.npy, shape (n, D)), or register a "
              "name with @register_manifold in a module on PYTHONPATH or in a suite's imports: (README, "
              "\"Adding a dataset\")")


def register_manifold(name: str | type[Manifold] | None = None):
    """Register a :class:`Manifold` subclass under ``name`` (default: the class's ``name``) so that
    ``--data.dataset <name>`` and suites find it. Use as ``@register_manifold`` or ``@register_manifold("ring")``."""

    def register(cls: type[Manifold], key: str | None = None) -> type[Manifold]:
        if not (isinstance(cls, type) and issubclass(cls, Manifold)):
            raise TypeError(f"register_manifold: {cls!r} is not a subclass of onestep.data.Manifold; subclass it "
                            "(sample_clean, distance, intrinsic_dim)")
        key = key or cls.__dict__.get("name") or cls.name
        if not isinstance(key, str) or not _NAME.match(key) or key == Manifold.name:
            raise ValueError(f"register_manifold: {cls.__name__} needs a name of letters, digits and _.+- (set the "
                             f"class attribute name = '...' or call register_manifold('...')), got {key!r}")
        if key in IMAGE_DATASETS:
            raise ValueError(f"register_manifold: {key!r} is an image dataset's name; choose another name")
        MANIFOLDS[key] = cls
        return cls

    if isinstance(name, type):  # bare @register_manifold
        return register(name)
    return lambda cls: register(cls, name)


@dataclass(frozen=True)
class DatasetSource:
    """A resolved ``--data.dataset``: ``kind`` is ``image``, ``manifold`` or ``points``."""

    spec: str
    kind: str
    manifold: type[Manifold] | None = None
    path: Path | None = None


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(POINT_SUFFIXES) or "/" in spec or "\\" in spec or Path(spec).expanduser().is_file()


def resolve_dataset(spec: Any, option: str = "--data.dataset") -> DatasetSource:
    """What ``spec`` names (the registries are read now); a ``ValueError`` of one line (option, problem, fix)
    otherwise. A class path is imported; a point file must exist (its content is checked by :func:`load_points`)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{option}={spec!r} is not a dataset; give a name, a class path or a file ({HOW_TO_ADD})")
    if spec in IMAGE_DATASETS:
        return DatasetSource(spec, "image")
    if spec in MANIFOLDS:
        return DatasetSource(spec, "manifold", manifold=MANIFOLDS[spec])
    if _looks_like_file(spec):
        path = Path(spec).expanduser()
        if path.suffix.lower() not in POINT_SUFFIXES:
            raise ValueError(f"{option}={spec}: a file of points must end in {', '.join(POINT_SUFFIXES)}; save the "
                             "(n, D) array with numpy.save or torch.save (image folders: --data.dataset image_folder "
                             "--data.root FOLDER)")
        if not path.is_file():
            raise ValueError(f"{option}={spec}: the file {'is a folder' if path.is_dir() else 'does not exist'}; give "
                             "the path of a .npy/.npz/.pt file of points (relative to the current directory)")
        return DatasetSource(spec, "points", path=path)
    if _CLASS_PATH.match(spec):
        return DatasetSource(spec, "manifold", manifold=_import_manifold(spec, option))
    known = ", ".join([*MANIFOLDS, *IMAGE_DATASETS])
    raise ValueError(f"{option}={spec!r} is not a known dataset (known datasets: {known}); {HOW_TO_ADD}")


def _import_manifold(spec: str, option: str) -> type[Manifold]:
    module_name, _, class_name = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the module itself, not one of its imports
            raise ValueError(f"{option}={spec}: no module {module_name!r} can be imported; put the folder that "
                             f"holds it on PYTHONPATH (or install it), or check the spelling ({HOW_TO_ADD})") from None
        raise ValueError(f"{option}={spec}: importing {module_name!r} failed: {err}; install what it needs") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"{option}={spec}: module {module_name!r} has no {class_name!r}; check the class name")
    if not (isinstance(cls, type) and issubclass(cls, Manifold)):
        raise ValueError(f"{option}={spec}: {class_name} is not a subclass of onestep.data.Manifold; subclass it and "
                         "define sample_clean, distance and intrinsic_dim (README, \"Adding a dataset\")")
    return cls


def dataset_kind(spec: str) -> str:
    """``image`` for image sets and image folders, ``vector`` for everything else (manifolds, user manifolds,
    point files): the default config a method uses for the dataset. Nothing is imported or read."""
    return "image" if spec in IMAGE_DATASETS else "vector"


def dataset_label(spec: str) -> str:
    """The dataset as it appears in run names: the name or class path itself, a point file's file name."""
    if spec in IMAGE_DATASETS or spec in MANIFOLDS or not _looks_like_file(spec):
        return spec
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(spec).name)


def _read_array(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "points" in names:
                return archive["points"]
            if len(names) != 1:
                raise ValueError(f"holds the arrays {names}; name the one to use 'points' (numpy.savez(f, points=x))")
            return archive[names[0]]
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, Tensor):
        raise ValueError(f"holds a {type(value).__name__}, not a tensor; save the (n, D) tensor itself")
    return value


def load_points(path: Path, option: str = "--data.dataset") -> Tensor:
    """The points of a ``.npy``/``.npz``/``.pt`` file as float32 ``(n, D)``; a ``ValueError`` naming the file,
    the problem and the fix for anything else (unreadable, not 2-D, not numeric, non-finite)."""
    try:
        raw = _read_array(path)
    except ValueError as err:
        raise ValueError(f"{option}={path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - numpy/torch raise many types for a corrupted file
        raise ValueError(f"{option}={path}: cannot be read as a {path.suffix} array ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); save it with numpy.save or torch.save")
    array = raw.numpy() if isinstance(raw, Tensor) else np.asarray(raw)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{option}={path}: holds {array.dtype} values; save real numbers (float or int)")
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{option}={path}: shape {tuple(array.shape)} is not (n, D); save one point per row "
                         "(reshape to (n, D) first)")
    points = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
    bad = (~torch.isfinite(points)).any(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:3].tolist()
        raise ValueError(f"{option}={path}: {int(bad.sum())} of {len(points)} points have non-finite coordinates "
                         f"(rows {rows}...; values beyond float32's range count too); drop, fix or rescale those rows")
    return points


def build_manifold(cls: type[Manifold], spec: str, args: dict[str, Any] | None, noise_std: float | None) -> Manifold:
    """``cls(**args)`` (plus ``noise_std`` when set), checked: a :class:`Manifold` with integer dimensions
    ``0 <= intrinsic_dim <= ambient_dim`` and a valid ``noise_std``."""
    kwargs = dict(args or {})
    if noise_std is not None:
        if "noise_std" in kwargs:
            raise ValueError("--data.noise_std and --data.dataset_args.noise_std are both set; keep one")
        kwargs["noise_std"] = noise_std
    try:
        manifold = cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"--data.dataset={spec}: {cls.__name__}(**{kwargs}) failed ({err}); give the arguments its "
                         "constructor takes through --data.dataset_args") from None
    where = f"--data.dataset={spec}: {cls.__name__}"
    ambient, intrinsic = getattr(manifold, "ambient_dim", None), getattr(manifold, "intrinsic_dim", None)
    if isinstance(ambient, bool) or not isinstance(ambient, int) or ambient < 1:
        raise ValueError(f"{where}.ambient_dim={ambient!r}; set the class attribute ambient_dim to the dimension D "
                         "of its points (an integer >= 1)")
    if isinstance(intrinsic, bool) or not isinstance(intrinsic, int) or not 0 <= intrinsic <= ambient:
        raise ValueError(f"{where}.intrinsic_dim={intrinsic!r}; set it to the support's dimension, an integer "
                         f"in [0, {ambient}]")
    try:
        manifold.noise_std
    except AttributeError:
        raise ValueError(f"{where} has no noise_std; call super().__init__(noise_std) in its __init__") from None
    return manifold


def check_samples(manifold: Manifold, spec: str, samples: Any, n: int) -> None:
    """Refuse samples that are not a finite float tensor of shape ``(n, ambient_dim)``, naming the method."""
    where = f"--data.dataset={spec}: {type(manifold).__name__}.sample_clean"
    if not isinstance(samples, Tensor) or not samples.is_floating_point():
        raise ValueError(f"{where} returned {type(samples).__name__} {getattr(samples, 'dtype', '')}; return a float "
                         "tensor of shape (n, ambient_dim)")
    if tuple(samples.shape) != (n, manifold.ambient_dim):
        raise ValueError(f"{where} returned shape {tuple(samples.shape)} for n={n}; return (n, ambient_dim) = "
                         f"({n}, {manifold.ambient_dim})")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{where} returned non-finite values; return finite points")
