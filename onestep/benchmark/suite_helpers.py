"""The suite loader's helpers that need none of its types: ``imports:``, CLI values, override keys, paths and
method grids (:mod:`onestep.benchmark.suite` builds the typed suite with them)."""

from __future__ import annotations

import importlib
import itertools
import json
import re
from pathlib import Path
from typing import Any


def fail(where: str, message: str) -> None:
    raise ValueError(f"suite {where}: {message}")


def import_suite_modules(modules: Any) -> tuple[str, ...]:
    """Import a suite's ``imports:`` (module names), e.g. modules registering datasets with
    ``@register_manifold``; the loader calls it, so the parent, every worker (each loads the suite) and
    ``onestep report`` (from the saved ``suite.yaml``) all see the same registries. Raises ``ImportError``."""
    if modules is None:
        return ()
    if not isinstance(modules, list) or any(not isinstance(m, str) or not re.match(r"^[A-Za-z_][\w.]*$", m)
                                            for m in modules):
        raise ImportError(f"suite imports: must be a list of module names such as [my_pkg.datasets], got {modules!r}")
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise ImportError(f"suite imports: no module {name!r} can be imported; put the folder that holds it "
                                  "on PYTHONPATH (workers and onestep report inherit it) or install it") from None
            raise ImportError(f"suite imports: importing {name!r} failed: {err}; install what it needs") from None
        except Exception as err:  # noqa: BLE001 - a user's module may raise anything while importing
            raise ImportError(f"suite imports: importing {name!r} failed: {type(err).__name__}: {err}") from None
    return tuple(modules)


def to_cli_value(value: Any) -> str:
    """A YAML/JSON value as jsonargparse reads it from the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def check_override_key(where: str, key: Any) -> None:
    if not isinstance(key, str) or not re.match(r"^[A-Za-z_][\w.]*$", key):
        fail(where, f"override key {key!r} must be a dotted option name such as model.init_args.lr")
    if key == "trainer.max_steps" or key.startswith("eval.") or key in ("seed_everything", "out_dir", "run_name"):
        fail(where, f"override {key!r} is fixed by the suite (budget, eval protocol, seeds and run naming "
              "are the same for every method); change the suite's budget/eval/seeds instead")


def resolve_path(path: str, search: list[Path]) -> Path:
    """``path`` itself if absolute, else the first of ``search / path`` that exists (else the first)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in search:
        if (base / p).exists():
            return base / p
    return search[0] / p if search else p


def expand_grid(entry: dict[str, Any], where: str) -> list[dict[str, Any]]:
    grid = entry.pop("grid", None)
    if grid is None:
        return [entry]
    if not isinstance(grid, dict) or not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        fail(where, f"grid must map option names to non-empty lists of values, got {grid!r}")
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        variant = dict(zip(keys, values))
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={to_cli_value(v)}" for k, v in variant.items())
        out.append({**entry, "name": f"{entry['name']}[{label}]", "base_name": entry["name"], "variant": variant,
                    "overrides": {**(entry.get("overrides") or {}), **variant}})
    return out
