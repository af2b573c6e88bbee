"""Has a finished cell's configuration changed since it ran?

A cell's fingerprint (:meth:`onestep.benchmark.suite.Suite.fingerprint`) names its config *files* and the
suite's options, not what the files say: after ``configs/otnfm/vector.yaml`` changes a default, every OT-NFM
cell of an existing output folder still matches its fingerprint, and resuming (or ``--reuse``) would keep
results computed under the old default. So a finished record is also checked against the current files:
every option that the cell's command line sets (each ``--config`` layer read in order, then each
``--key=value``, exactly as :func:`onestep.benchmark.cell.cell_args` builds it; a suite's cell is checked by
:func:`onestep.benchmark.cell.cell_stale_reason`) must equal the value stored
in the record's resolved ``config``. An option is compared whole (a dict-valued option such as
``model.init_args.backbone`` must match as a whole, so an entry added *or removed* is noticed).

Not covered: an option that a file stops setting falls back to the class default unchecked, and code
changes (a class default, a loss) are part of no check.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

__all__ = ["configured_options", "stale_reason"]

# options that name where and how a run is kept, not what it computes (also used by records.latest_by_cell)
NOT_COMPARED = ("config", "out_dir", "run_name", "wandb", "wandb_group", "wandb_project")
MISSING = object()


def configured_options(args: list[str]) -> dict[str, Any]:
    """dotted option -> value for every option an ``onestep fit`` argument list sets, later ones winning."""
    options: dict[str, Any] = {}
    words = iter(args)
    for word in words:
        if word == "--config":
            layer = yaml.safe_load(Path(next(words)).read_text()) or {}
            for key, value in _flatten(layer).items():
                _set(options, key, value)
        elif word.startswith("--") and "=" in word:
            key, text = word[2:].split("=", 1)
            value = yaml.safe_load(text)
            if key == "model" and isinstance(value, dict):  # a class_path method: --model={...}
                for sub, sub_value in _flatten({"model": value}).items():
                    _set(options, sub, sub_value)
            else:
                _set(options, key, value)
    return {k: v for k, v in options.items() if k.split(".")[0] not in NOT_COMPARED}


def stale_reason(args: list[str], record: dict[str, Any]) -> str | None:
    """Why ``record`` (a finished cell) was not computed under ``args`` (the cell's current ``onestep fit``
    arguments), in one line; ``None`` if every option agrees or the record holds no resolved config."""
    config = record.get("config")
    if not isinstance(config, dict):
        return None  # records of old versions: nothing to compare with
    try:
        options = configured_options(args)
    except (OSError, yaml.YAMLError) as err:
        return f"its config cannot be read now ({type(err).__name__}: {err})"
    changed = []
    for key, value in options.items():
        then = _lookup(config, key)
        if key == "model.class_path" and then is not MISSING and _same_class(value, then):
            continue
        if then is MISSING or not _same(value, then):
            shown = "unset" if then is MISSING else _short(then)
            changed.append(f"{key}: {shown} then, {_short(value)} now")
    if not changed:
        return None
    more = f" and {len(changed) - 2} more" if len(changed) > 2 else ""
    return "the config changed since it ran (" + "; ".join(changed[:2]) + more + ")"


def _flatten(layer: dict[str, Any]) -> dict[str, Any]:
    """A config file's options at jsonargparse's granularity: ``model.class_path``, ``model.init_args.<arg>``,
    ``<section>.<option>`` and top-level scalars; option values (dicts included) are kept whole."""
    flat: dict[str, Any] = {}
    for section, value in layer.items():
        if not isinstance(value, dict):
            flat[section] = value
            continue
        for key, sub in value.items():
            if section == "model" and key == "init_args" and isinstance(sub, dict):
                flat.update({f"model.init_args.{arg}": v for arg, v in sub.items()})
            else:
                flat[f"{section}.{key}"] = sub
    return flat


def _set(options: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key``; a key inside an option already set (``model.init_args.backbone.hidden``) edits a copy of
    that option's value, and setting an option replaces any of its entries set before."""
    for parent in list(options):
        if key.startswith(parent + ".") and isinstance(options[parent], dict):
            updated = dict(options[parent])
            _deep_set(updated, key[len(parent) + 1:].split("."), value)
            options[parent] = updated
            return
    for child in [k for k in options if k.startswith(key + ".")]:
        del options[child]
    options[key] = value


def _deep_set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target[part] = dict(target[part]) if isinstance(target.get(part), dict) else {}
        target = target[part]
    target[path[-1]] = value


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal as jsonargparse would read them: numbers by value (``1e-3`` is text to YAML, 0.001 to the
    parser), lists and tuples alike, mappings key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    number_a, number_b = _number(a), _number(b)
    if number_a is not None and number_b is not None:
        return number_a == number_b
    return a == b


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _same_class(a: Any, b: Any) -> bool:
    """``onestep.generators.OTNFM`` and ``onestep.generators.otnfm.OTNFM`` name one class."""
    if a == b:
        return True
    try:
        return _import(a) is _import(b)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
