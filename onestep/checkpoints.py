"""What a checkpoint written by ``onestep fit`` is, and whether it fits the configuration it is used with.

Such a checkpoint carries its identity without extra bookkeeping: LightningCLI stores the model's class
path (``hyper_parameters["_class_path"]``) and its init arguments, among them the ``data_shape`` linked
from the data module; the data module's own ``save_hyperparameters`` stores ``datamodule_hyper_parameters``
(``dataset``, ``root``, sizes, seed). That is enough to refuse a mismatch before training and to rebuild
model and data for ``onestep evaluate``.

Why refuse: on ``onestep fit --ckpt_path``, LightningCLI lets the checkpoint's hyperparameters replace the
configured model, so an OT-NFM config resumed from a flow-matching checkpoint silently trains flow
matching; a checkpoint of another dataset fails mid-restore with a raw size mismatch. ``--ckpt_path last``
means, to Lightning, the last checkpoint of the *new* version directory, which never exists: it would
start again from step 0. Here ``last`` is the newest ``last.ckpt`` of the run's earlier versions, and its
absence is an error.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["CheckpointMismatchError", "CheckpointIdentity", "read_identity", "check_matches_config",
           "check_data_shape", "check_fit_checkpoint", "find_last_checkpoint", "resolve_last",
           "run_directory_of"]


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model class, dataset or data shape than the configuration's."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only`` (a checkpoint is data, not code), memory-mapped when possible."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location=map_location, weights_only=True)


class CheckpointIdentity:
    """Class path, dataset, data shape and step of a checkpoint (``None`` where the file does not say)."""

    def __init__(self, path: str | Path, checkpoint: Mapping[str, Any]) -> None:
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        self.path = Path(path)
        self.class_path: str | None = hparams.get("_class_path")
        shape = hparams.get("data_shape")
        self.data_shape: tuple[int, ...] | None = tuple(int(s) for s in shape) if shape is not None else None
        self.dataset: str | None = data.get("dataset")
        self.global_step = int(checkpoint.get("global_step", 0))
        self.model_hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
        self.data_hparams = {k: v for k, v in data.items() if not k.startswith("_")}

    @property
    def class_name(self) -> str:
        return (self.class_path or "?").rsplit(".", 1)[-1]

    def describe(self) -> str:
        shape = "x".join(map(str, self.data_shape)) if self.data_shape else "?"
        return f"{self.class_name} on {self.dataset or '?'} (data shape {shape}, step {self.global_step})"


def read_identity(path: str | Path) -> CheckpointIdentity:
    return CheckpointIdentity(path, load_checkpoint(path))


def resolve_class(class_path: str) -> type | None:
    """The class named by ``class_path``, or ``None`` when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def same_class(a: str, b: str) -> bool:
    """``onestep.generators.OTNFM`` and ``onestep.generators.otnfm.OTNFM`` name the same class."""
    if a == b:
        return True
    ca, cb = resolve_class(a), resolve_class(b)
    return ca is not None and ca is cb


def same_dataset(a: str, b: str) -> bool:
    """Registered names compare as strings; files of points compare by their resolved path."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


def run_directory_of(ckpt_path: str | Path) -> Path:
    """``<run>/checkpoints/x.ckpt`` -> ``<run>``; a checkpoint elsewhere -> its own folder."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def check_matches_config(identity: CheckpointIdentity, class_path: str | None, dataset: str | None) -> None:
    """Raise :class:`CheckpointMismatchError` when the checkpoint's model class or dataset differs from the
    configuration's (one line naming both sides and the fix)."""
    wrong = []
    if identity.class_path and class_path and not same_class(identity.class_path, class_path):
        wrong.append(f"model {identity.class_name} (checkpoint) vs {class_path.rsplit('.', 1)[-1]} (configuration)")
    if identity.dataset is not None and dataset is not None and not same_dataset(str(identity.dataset), str(dataset)):
        wrong.append(f"dataset {identity.dataset} (checkpoint) vs {dataset} (configuration)")
    if wrong:
        config = run_directory_of(identity.path) / "config.yaml"
        hint = f"--config {config}" if config.is_file() else "the configuration it was trained with"
        raise CheckpointMismatchError(
            f"--ckpt_path {identity.path}: {'; '.join(wrong)}; resume it with {hint}, or give a checkpoint "
            f"of the configured model and dataset (or no --ckpt_path to start fresh)")


