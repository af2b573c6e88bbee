"""``onestep benchmark --suite <yaml> --out <dir>``: every cell of a suite, resumable, then the report.

Output directory::

    <out>/results.jsonl        one line per finished (or failed) cell, appended atomically
    <out>/suite.yaml           the resolved suite;  <out>/run_info.json  every invocation (argv, date, machine)
    <out>/runs/<method>-<dataset>-s<seed>/version_<k>/   the cell's Lightning run (eval.jsonl, checkpoints,
                               config.yaml, final_samples.pt)
    <out>/report.md, report.html, figures/, floors.json    written by ``onestep report``

Rerunning the same command skips every cell whose last record is ``ok`` under the same specification
(fingerprint of method, dataset, seed, budget, protocol and overrides), retries failed cells, and resumes a
cell that was interrupted during training from its ``last.ckpt``. A failing cell is recorded with its error
and traceback tail and the suite goes on. Ctrl-C checkpoints the cell in training (a second Ctrl-C stops at
once), prints which cells finished and which are left and the command that resumes them, and exits with 130.

This module plans (which cells are left), dispatches them to a launcher and reports; where the cells run
is the launcher's business (:mod:`onestep.benchmark.launchers`): this process, ``--jobs N`` worker
processes, or ``--launcher slurm`` / ``submitit_local`` job arrays (:mod:`onestep.benchmark.cluster`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from onestep.benchmark.cell import cell_args, cell_stale_reason
from onestep.benchmark.launchers import LAUNCHERS, CellPlan, Launcher, make_launcher
from onestep.benchmark.reuse import reusable_records, reuse_cells
from onestep.benchmark.records import (RESULTS_FILE, describe_machine_short, latest_by_cell, machine_info,
                                       package_versions, read_records)
from onestep.benchmark.resources import add_command_line_options, command_line_options, with_command_line
from onestep.benchmark.report import write_report
from onestep.benchmark.suite import Cell, Suite, load_suite
from onestep.benchmark.tables import primary_metric
from onestep.callbacks.fault import Interrupted
from onestep.files import atomic_write_json
from onestep.generators import OneStepGenerator


class SuiteInterrupted(Exception):
    """The suite was stopped by Ctrl-C; the summary has been logged, the resume command is the caller's."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def require_wandb() -> None:
    """Fail before any training when W&B logging is requested but cannot work."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ImportError("--wandb was given but wandb is not installed: pip install wandb  "
                          "(or pip install 'onestep[wandb]'); runs stay offline unless a W&B key is configured") from err


def check_class_path(method) -> None:
    """Refuse a ``class_path`` method whose class cannot be imported or is not a generator (``--dry-run``
    reports it; a run records the cell as failed with the same reason)."""
    if method.class_path is None:
        return
    module_name, _, class_name = method.class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method {method.name!r}: class_path {method.class_path!r} cannot be imported ({err}); "
                         "give module.Class of an importable module (on PYTHONPATH)") from None
    if not (isinstance(cls, type) and issubclass(cls, OneStepGenerator)):
        raise ValueError(f"method {method.name!r}: class_path {method.class_path!r} is not a OneStepGenerator "
                         "subclass; give module.Class of a generator (see docs/contracts.md)")


def finished_cells(out_dir: Path, suite: Suite, stale: dict[str, str] | None = None) -> set[tuple[str, str, int]]:
    """Cells whose latest record is ``ok`` and was produced under the current specification: the same
    fingerprint and, option by option, the same config files' values (:mod:`onestep.benchmark.staleness`).
    A finished cell that fails the second test goes into ``stale`` (run name -> why) and is run again."""
    latest = latest_by_cell(read_records(out_dir / RESULTS_FILE))
    done = set()
    for cell in suite.cells():
        record = latest.get(cell.key)
        if record and record.get("status") == "ok" and record.get("fingerprint") == suite.fingerprint(cell):
            reason = cell_stale_reason(suite, cell, out_dir, record)
            if reason is None:
                done.add(cell.key)
            elif stale is not None:
                stale[cell.run_name] = reason
    return done


def record_invocation(out_dir: Path, suite: Suite, argv: list[str]) -> None:
    """Keep the resolved suite and every invocation (argv, date, machine, versions) next to the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite.yaml").write_text(yaml.safe_dump(suite.as_dict(), sort_keys=False))
    info_path = out_dir / "run_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        info = {"invocations": []}
    info["suite"] = suite.name
    info["invocations"].append({"argv": ["onestep", "benchmark", *argv], "cwd": os.getcwd(),
                                "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                "machine": machine_info(), "versions": package_versions()})
    atomic_write_json(info_path, info)


def select_cells(suite: Suite, methods: list[str] | None, datasets: list[str] | None,
                 seeds: list[int] | None) -> list[Cell]:
    cells = suite.cells()
    for label, chosen, pick in (("method", methods, lambda c: c.method.name), ("dataset", datasets, lambda c: c.dataset),
                                ("seed", seeds, lambda c: c.seed)):
        if chosen:
            known = {pick(c) for c in cells}
            unknown = [x for x in chosen if x not in known]
            if unknown:
                raise ValueError(f"--{label}s {unknown} not in the suite; it has {sorted(known, key=str)}")
            cells = [c for c in cells if pick(c) in chosen]
    return cells


def estimate_left(remaining: list[Cell], durations: dict[str, list[float]]) -> float:
    """Seconds left: each remaining cell costs the mean of its method's finished cells (methods differ by
    orders of magnitude), or the mean over all finished cells for a method not seen yet."""
    everything = [d for ds in durations.values() for d in ds]
    overall = sum(everything) / len(everything) if everything else 0.0
    return sum(sum(durations[c.method.name]) / len(durations[c.method.name]) if durations.get(c.method.name)
               else overall for c in remaining)


def run_suite(suite: Suite, out_dir: str | os.PathLike, wandb: dict[str, Any] | None = None,
              cells: list[Cell] | None = None, quiet: bool = True, log=print, jobs: int = 1,
              threads: int | None = None, launcher: Launcher | None = None,
              reuse: list[Path] | None = None) -> list[dict[str, Any]]:
    """Plan (the unfinished cells, in suite order; those a ``reuse`` folder finished under the same
    specification are copied, :mod:`onestep.benchmark.reuse`), dispatch them to ``launcher`` (default: this
    process, or ``jobs`` local worker processes, :mod:`onestep.benchmark.launchers`) and report one line per
    record as it comes back; returns the records of this invocation."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = suite.cells() if cells is None else cells
    stale: dict[str, str] = {}
    done = finished_cells(out_dir, suite, stale)
    todo = [c for c in cells if c.key not in done]
    for name in [c.run_name for c in todo if c.run_name in stale]:
        log(f"{name}: run again: {stale[name]}", flush=True)
    left = reuse_cells(suite, todo, out_dir, reuse or [], log)
    reused = f", {len(todo) - len(left)} reused" if reuse else ""
    log(f"onestep benchmark: suite {suite.name!r}: {len(cells)} cells ({len(cells) - len(todo)} already finished"
        f"{reused}, {len(left)} to run) -> {out_dir}  [{describe_machine_short(machine_info())}]")
    todo = left
    launcher = launcher if launcher is not None else make_launcher("local", jobs)
    plan = CellPlan(suite, todo, out_dir, wandb, threads, quiet, log)
    start, durations, records = time.perf_counter(), {}, []
    finished: set[tuple[str, str, int]] = set()

    def report(cell: Cell, record: dict[str, Any] | None, seconds: float) -> None:
        finished.add(cell.key)
        if record is None:
            log(f"{cell.run_name}: interrupted, its last.ckpt is kept (rerun to resume)", flush=True)
            return
        records.append(record)
        _log_cell(log, len(records), len(todo), cell, record, seconds, start, durations,
                  [c for c in todo if c.key not in finished], launcher.width)

    stop, previous = _install_stop_handler()
    try:
        launcher.run(plan, stop, report)
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C: in training the cell's last.ckpt was written first
        stop["signal"] = signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failed = sum(r["status"] != "ok" for r in records)
    log(f"onestep benchmark: {len(records) - failed} ok, {failed} failed in {_duration(time.perf_counter() - start)}"
        + (f"; stopped by {signal.Signals(stop['signal']).name} with {len(todo) - len(records)} cells left "
           "(rerun the same command to continue)" if stop["signal"] else ""))
    if stop["signal"] == signal.SIGINT:
        ran = {(r["method"], r["dataset"], r["seed"]) for r in records}
        left = [c.run_name for c in todo if c.key not in ran]
        current = launcher.current
        if current is not None and current.key not in ran:
            log(f"onestep benchmark: interrupted in {current.run_name}; a checkpoint written then is resumed")
        log("onestep benchmark: finished now: " + (", ".join(f"{r['run_name']} ({r['status']})" for r in records)
                                                     or "none"))
        log(f"onestep benchmark: left: {', '.join(left[:12])}" + (f" and {len(left) - 12} more" if len(left) > 12 else ""))
        raise SuiteInterrupted()
    return records


def _install_stop_handler() -> tuple[dict[str, int | None], Any]:
    """SIGTERM between or during cells: finish the current cell's record, then stop the suite.

    Lightning and the preemption callback install their own SIGTERM handlers while training (a signal
    there checkpoints and ends the cell); Lightning's handler also calls a previously installed Python
    handler, so this flag sees the signal in every phase and no SIGTERM is silently swallowed."""
    stop: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        return stop, None

    def handler(signum, frame) -> None:
        stop["signal"] = signum

    return stop, signal.signal(signal.SIGTERM, handler)


def _log_cell(log, i: int, total: int, cell: Cell, record: dict[str, Any], seconds: float, start: float,
              durations: dict[str, list[float]], remaining: list[Cell], jobs: int = 1) -> None:
    """One progress line: the cell's result, its wall clock, the suite's elapsed time and the time left
    (the remaining cells at their method's mean cost, divided among the workers)."""
    durations.setdefault(cell.method.name, []).append(seconds)
    elapsed = time.perf_counter() - start
    left = estimate_left(remaining, durations) / max(1, min(jobs, len(remaining)))
    if record["status"] == "ok":
        m = record["metrics"]
        key = primary_metric(m)
        quality = f"{key}={m[key]:.4g}" if key is not None and m.get(key) is not None else ""
        used = record["budget"]["used"]
        what = f"ok {quality} nfe={record.get('nfe')} steps={used['steps']} train={used['seconds']:.1f}s"
    else:
        what = "FAILED " + " ".join(record.get("error", "").split())  # the whole reason, on one line
    log(f"[{i}/{total}] {cell.run_name}: {what} | cell {_duration(seconds)}, elapsed {_duration(elapsed)}, "
        f"left ~{_duration(left)}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onestep benchmark", description="Train and evaluate every method x dataset x seed of a suite "
        "under one budget and protocol; resumable; writes results.jsonl and the report.")
    parser.add_argument("--suite", required=True, help="suite YAML (see configs/suites/ and onestep.benchmark.suite)")
    parser.add_argument("--out", default=None, help="output directory (default: results/<suite name>)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    parser.add_argument("--datasets", nargs="+", default=None, help="run only these datasets")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their fit commands, run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--wandb", action="store_true", help="log every cell to W&B (grouped by suite) and the "
                        "report to a summary run; offline unless a key is configured")
    parser.add_argument("--wandb_project", default="onestep")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the suite's "
                        "threads, else torch's choice; 1 avoids oversubscription on a shared machine); recorded")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's info messages")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process (on GPUs: "
                        "worker k uses GPU k mod count); combine with --threads so jobs x threads <= cores")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local", help="where cells run: local (this "
                        "machine, --jobs at once), slurm (each cell one task of a SLURM job array through submitit; "
                        "resources from the suite's resources: and --slurm.*), submitit_local (the same through "
                        "submitit's local executor, every cell at once); slurm needs pip install onestep[cluster]")
    parser.add_argument("--reuse", nargs="+", type=Path, default=None, metavar="DIR", help="copy the cells that "
                        "these output folders finished under the same specification (e.g. a tuning suite's grid "
                        "variant that this suite adopts) instead of training them; the record says where from")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one cell, for --jobs
    add_command_line_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        suite = load_suite(args.suite)
        cells = select_cells(suite, args.methods, args.datasets, args.seeds)
        if args.wandb:
            require_wandb()
        if args.launcher != "local" and args.jobs != 1:
            raise ValueError(f"--jobs applies to --launcher local; with --launcher {args.launcher} every cell is its "
                             "own task (limit how many run at once with --slurm.parallelism)")
        given = [f"--slurm.{key}" for key, value in command_line_options(args).items() if value is not None]
        if args.launcher == "local" and given:
            raise ValueError(f"{', '.join(given)} apply to --launcher slurm or submitit_local, not to local cells")
        resources = with_command_line(suite.resources, command_line_options(args))
        launcher = None if args.dry_run else make_launcher(args.launcher, args.jobs, resources)
        reusable = reusable_records(args.reuse) if args.reuse else {}
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"onestep benchmark: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path("results") / suite.name)
    wandb = {"project": args.wandb_project} if args.wandb else None
    if args.jobs < 1:
        print(f"onestep benchmark: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.dry_run:
        stale: dict[str, str] = {}
        done, doomed = finished_cells(out_dir, suite, stale), 0
        for cell in cells:
            try:
                check_class_path(cell.method)
                command = "onestep fit " + shlex.join(cell_args(suite, cell, out_dir, wandb))
            except (FileNotFoundError, ValueError) as err:
                command, doomed = f"(will fail: {err})", doomed + 1
            hit = reusable.get(suite.fingerprint(cell))
            reuse = hit is not None and cell_stale_reason(suite, cell, out_dir, hit[1]) is None
            state = "done" if cell.key in done else "reuse" if reuse else "todo"
            why = f" (run again: {stale[cell.run_name]})" if cell.run_name in stale else ""
            print(f"{state}  {cell.run_name}{why}: {command}")
        if args.launcher != "local":
            from onestep.benchmark.cluster import executor_parameters

            cluster = "slurm" if args.launcher == "slurm" else "local"
            print(f"launcher {args.launcher}: each cell one task with "
                  f"{executor_parameters(cluster, resources, f'onestep-{suite.name}')}")
        if doomed:
            print(f"onestep benchmark: error: {doomed} of {len(cells)} cells will fail (see 'will fail' above); "
                  "fix the suite before running it", file=sys.stderr)
        return 1 if doomed else 0
    threads = args.threads if args.threads is not None else suite.threads
    if threads is not None:
        if threads < 1:
            print(f"onestep benchmark: error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    if args.worker:  # a cell of a parallel run: the parent records the invocation and writes the report
        try:
            run_suite(suite, out_dir, wandb=wandb, cells=cells, quiet=not args.verbose, log=lambda *a, **k: None)
        except SuiteInterrupted:
            return 130
        return 0
    record_invocation(out_dir, suite, argv)
    try:
        records = run_suite(suite, out_dir, wandb=wandb, cells=cells, quiet=not args.verbose, threads=threads,
                            launcher=launcher, reuse=args.reuse)
    except SuiteInterrupted:
        print(f"onestep benchmark: results so far are in {out_dir / RESULTS_FILE}; resume with: onestep "
              f"{shlex.join(['benchmark', *argv])}  (`onestep report {out_dir}` reports the finished cells)",
              flush=True)
        return 130
    if not args.no_report:
        paths = write_report(out_dir, wandb=wandb)
        print(f"onestep benchmark: report {paths['md']} and {paths['html']}")
    failed = [r["run_name"] for r in records if r.get("status") != "ok"]
    if failed:  # a script or CI must see that the suite is incomplete
        print(f"onestep benchmark: error: {len(failed)} cell(s) failed: {', '.join(failed)}; their errors are in "
              f"{out_dir / RESULTS_FILE}; fix them and rerun the same command (finished cells are kept)",
              file=sys.stderr)
        return 1
    return 0
