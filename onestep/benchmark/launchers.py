"""Where the cells of ``onestep benchmark`` run: one interface, three launchers.

A launcher takes the planned cells (:class:`CellPlan`) and runs each one; every record reaches
``results.jsonl`` (appended under its lock, :func:`onestep.benchmark.records.append_record`, by whichever
process ran the cell) and is handed back through ``on_record(cell, record, seconds)`` (``record`` None:
the cell was stopped by a signal and left to resume). ``stop["signal"]`` is set by the runner's SIGTERM
handler; a launcher starts no new cell once it is set.

* :class:`InProcessLauncher` (``--launcher local``, ``--jobs 1``): the cells one after another in this process;
* :class:`PoolLauncher` (``--launcher local --jobs N``): worker processes on this machine
  (:mod:`onestep.benchmark.parallel`);
* :class:`SubmititLauncher` (``--launcher slurm`` / ``submitit_local``): each cell is one task of a submitit
  job array (:mod:`onestep.benchmark.cluster`), on SLURM or as local processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from onestep.benchmark.cell import run_cell
from onestep.benchmark.parallel import run_cells_in_workers
from onestep.benchmark.records import RESULTS_FILE, append_record
from onestep.benchmark.resources import ClusterResources
from onestep.benchmark.suite import Cell, Suite

LAUNCHERS = ("local", "slurm", "submitit_local")
OnRecord = Callable[[Cell, "dict[str, Any] | None", float], None]


@dataclass
class CellPlan:
    """The cells to run and how: everything a launcher needs, nothing about progress or reporting."""

    suite: Suite
    cells: list[Cell]
    out_dir: Path
    wandb: dict[str, Any] | None = None
    threads: int | None = None
    quiet: bool = True
    log: Callable[..., None] = print

    @property
    def wandb_project(self) -> str | None:
        return self.wandb.get("project", "onestep") if self.wandb else None


class Launcher(Protocol):
    #: the cell running in this process right now (named when Ctrl-C interrupts it), if any
    current: Cell | None
    #: parallel cells, for the time-left estimate
    width: int

    def run(self, plan: CellPlan, stop: dict[str, int | None], on_record: OnRecord) -> None: ...


class InProcessLauncher:
    """The cells in suite order in this process; each record is appended as soon as the cell ends."""

    width = 1

    def __init__(self) -> None:
        self.current: Cell | None = None

    def run(self, plan: CellPlan, stop: dict[str, int | None], on_record: OnRecord) -> None:
        for cell in plan.cells:
            self.current = cell
            start = time.perf_counter()
            record = run_cell(plan.suite, cell, plan.out_dir, wandb=plan.wandb, quiet=plan.quiet)
            append_record(plan.out_dir / RESULTS_FILE, record)
            on_record(cell, record, time.perf_counter() - start)
            if stop["signal"] is not None:  # SIGTERM: this cell's record is written, start no other
                return


class PoolLauncher:
    """Up to ``jobs`` cells at once, each in a fresh worker process that appends its own record."""

    current = None

    def __init__(self, jobs: int) -> None:
        self.width = jobs

    def run(self, plan: CellPlan, stop: dict[str, int | None], on_record: OnRecord) -> None:
        if not plan.suite.path:
            raise ValueError("--jobs > 1 needs a suite loaded from a file (the workers read it)")
        run_cells_in_workers(plan.suite, plan.suite.path, plan.cells, plan.out_dir, self.width, plan.threads,
                             plan.wandb_project, stop, on_record)


def make_launcher(name: str, jobs: int = 1, resources: ClusterResources | None = None) -> Launcher:
    """The launcher called ``name`` (one of :data:`LAUNCHERS`); ``ValueError`` for an unknown one, and
    ``ImportError`` naming ``pip install onestep[cluster]`` when submitit is missing."""
    if name == "local":
        return InProcessLauncher() if jobs <= 1 else PoolLauncher(jobs)
    if name in ("slurm", "submitit_local"):
        from onestep.benchmark.cluster import SubmititLauncher  # submitit is optional: only imported here

        return SubmititLauncher("slurm" if name == "slurm" else "local", resources or ClusterResources())
    raise ValueError(f"--launcher {name!r} is not known; use one of {', '.join(LAUNCHERS)}")
