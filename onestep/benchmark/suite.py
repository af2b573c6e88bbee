"""Benchmark suites: methods x datasets x seeds under one budget and one evaluation protocol.

A suite is a YAML file::

    name: quick                          # also the W&B group and the report title
    methods:                             # each method is one of
      - name: otnfm                      #   a config file, or a method folder: per dataset its kind's
        config: configs/otnfm            #   default (vector.yaml / image.yaml) then <dataset>.yaml if any
        overrides: {model.init_args.lr: 2.0e-3}       # dotted CLI keys, optional
      - name: mine                       #   or a user's own class (any importable module)
        class_path: my_pkg.module.MyGenerator
        init_args: {backbone: {name: mlp, hidden: [64, 64]}}
      - name: magt                       #   a grid expands into one method per combination:
        config: configs/magt             #   magt[sigma=0.1], magt[sigma=0.2], ...
        grid: {model.init_args.sigma: [0.1, 0.2]}
    datasets: [8gaussians, moons2d]      # names, Manifold class paths (my_pkg.MyManifold), point files (x.npy)
    imports: [my_pkg.datasets]           # modules imported first (here, in every worker, in onestep report):
                                         # e.g. ones registering datasets with @register_manifold (optional)
    seeds: [0, 1, 2]                     # seed_everything of each cell (the data split is fixed by data.seed)
    budget: {max_steps: 2000}            # or {minutes: 1.5}, or both (whichever comes first)
    data: {batch_size: 256}              # OneStepDataModule options common to every cell
    eval:                                # the protocol, the same for every method
      n_samples: 2000
      reference_split: test
      feature_space: null                # null: the dataset's default spaces; or a name / a list
      w2_max_samples: 2000
      seed: 0
      every_n_steps: null                # periodic evaluation (null: only at the end of training)
      nfe_sweep: [1, 2, 4, 8, 16, 100]   # runner-only: re-evaluate models with a `steps` attribute
      final_samples: 2000                # runner-only: samples kept per cell for the report's figures
    overrides: {trainer.accelerator: cpu}  # dotted CLI keys applied to every cell (methods may add more)
    threads: 1                           # torch intra-op threads (optional; `--threads` overrides it)
    reference: flow_matching             # the method the others are compared with in the report (optional;
                                         # default: the method named flow_matching, if any)
    resources: {partition: gpu, gpus: 1, time_min: 120}   # per cell, for --launcher slurm (optional; see
                                         # onestep.benchmark.resources; not part of a cell's fingerprint)

Paths are tried relative to the current directory first, then to the suite file's directory and each of
its parents (so ``configs/otnfm`` works from the repository root and from ``configs/suites``). A method
folder is resolved per dataset by :func:`onestep.config_layers.method_config_files` (``image.yaml`` for
image sets and image folders, ``vector.yaml`` for everything else, then ``<dataset>.yaml`` layered on top
when it exists). A missing kind default is not a load error: that cell fails and is recorded, the others
run. Point files are read relative to the current directory (every worker runs in it).

Fairness is enforced at load time: a method may not override the budget (``trainer.max_steps``) or any
``eval.*`` option, since the protocol must be identical for every method. A ``minutes`` budget counts
training time only (periodic evaluations excluded); without ``max_steps`` the config's own
``trainer.max_steps`` stays as an upper bound (multi-stage methods and cosine schedules need it).

``threads`` exists because small networks on a shared CPU lose badly to oversubscription (an MLP step was
10x slower with 2 torch threads than with 1 on a 2-core machine running other jobs); it does not change
the results, so it is not part of a cell's fingerprint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import yaml

from onestep.benchmark.resources import ClusterResources, resources_from_dict
from onestep.benchmark.suite_helpers import (check_override_key, expand_grid, fail as _fail, import_suite_modules,
                                             resolve_path, to_cli_value)
from onestep.options import AtLeastOne, Positive, Range, init_hints, value_problem

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+=,\[\]-]+$")
RUNNER_EVAL_KEYS = {"nfe_sweep": None, "final_samples": 2048}
PROTOCOL_DEFAULTS: dict[str, Any] = {"n_samples": 2048, "reference_split": "test", "feature_space": None,
                                     "w2_max_samples": 2048, "seed": 0, "every_n_steps": None}
TOP_LEVEL_KEYS = ("name", "description", "methods", "datasets", "seeds", "budget", "data", "eval", "overrides",
                  "threads", "reference", "resources", "imports")


def _allowed(fn) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p != "self"}


@dataclass(frozen=True)
class Budget:
    """Training budget of every cell: optimiser steps, training minutes, or both (first reached stops)."""

    max_steps: Annotated[int, AtLeastOne] | None = None
    minutes: Annotated[float, Positive] | None = None

    def __post_init__(self) -> None:
        if self.max_steps is None and self.minutes is None:
            _fail("budget", "give max_steps (optimiser steps) and/or minutes (training wall-clock), e.g. "
                  "{max_steps: 2000}")
        for key, tp in get_type_hints(Budget, include_extras=True).items():
            problem = value_problem(getattr(self, key), tp)
            if problem:
                _fail(f"budget.{key}", problem)

    @property
    def seconds(self) -> float | None:
        return None if self.minutes is None else 60.0 * float(self.minutes)


@dataclass(frozen=True)
class Protocol:
    """The evaluation protocol: the ``EvaluationCallback`` options every cell shares, plus two runner
    options (``nfe_sweep``: NFE settings at which models exposing an integer ``steps`` attribute are
    re-evaluated after training; ``final_samples``: samples saved per cell for the report)."""

    options: dict[str, Any]
    nfe_sweep: tuple[int, ...] | None = None
    final_samples: Annotated[int, AtLeastOne] = 2048

    def __post_init__(self) -> None:
        from onestep.callbacks import EvaluationCallback

        allowed = _allowed(EvaluationCallback.__init__) | set(RUNNER_EVAL_KEYS)
        for key in self.options:
            if key not in allowed:
                _fail(f"eval.{key}", f"unknown option; allowed: {', '.join(sorted(allowed))}")
        n = self.options.get("n_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            _fail("eval.n_samples", f"must be an integer >= 2, got {n!r}")
        split = value_problem(self.options.get("reference_split"), init_hints(EvaluationCallback)["reference_split"])
        if split:
            _fail("eval.reference_split", split)
        if self.nfe_sweep is not None and (not self.nfe_sweep or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.nfe_sweep)):
            _fail("eval.nfe_sweep", f"must be a non-empty list of integers >= 1, got {list(self.nfe_sweep)!r}")
        final = value_problem(self.final_samples, Annotated[int, AtLeastOne])
        if final:
            _fail("eval.final_samples", final)
        # the callback's own checks (e.g. n_samples >= prdc_k + 1), so a bad protocol fails at load, not per cell
        from onestep.callbacks.evaluation import check_evaluation_options

        checked = _allowed(check_evaluation_options)
        defaults = {k: p.default for k, p in inspect.signature(EvaluationCallback.__init__).parameters.items()
                    if k in checked}
        try:
            check_evaluation_options(**{**defaults, **{k: v for k, v in self.options.items() if k in checked}})
        except ValueError as err:
            _fail("eval", str(err).replace("--eval.", "eval."))

    def cli_args(self) -> list[str]:
        return [f"--eval.{k}={to_cli_value(v)}" for k, v in sorted(self.options.items())]

    def as_dict(self) -> dict[str, Any]:
        return {**self.options, "nfe_sweep": list(self.nfe_sweep) if self.nfe_sweep else None,
                "final_samples": self.final_samples}


@dataclass(frozen=True)
class MethodSpec:
    """One method of a suite: a config (file or per-dataset directory) or a ``class_path``."""

    name: str
    config: str | None = None
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    base_name: str | None = None          # the method's name before grid expansion
    variant: dict[str, Any] = field(default_factory=dict)  # the grid values of this expansion

    def __post_init__(self) -> None:
        where = f"method {self.name!r}"
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            _fail("methods", f"name {self.name!r} must be a non-empty string of letters, digits and _.+=,-[] "
                  "(it names the run directory)")
        if (self.config is None) == (self.class_path is None):
            _fail(where, "give exactly one of config (a YAML file or a method folder with vector.yaml / image.yaml) "
                  "and class_path (my_pkg.module.MyGenerator)")
        if self.init_args and self.class_path is None:
            _fail(where, "init_args goes with class_path; with a config use overrides: {model.init_args.x: ...}")
        if not isinstance(self.init_args, dict) or not isinstance(self.overrides, dict):
            _fail(where, "init_args and overrides must be mappings")
        for key in self.overrides:
            check_override_key(where, key)

    def config_for(self, dataset: str, search: list[Path]) -> list[Path]:
        """The config files of this method for ``dataset``, read in order (``--config`` each): a file as it is;
        a method folder resolves to its kind's default then ``<dataset>.yaml`` when present
        (:func:`onestep.config_layers.method_config_files`); ``[]`` for a ``class_path`` method. Raises
        ``FileNotFoundError`` naming the paths tried, ``ValueError`` for a broken layer."""
        from onestep.config_layers import method_config_files

        if self.config is None:
            return []
        base = resolve_path(self.config, search)
        if base.is_dir():
            return method_config_files(base, dataset, f"method {self.name!r}")
        if not base.is_file():
            where = f"{self.config} not found in {', '.join(str(d) for d in search[:3])}" + \
                    (" or their parents" if len(search) > 3 else "")
            raise FileNotFoundError(f"method {self.name!r}: no config for dataset {dataset!r} ({where}); add the "
                                    "file or remove the dataset/method from the suite")
        return [base]

    def fingerprint(self) -> dict[str, Any]:
        return {"config": self.config, "class_path": self.class_path, "init_args": self.init_args,
                "overrides": self.overrides}


@dataclass(frozen=True)
class Cell:
    """One (method, dataset, seed) of a suite."""

    method: MethodSpec
    dataset: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.method.name, self.dataset, self.seed)

    @property
    def run_name(self) -> str:
        from onestep.data.sources import dataset_label

        return f"{self.method.name}-{dataset_label(self.dataset)}-s{self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    methods: tuple[MethodSpec, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    budget: Budget
    protocol: Protocol
    data: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str | None = None
    threads: int | None = None
    reference: str | None = None
    resources: ClusterResources = field(default_factory=ClusterResources)  # cluster launchers only; not fingerprinted
    imports: tuple[str, ...] = ()

    def cells(self) -> list[Cell]:
        """Every cell, dataset-major (all methods of a dataset run close together in time)."""
        return [Cell(m, d, s) for d in self.datasets for s in self.seeds for m in self.methods]

    def search_dirs(self) -> list[Path]:
        dirs = [Path.cwd()]
        if self.path:
            here = Path(self.path).resolve().parent
            dirs += [here, *here.parents]
        return list(dict.fromkeys(dirs))

    def fingerprint(self, cell: Cell) -> str:
        """Hash of everything that defines a cell's result; a finished cell with another hash is rerun."""
        spec = {"method": cell.method.fingerprint(), "dataset": cell.dataset, "seed": cell.seed,
                "budget": asdict(self.budget), "protocol": self.protocol.as_dict(), "data": self.data,
                "overrides": self.overrides}
        if self.imports:  # the code that defines a user's dataset (absent: the hashes of earlier suites hold)
            spec["imports"] = list(self.imports)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "path": self.path,
                "methods": [asdict(m) for m in self.methods], "datasets": list(self.datasets),
                "seeds": list(self.seeds), "budget": asdict(self.budget), "eval": self.protocol.as_dict(),
                "data": self.data, "overrides": self.overrides, "threads": self.threads,
                "reference": self.reference, "resources": self.resources.as_dict(), "imports": list(self.imports)}


