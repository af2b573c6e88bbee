"""Shared helpers of the performance benchmarks: method discovery, model building, timing, JSON output.

Methods are discovered, not listed: every method folder ``configs/<method>/`` with the default config of the
dataset's kind (``vector.yaml`` or ``image.yaml``, layered with ``<dataset>.yaml`` when present) is a method
(a plugin that lands with its configs is benchmarked with no edit here). Models are built and briefly
trained through the same LightningCLI as ``onestep fit`` (:func:`build_model`), so any state their sampler
needs (noise or kernel banks, teachers, stages) exists; speed does not depend on how well they are trained.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from onestep.benchmark.records import machine_info, package_versions  # noqa: E402
from onestep.config_layers import load_method_config, method_config_files  # noqa: E402
from onestep.data.sources import dataset_kind  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
CONFIG_DIR = REPO / "configs"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these config directories")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/<script>.json)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def import_object(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodConfig:
    """A method folder's config for one dataset (its kind's default plus the dataset's layer)."""

    directory: Path
    dataset: str

    def cli_args(self) -> list[str]:
        files = method_config_files(self.directory, self.dataset, f"config folder {self.directory}")
        return [a for f in files for a in ("--config", str(f))] + [f"--data.dataset={self.dataset}"]

    def load(self) -> dict[str, Any]:
        return load_method_config(self.directory, self.dataset)

    def __str__(self) -> str:
        return f"{self.directory} ({self.dataset})"


def discover_methods(dataset: str, only: list[str] | None = None) -> list[tuple[str, MethodConfig]]:
    """``(method, config)`` for every method folder holding the default config of ``dataset``'s kind."""
    found = []
    kind = dataset_kind(dataset)
    for directory in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "suites"):
        if (directory / f"{kind}.yaml").is_file() and (only is None or directory.name in only):
            found.append((directory.name, MethodConfig(directory, dataset)))
    return found


def config_args(config: MethodConfig | Path) -> list[str]:
    """The ``onestep fit`` arguments that select ``config`` (a method folder's, or one full config file)."""
    return config.cli_args() if isinstance(config, MethodConfig) else ["--config", str(config)]


def model_section(config: MethodConfig | Path) -> tuple[str, dict[str, Any]]:
    config = config.load() if isinstance(config, MethodConfig) else yaml.safe_load(Path(config).read_text())
    model = config["model"]
    return model["class_path"], dict(model.get("init_args") or {})


def build_model(config_path: MethodConfig | Path, data_shape: tuple[int, ...], device: torch.device,
                train_steps: int = 10, **overrides: Any) -> torch.nn.Module:
    """The method of ``config_path``, briefly trained through the ``onestep fit`` machinery.

    A few steps (``train_steps``) run the method's set-up hooks (noise banks, kernel banks, teachers,
    stage switches) that sampling may need; speed does not depend on how well the model is trained.
    ``train_steps=0`` builds the untrained module directly from ``class_path`` and ``init_args``."""
    if train_steps <= 0:
        class_path, init_args = model_section(config_path)
        model = import_object(class_path)(data_shape=data_shape, **{**init_args, **overrides})
        return model.to(device).eval()
    import contextlib
    import io
    import logging
    import tempfile

    from onestep.cli import run_lightning

    with tempfile.TemporaryDirectory() as tmp:
        args = [*config_args(config_path), f"--trainer.max_steps={train_steps}", "--eval.every_n_steps=null",
                "--eval.at_end=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--out_dir={tmp}", f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
        args += [f"--model.init_args.{k}={json.dumps(v)}" for k, v in overrides.items()]
        argv, sys.argv = sys.argv, sys.argv[:1]
        loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                cli = run_lightning(args=args, run=False)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            sys.argv = argv
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    return cli.model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 2,
                   min_seconds: float = 0.0) -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones; with
    ``min_seconds`` a call is repeated in a loop until that long, so tiny calls are not timer noise."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times, loops = [], 1
        if min_seconds > 0:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            loops = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            sync(device)
            times.append((time.perf_counter() - start) / loops)
    return {"seconds": statistics.median(times), "all": times, "loops": loops}


def interleaved_seconds(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 5,
                        min_seconds: float = 0.2) -> dict[str, dict[str, Any]]:
    """Median time per call of each function, timed in alternation (a, b, a, b, ...) so that on a shared
    machine both see the same background load; each timing loops a call until ``min_seconds``."""
    loops, times = {}, {name: [] for name in fns}
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up, and the loop count that makes a timing last min_seconds
            fn()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            loops[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(loops[name]):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) / loops[name])
    return {name: {"seconds": statistics.median(t), "all": t, "loops": loops[name]} for name, t in times.items()}


def save_result(name: str, payload: dict[str, Any], out: str | None = None, device: torch.device | None = None) -> Path:
    """Write ``payload`` with the machine, versions, date and command to ``benchmarks/results/<name>.json``."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(device),
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "versions": package_versions(), **payload}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)
    print(f"saved {path}")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned text table of ``rows`` (dicts) restricted to ``columns``."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)
    table = [columns] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def fit_cli(args: list[str], steps: int, batch_size: int, out_dir: str, accelerator: str = "cpu"):
    """``onestep fit`` over ``args`` built but not run (model, datamodule, trainer), for ``steps`` steps at
    ``batch_size`` on ``accelerator``, without evaluation, progress bar or model summary, writing under
    ``out_dir``."""
    from onestep.fit import run_lightning

    args = [*args, f"--trainer.max_steps={steps}", f"--data.batch_size={batch_size}", "--eval.every_n_steps=null",
            "--eval.at_end=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--out_dir={out_dir}", f"--trainer.accelerator={accelerator}", "--trainer.devices=1"]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI would read the script's own arguments
    try:
        return run_lightning(args=args, run=False)
    finally:
        sys.argv = argv
