"""One benchmark cell (method x dataset x seed): built and trained exactly like ``onestep fit``.

The cell's command line is assembled from the suite (config, overrides, budget, seed, protocol) and handed
to the same LightningCLI as ``onestep fit`` (``run_lightning(args, run=False)``), then trained with
``trainer.fit``; the record stores the equivalent ``onestep fit ...`` command so any cell can be replayed.

Time accounting (:class:`CellClock`): *training seconds* run from ``on_train_start`` to the last finished
batch, minus the time spent inside ``EvaluationCallback.evaluate`` (periodic evaluations are not training);
they are saved in checkpoints, so a resumed cell keeps counting and its wall-clock budget is enforced on
the total. A ``minutes`` budget sets ``trainer.should_stop`` once the training seconds reach it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

from onestep.benchmark.records import jsonable, machine_info, package_versions
from onestep.benchmark.staleness import configured_options, stale_reason
from onestep.benchmark.suite import Cell, Suite, to_cli_value
from onestep.benchmark.tables import primary_metric
from onestep.callbacks import EvaluationCallback
from onestep.callbacks.loggers import finish_wandb_runs
from onestep.callbacks.progress import HeartbeatCallback
from onestep.errors import summarize
from onestep.files import atomic_torch_save
from onestep.fit import run_lightning
from onestep.metrics.features import get_feature_extractor
from onestep.metrics.speed import timed
from onestep.metrics.suite import MetricOptions, evaluate_samples

HEARTBEAT_SECONDS = 30.0  # a cell's progress line (step, ETA) at most this often
IMAGE_FINAL_SAMPLES = 100  # images kept per cell for the report's grid (vectors keep eval.final_samples)
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


class CellClock(Callback):
    """Training time without evaluation, resumable, with an optional wall-clock budget."""

    def __init__(self, budget_seconds: float | None = None) -> None:
        self.budget_seconds = budget_seconds
        self.previous_seconds = 0.0  # restored from a checkpoint of an interrupted run
        self.eval_intervals: list[tuple[float, float]] = []
        self.start: float | None = None
        self.last_batch_end: float | None = None
        self.stopped_by_time = False

    def training_seconds(self, now: float | None = None) -> float:
        if self.start is None:
            return self.previous_seconds
        end = now if now is not None else (self.last_batch_end or self.start)
        evaluating = sum(max(0.0, min(b, end) - max(a, self.start)) for a, b in self.eval_intervals)
        return self.previous_seconds + max(0.0, end - self.start - evaluating)

    def eval_seconds(self) -> float:
        return sum(b - a for a, b in self.eval_intervals)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_batch_end = time.perf_counter()
        if self.budget_seconds is not None and self.training_seconds() >= self.budget_seconds:
            self.stopped_by_time = True
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"training_seconds": self.training_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_seconds = float(state_dict.get("training_seconds", 0.0))


def cell_args(suite: Suite, cell: Cell, out_dir: Path, wandb: dict[str, Any] | None = None) -> list[str]:
    """The ``onestep fit`` arguments of ``cell`` (raises ``FileNotFoundError`` for a missing config)."""
    method = cell.method
    args: list[str] = []
    configs = method.config_for(cell.dataset, suite.search_dirs())  # a method folder: kind default + layer
    for config in configs:
        args += ["--config", str(config)]
    if not configs:
        args += [f"--model={json.dumps({'class_path': method.class_path, 'init_args': method.init_args})}"]
    args.append(f"--data.dataset={cell.dataset}")
    args += [f"--data.{k}={to_cli_value(v)}" for k, v in sorted(suite.data.items())]
    args += [f"--{k}={to_cli_value(v)}" for k, v in suite.overrides.items()]
    args += [f"--{k}={to_cli_value(v)}" for k, v in method.overrides.items()]
    if suite.budget.max_steps is not None:
        args.append(f"--trainer.max_steps={suite.budget.max_steps}")
    args += suite.protocol.cli_args()
    args += [f"--seed_everything={cell.seed}", f"--out_dir={out_dir / 'runs'}", f"--run_name={cell.run_name}",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if wandb:
        args += ["--wandb=true", f"--wandb_group={suite.name}", f"--wandb_project={wandb.get('project', 'onestep')}"]
    return args


def cell_stale_reason(suite: Suite, cell: Cell, out_dir: Path, record: dict[str, Any]) -> str | None:
    """Why the finished ``record`` of ``cell`` is not what the cell would compute now (its config files'
    values changed, :func:`onestep.benchmark.staleness.stale_reason`), or ``None``."""
    try:
        return stale_reason(cell_args(suite, cell, out_dir), record)
    except (FileNotFoundError, ValueError) as err:
        return f"its config cannot be read now ({err})"


def find_resume_checkpoint(run_root: Path, fingerprint: str, args: list[str] | None = None) -> Path | None:
    """The newest ``version_*/checkpoints/last.ckpt`` of a cell among the versions written under the same
    specification: the fingerprint in the version's ``cell.json`` and, given the cell's ``onestep fit``
    ``args``, every option they set (:mod:`onestep.benchmark.staleness`) against the version's resolved
    ``config.yaml`` (or, without one, the options its ``cell.json`` saved; a version with neither is not
    resumed). A checkpoint trained under other config values would otherwise be continued, or fail to load."""
    found = []
    for ckpt in run_root.glob("version_*/checkpoints/last.ckpt"):
        try:
            saved = json.loads((ckpt.parents[1] / "cell.json").read_text())
            if saved.get("fingerprint") == fingerprint and (args is None or _same_options(ckpt.parents[1], saved, args)):
                found.append(ckpt)
        except (OSError, json.JSONDecodeError, yaml.YAMLError):
            continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _same_options(version_dir: Path, saved: dict[str, Any], args: list[str]) -> bool:
    config_file = version_dir / "config.yaml"
    if config_file.is_file():
        return stale_reason(args, {"config": yaml.safe_load(config_file.read_text()) or {}}) is None
    if "options" in saved:
        return saved["options"] == jsonable(configured_options(args))
    return False


def error_summary(message: str) -> str:
    """The informative part of an error, on one line: jsonargparse wraps a constructor's ``ValueError`` in a
    long "Does not validate against any of the Union subtypes" report; keep the option and the constructor's
    own messages (:func:`onestep.errors.summarize`)."""
    return summarize(message)


def _find_eval_callback(trainer):
    return next((cb for cb in trainer.callbacks if isinstance(cb, EvaluationCallback)), None)


def _timed(fn, intervals: list[tuple[float, float]]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            intervals.append((start, time.perf_counter()))
    return wrapper


def _final_samples(model, datamodule, suite: Suite, run_dir: Path) -> dict[str, Any]:
    """Draw and save the cell's final samples (raw units) for the report; returns their timing."""
    n = suite.protocol.final_samples
    if getattr(datamodule, "is_image", False):
        n = min(n, IMAGE_FINAL_SAMPLES)
    seed = int(suite.protocol.options.get("seed", 0)) + 17
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples, seconds = timed(lambda: datamodule.denormalize(model.sample_chunked(n, generator=generator))
                             .detach().float().cpu(), model.device)
    atomic_torch_save(samples, run_dir / "final_samples.pt")
    return {"n": n, "seconds": seconds, "path": "final_samples.pt"}