def _method_specs(raw: Any) -> tuple[MethodSpec, ...]:
    if not isinstance(raw, list) or not raw:
        _fail("methods", "must be a non-empty list of {name, config | class_path, ...} entries")
    specs: list[MethodSpec] = []
    allowed = {"name", "config", "class_path", "init_args", "overrides", "grid"}
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            _fail(f"methods[{i}]", f"{entry!r} is a bare string; write {{name: {entry}, config: configs/{entry}}}")
        if not isinstance(entry, dict) or "name" not in entry:
            _fail(f"methods[{i}]", f"must be a mapping with a name, got {entry!r}")
        unknown = set(entry) - allowed
        if unknown:
            _fail(f"methods[{i}] ({entry['name']!r})", f"unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        for item in expand_grid(dict(entry), f"methods[{i}] ({entry['name']!r})"):
            if item.get("config") is not None:
                item["config"] = str(item["config"])
            item["init_args"] = item.get("init_args") or {}
            item["overrides"] = item.get("overrides") or {}
            specs.append(MethodSpec(**item))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        _fail("methods", f"method names must be unique; repeated: {duplicates}")
    return tuple(specs)


def suite_from_dict(raw: dict[str, Any], path: str | None = None) -> Suite:
    """Validate a parsed suite mapping (see the module docstring) and build the :class:`Suite`."""
    from onestep.data import OneStepDataModule
    from onestep.data.datamodule import DATASETS
    from onestep.data.sources import dataset_label, load_points, resolve_dataset

    if not isinstance(raw, dict):
        _fail("file", f"must be a mapping of {', '.join(TOP_LEVEL_KEYS)}, got {type(raw).__name__}")
    unknown = set(raw) - set(TOP_LEVEL_KEYS)
    if unknown:
        _fail("file", f"unknown keys {sorted(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    name = raw.get("name") or (Path(path).stem if path else None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        _fail("name", f"must be a short name of letters, digits and _.-, got {name!r}")
    try:  # first: the modules may register datasets
        imports = import_suite_modules(raw.get("imports"))
    except ImportError as err:
        raise ValueError(f"suite {err}") from None
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        _fail("datasets", f"must be a non-empty list; known datasets: {', '.join(DATASETS)}")
    for d in datasets:
        try:  # the registries now, a class path imported, a point file read and checked
            source = resolve_dataset(d, option="datasets entry")
            if source.kind == "points":
                load_points(source.path, option="datasets entry")
        except ValueError as err:
            raise ValueError(f"suite {err}") from None
    if len(set(datasets)) != len(datasets):
        _fail("datasets", f"repeated entries in {datasets}")
    labels = [dataset_label(d) for d in datasets]
    if len(set(labels)) != len(labels):
        _fail("datasets", f"two point files share a file name {labels} (it names their runs); rename one")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        _fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        _fail("seeds", f"repeated seeds in {seeds}")
    budget_raw = raw.get("budget")
    if not isinstance(budget_raw, dict) or set(budget_raw) - {"max_steps", "minutes"}:
        _fail("budget", f"must be a mapping with max_steps and/or minutes, got {budget_raw!r}")
    data = raw.get("data") or {}
    data_allowed = _allowed(OneStepDataModule.__init__) - {"dataset"}
    if not isinstance(data, dict):
        _fail("data", f"must be a mapping of OneStepDataModule options, got {data!r}")
    for key in data:
        if key not in data_allowed:
            _fail(f"data.{key}", f"unknown option; allowed: {', '.join(sorted(data_allowed))} (the dataset comes "
                  "from datasets:)")
    eval_raw = {**PROTOCOL_DEFAULTS, **(raw.get("eval") or {})}
    runner = {k: eval_raw.pop(k, default) for k, default in RUNNER_EVAL_KEYS.items()}
    protocol = Protocol(options=eval_raw, nfe_sweep=tuple(runner["nfe_sweep"]) if runner["nfe_sweep"] else None,
                        final_samples=runner["final_samples"])
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        _fail("overrides", f"must be a mapping of dotted option names to values, got {overrides!r}")
    for key in overrides:
        check_override_key("overrides", key)
    threads = raw.get("threads")
    wrong_threads = value_problem(threads, Annotated[int, Range(ge=1, note="torch intra-op threads")] | None)
    if wrong_threads:
        _fail("threads", wrong_threads)
    methods = _method_specs(raw.get("methods"))
    reference = raw.get("reference")
    if reference is not None and reference not in [m.name for m in methods]:
        _fail("reference", f"{reference!r} is not one of the suite's methods {[m.name for m in methods]}")
    return Suite(name=name, methods=methods, datasets=tuple(datasets),
                 seeds=tuple(seeds), budget=Budget(**budget_raw), protocol=protocol, data=dict(data),
                 overrides=dict(overrides), description=str(raw.get("description") or ""),
                 path=str(path) if path else None, threads=threads, reference=reference,
                 resources=resources_from_dict(raw.get("resources")), imports=imports)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite YAML file; errors are ``ValueError`` naming the option and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {path} does not exist (suites live in configs/suites/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        from onestep.errors import describe_yaml_error

        raise ValueError(f"suite {path}: {describe_yaml_error(err)}") from None
    return suite_from_dict(raw, str(path))
