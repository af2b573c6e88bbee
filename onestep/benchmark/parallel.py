"""``onestep benchmark --jobs N``: cells run in up to N worker processes at once.

Each cell runs in a fresh process (``onestep benchmark --worker`` restricted to that one cell), which
appends its own record to ``results.jsonl`` with a single ``O_APPEND`` write under the file's lock
(:func:`onestep.benchmark.records.append_record`), so concurrent workers never tear or interleave lines. The parent hands out cells in suite order, prints one progress line per finished cell, and records a failure itself when a
worker dies without writing one (killed, out of memory). On a machine with GPUs, worker slot ``k`` sees
only GPU ``k mod count`` (``CUDA_VISIBLE_DEVICES``). A worker's output goes to ``<out>/logs/<cell>.log``.

SIGTERM to the parent stops handing out cells and forwards the signal to the running workers, which
checkpoint and end their cell as in a serial run; rerunning the command resumes them. Ctrl-C reaches the
workers from the terminal (one process group); the parent then stops handing out cells and sends them
SIGTERM too (not a second SIGINT, which would stop them without a checkpoint); a second Ctrl-C kills them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from onestep.benchmark.records import RESULTS_FILE, append_record, read_records
from onestep.benchmark.suite import Cell, Suite

POLL_SECONDS = 0.2


def slot_environment(slot: int) -> dict[str, str]:
    """Environment of worker slot ``slot``: one GPU per slot when GPUs exist, one OpenMP thread pool."""
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
    return env


def worker_command(suite_path: str, out_dir: Path, cell: Cell, threads: int | None,
                   wandb_project: str | None) -> list[str]:
    command = [sys.executable, "-m", "onestep.cli", "benchmark", "--suite", suite_path, "--out", str(out_dir),
               "--methods", cell.method.name, "--datasets", cell.dataset, "--seeds", str(cell.seed),
               "--no-report", "--worker"]
    if threads is not None:
        command += ["--threads", str(threads)]
    if wandb_project is not None:
        command += ["--wandb", "--wandb_project", wandb_project]
    return command


def _records_of(out_dir: Path, cell: Cell) -> list[dict[str, Any]]:
    return [r for r in read_records(out_dir / RESULTS_FILE) if (r.get("method"), r.get("dataset"), r.get("seed"))
            == (cell.method.name, cell.dataset, cell.seed)]


def _lost_worker_record(suite: Suite, cell: Cell, code: int, log_path: Path) -> dict[str, Any]:
    try:
        tail = log_path.read_text(errors="replace")[-2000:]
    except OSError:
        tail = ""
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return {"suite": suite.name, "method": cell.method.name, "base_method": cell.method.base_name or cell.method.name,
            "variant": cell.method.variant, "dataset": cell.dataset, "seed": cell.seed,
            "fingerprint": suite.fingerprint(cell), "run_name": cell.run_name, "protocol": suite.protocol.as_dict(),
            "status": "failed", "phase": "worker",
            "error": f"the worker process ended ({how}) without writing a record; its log: {log_path}\n{tail}"}


def run_cells_in_workers(suite: Suite, suite_path: str, todo: list[Cell], out_dir: Path, jobs: int,
                         threads: int | None, wandb_project: str | None, stop: dict[str, int | None],
                         on_record: Callable[[Cell, dict[str, Any], float], None]) -> None:
    """Run ``todo`` with at most ``jobs`` workers; ``on_record(cell, record, seconds)`` after each cell
    (``record`` None: the cell was interrupted by the forwarded signal and left to resume)."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[Cell, int, float, Path, int]] = {}
    free = list(range(jobs))
    forwarded = False
    try:
        while running or (pending and stop["signal"] is None):
            while pending and free and stop["signal"] is None:
                cell, slot = pending.pop(0), free.pop(0)
                log_path = logs / f"{cell.run_name}.log"
                with open(log_path, "ab") as log:
                    proc = subprocess.Popen(worker_command(suite_path, out_dir, cell, threads, wandb_project),
                                            stdout=log, stderr=subprocess.STDOUT, env=slot_environment(slot))
                running[proc] = (cell, slot, time.perf_counter(), log_path, len(_records_of(out_dir, cell)))
            if stop["signal"] is not None and not forwarded:
                for proc in running:
                    proc.send_signal(signal.SIGTERM if stop["signal"] == signal.SIGINT else stop["signal"])
                forwarded = True
            try:
                time.sleep(POLL_SECONDS)
            except KeyboardInterrupt:
                if stop["signal"] == signal.SIGINT:
                    raise  # Ctrl-C twice: leave now (the workers are killed below)
                stop["signal"] = signal.SIGINT
                continue
            for proc in [p for p in running if p.poll() is not None]:
                cell, slot, started, log_path, before = running.pop(proc)
                free.append(slot)
                records = _records_of(out_dir, cell)
                record = records[-1] if len(records) > before else None  # the worker's own record
                # stopped by the forwarded signal: last.ckpt kept, a rerun resumes the cell. 130: after Ctrl-C;
                # -SIGTERM: the signal reached a worker still starting, before its handler was installed
                if record is None and forwarded and proc.returncode in (0, 130, -signal.SIGTERM):
                    record = None
                elif record is None:
                    record = _lost_worker_record(suite, cell, proc.returncode, log_path)
                    append_record(out_dir / RESULTS_FILE, record)
                on_record(cell, record, time.perf_counter() - started)
    finally:
        for proc in running:  # the parent is leaving (an exception): do not leave orphans training
            proc.kill()