@torch.no_grad()
def _nfe_sweep(model, datamodule, eval_cb, suite: Suite) -> list[dict[str, Any]]:
    """Re-evaluate W2 (and FD for images) at each NFE of ``eval.nfe_sweep`` for models with ``steps``."""
    sweep = suite.protocol.nfe_sweep
    if not sweep or not isinstance(getattr(model, "steps", None), int) or isinstance(model.steps, bool):
        return []
    opts = suite.protocol.options
    n = int(opts["n_samples"])
    reference = datamodule.reference(opts.get("reference_split", "test"), n)
    spaces = {name: (extractor, extractor(reference)) for name in (getattr(eval_cb, "_spaces", None) or [])
              for extractor in [get_feature_extractor(name)]}
    options, original = MetricOptions.from_protocol(opts), model.steps
    try:
        return [_sweep_row(model, datamodule, steps, n, reference, spaces, options) for steps in sweep]
    finally:
        model.steps = original


def _sweep_row(model, datamodule, steps: int, n: int, reference, spaces, options: MetricOptions) -> dict[str, Any]:
    """One NFE of the sweep: the same noise (``options.seed``) at ``steps`` solver steps."""
    model.steps = steps
    generator = torch.Generator(device=model.device).manual_seed(options.seed)
    fake, seconds = timed(lambda: datamodule.denormalize(model.sample_chunked(n, generator=generator))
                          .detach().cpu(), model.device)
    row = {"steps": steps, "nfe": int(model.nfe), "samples_per_s": n / max(seconds, 1e-12)}
    row.update(evaluate_samples(fake, reference, None, spaces, options, groups=("w2", "fd")))
    return row


def _tag_wandb(trainer, suite: Suite, cell: Cell) -> None:
    """Tag the W&B run with the suite's method name (and base name of a grid variant), dataset and seed,
    and put them in its config as top-level keys, so that the W&B workspace groups and filters by them.
    (The run starts lazily at the first log, after this.)"""
    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict):
            tags = list(init.get("tags") or [])
            for tag in (cell.method.name, cell.method.base_name, cell.dataset, f"seed{cell.seed}"):
                if tag and tag not in tags:
                    tags.append(tag)
            init["tags"] = tags
            init["config"] = {**(init.get("config") or {}), **_cell_identity(suite, cell)}