def check_data_shape(identity: CheckpointIdentity, data_shape: tuple[int, ...]) -> None:
    """Raise when the configured data's shape is not the one the checkpoint's networks were built for."""
    if identity.data_shape is not None and tuple(identity.data_shape) != tuple(data_shape):
        raise CheckpointMismatchError(
            f"--ckpt_path {identity.path}: data shape {tuple(identity.data_shape)} (checkpoint) vs "
            f"{tuple(data_shape)} (configuration's data); use the data options the checkpoint was trained with "
            "or start fresh without --ckpt_path")


def warn_replaced_hyperparameters(identity: CheckpointIdentity, init_args: Mapping[str, Any]) -> None:
    """LightningCLI replaces the configured model arguments by the checkpoint's: say which ones differ."""
    def norm(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    changed = [f"{k}={norm(identity.model_hparams[k])} (configuration: {norm(v)})" for k, v in init_args.items()
               if k in identity.model_hparams and k != "data_shape" and norm(identity.model_hparams[k]) != norm(v)]
    if changed:
        warnings.warn(f"--ckpt_path {identity.path}: the checkpoint's model arguments replace the configuration's: "
                      + ", ".join(changed), stacklevel=2)


def find_last_checkpoint(out_dir: str | Path, run_name: str) -> Path:
    """The ``last.ckpt`` of the highest ``<out_dir>/<run_name>/version_N``; raises when there is none."""
    found = []
    for ckpt in Path(out_dir, run_name).glob("version_*/checkpoints/last.ckpt"):
        version = ckpt.parents[1].name.removeprefix("version_")
        if version.isdigit():
            found.append((int(version), ckpt))
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoint {Path(out_dir, run_name, 'version_*', 'checkpoints', 'last.ckpt')} "
            "exists (nothing to resume); give the checkpoint's path, check --out_dir / --run_name, "
            "or leave --ckpt_path out to start fresh")
    return max(found)[1]



def _model_and_dataset(cfg: Any) -> tuple[Any, str | None, str | None]:
    model, data = cfg.get("model"), cfg.get("data")
    class_path = model.get("class_path") if model is not None else None
    return model, class_path, (data.get("dataset") if data is not None else None)


def resolve_last(cfg: Any) -> None:
    """``--ckpt_path last`` -> the newest ``last.ckpt`` of the run's version folders (written into ``cfg``);
    left to Lightning when a user's own logger decides where checkpoints go."""
    if str(cfg.get("ckpt_path")) != "last" or cfg.get("trainer").get("logger") not in (None, True):
        return
    _, class_path, dataset = _model_and_dataset(cfg)
    run_name = cfg.get("run_name") or f"{str(class_path).rsplit('.', 1)[-1].lower()}-{dataset}"
    cfg.ckpt_path = str(find_last_checkpoint(cfg.get("out_dir") or "runs", run_name))


def check_fit_checkpoint(cfg: Any) -> CheckpointIdentity | None:
    """``onestep fit --ckpt_path FILE``, right after parsing (before LightningCLI reads the checkpoint's
    hyperparameters): refuse another model class or dataset, warn about replaced model arguments. Returns
    the identity for the data-shape check once the data module exists."""
    path = cfg.get("ckpt_path")
    if not path or str(path) in ("last", "best", "hpc") or str(path).startswith("registry"):
        return None
    model, class_path, dataset = _model_and_dataset(cfg)
    identity = read_identity(path)
    check_matches_config(identity, class_path, dataset)
    init_args = model.get("init_args") if model is not None else None
    if init_args is not None:
        warn_replaced_hyperparameters(identity, init_args.as_dict() if hasattr(init_args, "as_dict") else init_args)
    return identity
