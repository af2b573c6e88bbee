"""Composed method configs: a method folder holds one full config per dataset kind and small per-dataset layers.

``configs/<method>/vector.yaml`` is the method's complete config for any vector dataset (built-in or user
manifolds, point files) and ``configs/<method>/image.yaml`` for image datasets (image sets and image
folders); neither names ``data.dataset``. ``configs/<method>/<dataset>.yaml``, when it exists, holds only
what differs for that dataset and is read after its kind's default (jsonargparse merges successive
``--config`` files option by option, so a layer's ``model.init_args.sigma`` replaces the default's and
leaves the others). ``onestep fit --config configs/magt --data.dataset 8gaussians`` and a suite's
``config: configs/magt`` both resolve the folder with :func:`method_config_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from onestep.data.sources import POINT_SUFFIXES, dataset_kind

__all__ = ["KINDS", "expand_config_directories", "load_method_config", "method_config_files"]

KINDS = ("vector", "image")


def _read_layer(path: Path, where: str) -> dict[str, Any]:
    from onestep.errors import describe_yaml_error

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: {path}: {describe_yaml_error(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {path} holds a {type(raw).__name__}, not a mapping of options; write "
                         "`model:`, `data:`, `trainer:`, `eval:` sections")
    return raw


def _class_path(raw: dict[str, Any]) -> Any:
    model = raw.get("model")
    return model.get("class_path") if isinstance(model, dict) else None


def own_layer_name(dataset: str) -> str | None:
    """The per-dataset file name of ``dataset`` (a point file has none: its name is a path)."""
    if "/" in dataset or "\\" in dataset or dataset.lower().endswith(POINT_SUFFIXES):
        return None
    return f"{dataset}.yaml"


def method_config_files(directory: Path, dataset: str, where: str) -> list[Path]:
    """``[<kind>.yaml]`` or ``[<kind>.yaml, <dataset>.yaml]`` of a method folder, checked: the kind default
    exists and names no dataset; a per-dataset layer keeps the default's model class and names no other
    dataset. Problems are one-line errors naming the file and the fix."""
    kind = dataset_kind(dataset)
    default = directory / f"{kind}.yaml"
    name = own_layer_name(dataset)
    own = directory / name if name else None
    if not default.is_file():
        has_own = f" ({own.name} alone is only a layer on top of it)" if own is not None and own.is_file() else ""
        raise FileNotFoundError(f"{where}: {directory} has no {kind}.yaml, the default config of {kind} datasets "
                                f"such as {dataset!r}{has_own}; add {default} (a full config without data.dataset) "
                                "or give a config file instead of the folder")
    base = _read_layer(default, where)
    if isinstance(base.get("data"), dict) and "dataset" in base["data"]:
        raise ValueError(f"{where}: {default} sets data.dataset={base['data']['dataset']!r}, but a kind default "
                         f"serves every {kind} dataset; remove data.dataset (it comes from --data.dataset)")
    if own is None or not own.is_file():
        return [default]
    layer = _read_layer(own, where)
    named = layer.get("data", {}).get("dataset") if isinstance(layer.get("data"), dict) else None
    if named is not None and named != dataset:
        raise ValueError(f"{where}: {own} sets data.dataset={named!r} for dataset {dataset!r}; remove it")
    if _class_path(layer) is not None and _class_path(layer) != _class_path(base):
        raise ValueError(f"{where}: {own} sets model.class_path={_class_path(layer)!r} but {default.name} has "
                         f"{_class_path(base)!r}; a per-dataset layer only changes options (model.init_args.*): "
                         "remove its class_path, or make it a method folder of its own")
    return [default, own]


def merge_layers(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` over ``base`` as jsonargparse reads successive ``--config`` files for these sections: mappings
    of options (``model``, ``init_args``, ``data``, ``trainer``, ``eval``) merge key by key, any other value
    (a list, a backbone mapping) is replaced whole."""
    out = dict(base)
    for key, value in layer.items():
        if key in ("model", "init_args", "data", "trainer", "eval") and isinstance(value, dict) \
                and isinstance(out.get(key), dict):
            out[key] = merge_layers(out[key], value)
        else:
            out[key] = value
    return out


def load_method_config(directory: str | Path, dataset: str) -> dict[str, Any]:
    """The merged YAML of a method folder for ``dataset`` (``data.dataset`` set), for scripts that read a
    method's options without the CLI; ``onestep fit --config <folder> --data.dataset <dataset>
    --print_config`` shows the same values with every default filled in."""
    config: dict[str, Any] = {}
    for path in method_config_files(Path(directory), dataset, f"config folder {directory}"):
        config = merge_layers(config, _read_layer(path, str(path)))
    config["data"] = {**(config.get("data") or {}), "dataset": dataset}
    return config


def _dataset_in(argv: list[str]) -> str | None:
    """The last ``--data.dataset`` of ``argv`` (the one jsonargparse keeps), else None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--data.dataset" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--data.dataset="):
            found = arg.split("=", 1)[1]
    return found


def expand_config_directories(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config <method folder>`` replaced by its layered files for ``--data.dataset``
    (``--config configs/magt --data.dataset 8gaussians`` -> ``--config configs/magt/vector.yaml --config
    configs/magt/8gaussians.yaml ...``); a ``--config <file>`` is left as it is."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            out += ["--config", value]
            continue
        dataset = _dataset_in(argv)
        if dataset is None:
            raise ValueError(f"--config {value} is a method folder: give --data.dataset too (its <kind>.yaml and "
                             f"<dataset>.yaml are layered), or one file such as --config {folder / 'vector.yaml'}")
        for path in method_config_files(folder, dataset, f"--config {value}"):
            out += ["--config", str(path)]
    return out