def _cell_identity(suite: Suite, cell: Cell) -> dict[str, Any]:
    return {"suite": suite.name, "method": cell.method.name, "base_method": cell.method.base_name or cell.method.name,
            "variant": cell.method.variant, "dataset": cell.dataset, "seed": cell.seed}


def _wandb_summary(record: dict[str, Any], eval_cb) -> dict[str, Any]:
    """The cell's W&B run summary: status, and the headline metric (FD in the most semantic feature space, else W2;
    lower is better) at the end and at its best evaluation."""
    status = record["status"] if record["status"] == "ok" or record.get("error") else "interrupted"
    summary: dict[str, Any] = {"status": status}
    if record.get("error"):
        summary["error"] = record["error"][:500]
    metrics = record.get("metrics") or {}
    key = primary_metric(metrics)
    if status != "ok" or key is None:
        return summary
    summary.update({"headline_metric": key, f"final/{key}": metrics[key], "final/step": record["budget"]["used"]["steps"],
                    "nfe": record.get("nfe"), "training_seconds": record["timing"]["training_seconds"]})
    history = [(h["metrics"][f"eval/{key}"], h["step"]) for h in (eval_cb.history if eval_cb else [])
               if h["metrics"].get(f"eval/{key}") is not None]
    if history:
        summary[f"best/{key}"], summary["best/step"] = min(history)
    return summary


def _finish_wandb(trainer, suite: Suite, cell: Cell, record: dict[str, Any], eval_cb) -> None:
    """Close the cell's W&B run (so the next cell of this process gets its own), with its summary; the
    identity keys are written again because Lightning's flat hyperparameter logging overwrote ``seed``
    (the data module's own seed) after the run started."""
    if trainer is None:
        return
    try:
        finish_wandb_runs(trainer.loggers, _wandb_summary(record, eval_cb), config=_cell_identity(suite, cell),
                          failed=record["status"] != "ok")
    except Exception as err:  # noqa: BLE001 - W&B trouble must not turn a finished cell into a failure
        warnings.warn(f"{record['run_name']}: could not finish the W&B run: {err}")


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence Lightning's info chatter (GPU available, seed set, tips) during a cell."""
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    if enabled:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class _CellRun:
    """What the failure and W&B handling of :func:`run_cell` need to know about a cell in progress."""

    phase: str = "configuration"
    trainer: Any = None
    eval_cb: Any = None


def run_cell(suite: Suite, cell: Cell, out_dir: Path, wandb: dict[str, Any] | None = None,
             quiet: bool = True) -> dict[str, Any]:
    """Train and evaluate one cell; always returns a record (``status`` ``ok`` or ``failed``).

    A configuration error (including jsonargparse's ``SystemExit``) or any exception while training is
    recorded as a failure. ``KeyboardInterrupt`` (and Lightning's ``SystemExit`` after Ctrl-C during fit)
    propagates so that an interrupted suite stops instead of recording a bogus failure."""
    started = time.perf_counter()
    record = _new_record(suite, cell)
    caught: list[warnings.WarningMessage] = []
    run = _CellRun()
    try:
        with _quiet(quiet), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            _train_and_evaluate(suite, cell, out_dir, wandb, record, run)
    except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the suite goes on
        record["error"] = f"{run.phase}: {type(err).__name__}: {error_summary(str(err))}"[:1000]
        record["error_detail"] = str(err)[:4000]
        record["traceback"] = "".join(traceback.format_exc().splitlines(keepends=True)[-25:])
    finally:
        _finish_wandb(run.trainer, suite, cell, record, run.eval_cb)
    # library deprecation notices say nothing about the result; keep what does (e.g. few-sample FD)
    record["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                                 if not issubclass(w.category, (DeprecationWarning, FutureWarning))
                                 and "Deprecation" not in w.category.__name__})[:20]
    record["timing"] = {**record.get("timing", {}), "cell_seconds": time.perf_counter() - started}
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def _new_record(suite: Suite, cell: Cell) -> dict[str, Any]:
    """The record's identity, protocol, requested budget and machine; ``failed`` until the cell finishes."""
    return {
        "suite": suite.name, "method": cell.method.name, "base_method": cell.method.base_name or cell.method.name,
        "variant": cell.method.variant, "dataset": cell.dataset, "seed": cell.seed,
        "fingerprint": suite.fingerprint(cell), "run_name": cell.run_name, "protocol": suite.protocol.as_dict(),
        "budget": {"requested": {"max_steps": suite.budget.max_steps, "minutes": suite.budget.minutes}},
        "versions": package_versions(), "machine": machine_info(), "status": "failed"}


def _train_and_evaluate(suite: Suite, cell: Cell, out_dir: Path, wandb: dict[str, Any] | None,
                        record: dict[str, Any], run: _CellRun) -> None:
    """Configure, train (resuming a checkpoint of the same specification) and evaluate; fills ``record``."""
    args = cell_args(suite, cell, out_dir, wandb)
    resume = find_resume_checkpoint(out_dir / "runs" / cell.run_name, record["fingerprint"], args)
    record["command"] = "onestep fit " + shlex.join(args) + (f" --ckpt_path {resume}" if resume else "")
    record["resumed_from"] = str(resume) if resume else None
    cli = _configure(args)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    run.trainer = trainer
    record["config"] = jsonable(cli.config.as_dict())
    record["data_config"] = jsonable(cli.config.as_dict().get("data", {}))
    log_dir = Path(trainer.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "cell.json").write_text(json.dumps({"fingerprint": record["fingerprint"], "cell": cell.run_name,
                                                   "options": jsonable(configured_options(args))}))
    _tag_wandb(trainer, suite, cell)
    clock = _attach_clock(trainer, suite, cell)
    run.eval_cb = eval_cb = _find_eval_callback(trainer)
    if eval_cb is None:
        raise RuntimeError("no EvaluationCallback in the trainer: the suite's protocol cannot be applied")
    eval_cb.evaluate = _timed(eval_cb.evaluate, clock.eval_intervals)
    run.phase = "training"
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    run.phase = "evaluation"
    if (not eval_cb.history or eval_cb.history[-1]["step"] != trainer.global_step) and not eval_cb.skipped:
        # fit skipped the loop (resumed at its last step): run the final evaluation here (not when it was
        # skipped at this step for an untrained sampler: that is already said)
        eval_cb.evaluate(trainer, model, final=True)
    record.update(_results(suite, out_dir, trainer, model, datamodule, eval_cb, clock, record["budget"]))


def _configure(args: list[str]):
    """The cell's LightningCLI, built exactly as ``onestep fit`` would (``run=False``: not trained yet)."""
    buffer, argv = io.StringIO(), sys.argv
    try:  # jsonargparse reports a bad option by printing usage and raising SystemExit
        sys.argv = argv[:1]  # the cell's args are the whole command line, as with `onestep fit`
        with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(buffer):
            return run_lightning(args=args, run=False)
    except SystemExit as exit_:
        raise ValueError(f"the cell's configuration was rejected (exit {exit_.code}): "
                         f"{buffer.getvalue().strip()[-2000:]}") from None
    finally:
        sys.argv = argv


def _attach_clock(trainer, suite: Suite, cell: Cell) -> CellClock:
    """The cell's training clock (and wall-clock budget) and its progress line, added to the trainer."""
    clock, budget = CellClock(suite.budget.seconds), suite.budget.seconds
    time_left = (lambda: budget - clock.training_seconds(time.perf_counter())) if budget else None
    trainer.callbacks += [clock, HeartbeatCallback(cell.run_name, HEARTBEAT_SECONDS, time_left=time_left)]
    return clock


def _results(suite: Suite, out_dir: Path, trainer, model, datamodule, eval_cb, clock: CellClock,
             budget: dict[str, Any]) -> dict[str, Any]:
    """The finished cell's part of the record: metrics, NFE sweep, final samples, timing, budget used."""
    run_dir = Path(trainer.log_dir)
    if eval_cb.final_metrics is None:  # e.g. the budget ended before a staged model's sampling stage
        raise RuntimeError(eval_cb.skipped or "the run has no final evaluation")
    metrics = {k.removeprefix("eval/"): v for k, v in eval_cb.final_metrics.items()}
    sampling = _final_samples(model, datamodule, suite, run_dir)
    sweep = _nfe_sweep(model, datamodule, eval_cb, suite)
    max_steps = trainer.max_steps
    stopped_by = ("minutes" if clock.stopped_by_time else
                  "max_steps" if max_steps and max_steps > 0 and trainer.global_step >= max_steps else "other")
    sps = metrics.get("samples_per_s")
    return {
        "status": "ok", "metrics": metrics, "nfe": getattr(model, "nfe", None), "nfe_sweep": sweep,
        "protocol": {**suite.protocol.as_dict(), **(getattr(eval_cb, "final_protocol", None) or {})},
        "run_dir": os.path.relpath(run_dir, out_dir),
        "final_samples": {**sampling, "path": os.path.relpath(run_dir / sampling["path"], out_dir)},
        "timing": {"training_seconds": clock.training_seconds(), "eval_seconds": clock.eval_seconds(),
                   "sampling_samples_per_s": sps,
                   "sampling_seconds": (suite.protocol.options["n_samples"] / sps) if sps else None},
        "budget": {**budget, "used": {
            "steps": int(trainer.global_step), "seconds": clock.training_seconds(), "stopped_by": stopped_by,
            "max_steps_effective": max_steps}},
    }
