"""``onestep benchmark --launcher slurm`` (and ``submitit_local``): every cell one task of a submitit job array.

Each task (:class:`CellTask`, pickled by submitit) runs its cell exactly as the local launcher does
(:func:`onestep.benchmark.cell.run_cell`, resuming the newest ``last.ckpt`` written under the same
fingerprint), appends its record to the shared ``results.jsonl`` under the file's lock and returns it;
the submitting process waits for the array, prints one progress line per cell and records a failure
itself for a task that ended without a record (killed, out of memory, cancelled).

Preemption and time limits. submitit is told to use SIGUSR1 as its preemption signal
(``SUBMITIT_PREEMPT_SIGNAL=USR1``, set before submitit is imported and inherited by the jobs): SLURM
sends it ``signal_delay_s`` before the time limit (``#SBATCH --signal=USR1@...``), and SIGTERM comes on
preemption. During training both reach the cell's own :class:`~onestep.callbacks.fault.PreemptionCheckpoint`,
which writes ``last.ckpt`` between two batches and ends the cell with ``Preempted``; the task then
raises SIGUSR1 again, now handled by submitit, which calls :meth:`CellTask.checkpoint` (the same cell
again) and requeues the task; the next attempt resumes from that ``last.ckpt``. Outside training
(configuration, final evaluation) submitit's handler requeues at once and the cell resumes from its
newest periodic checkpoint. ``resources.max_requeues`` bounds the requeues after a time limit.

The jobs' logs and submitit's pickles are in ``<out>/submitit/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from onestep.benchmark.cell import run_cell
from onestep.benchmark.records import RESULTS_FILE, append_record
from onestep.benchmark.resources import ClusterResources
from onestep.benchmark.suite import Cell, Suite, import_suite_modules
from onestep.callbacks.fault import Preempted

PREEMPT_SIGNAL = signal.SIGUSR1  # handled by PreemptionCheckpoint during training
POLL_SECONDS = 1.0
INSTALL_HINT = "pip install onestep[cluster]  (or pip install submitit)"


def require_submitit():
    """Import submitit with SIGUSR1 as its preemption signal; one clear line when it is missing."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL.name.removeprefix("SIG")  # the jobs inherit it
    try:
        import submitit
    except ImportError:
        raise ImportError(f"--launcher slurm and submitit_local need submitit, which is not installed: "
                          f"{INSTALL_HINT}") from None
    # imported earlier in this process with another signal: the class attribute is what submitit reads
    submitit.JobEnvironment.USR_SIG = os.environ["SUBMITIT_PREEMPT_SIGNAL"]
    return submitit


class CellTask:
    """One cell in a submitit job: run it, append its record, return it; requeued when preempted."""

    def __init__(self, suite: Suite, out_dir: Path, wandb: dict[str, Any] | None, threads: int | None,
                 quiet: bool) -> None:
        self.suite, self.out_dir, self.wandb, self.threads, self.quiet = suite, Path(out_dir), wandb, threads, quiet

    def __call__(self, cell: Cell) -> dict[str, Any]:
        # a fresh process: the suite's imports (user datasets in the registries) are not loaded by unpickling
        import_suite_modules(list(self.suite.imports))
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        try:
            record = run_cell(self.suite, cell, self.out_dir, wandb=self.wandb, quiet=self.quiet)
        except Preempted:  # last.ckpt is written; submitit's handler of the signal requeues this task
            if callable(signal.getsignal(PREEMPT_SIGNAL)):  # outside a submitit job: just end, resumable
                signal.raise_signal(PREEMPT_SIGNAL)  # checkpoint() + requeue + exit
            raise
        append_record(self.out_dir / RESULTS_FILE, record)
        return record

    def checkpoint(self, cell: Cell):
        """What submitit requeues: the same cell, which resumes from its ``last.ckpt``."""
        return require_submitit().helpers.DelayedSubmission(self, cell)


def executor_parameters(cluster: str, resources: ClusterResources, name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keyword arguments of a cell: one task on one node."""
    params: dict[str, Any] = {"name": name, "nodes": 1, "tasks_per_node": 1, "timeout_min": resources.time_min,
                              "gpus_per_node": resources.gpus}
    if resources.cpus is not None:
        params["cpus_per_task"] = resources.cpus
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = resources.signal_delay_s
        if resources.mem_gb is not None:
            params["mem_gb"] = resources.mem_gb
        for key in ("partition", "account"):
            if getattr(resources, key) is not None:
                params[f"slurm_{key}"] = getattr(resources, key)
        if resources.parallelism is not None:
            params["slurm_array_parallelism"] = resources.parallelism
        if resources.setup:
            params["slurm_setup"] = list(resources.setup)
        if resources.slurm:
            params["slurm_additional_parameters"] = dict(resources.slurm)
    else:  # submitit's local executor signals at its own delay (30 s before time_min)
        if resources.setup:
            params["local_setup"] = list(resources.setup)
    return params


def make_executor(cluster: str, resources: ClusterResources, folder: Path, name: str):
    submitit = require_submitit()
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     **{f"{cluster}_max_num_timeout": resources.max_requeues})
    executor.update_parameters(**executor_parameters(cluster, resources, name))
    return executor


def lost_task_record(suite: Suite, cell: Cell, job, error: BaseException) -> dict[str, Any]:
    """The record of a task that ended without writing one."""
    return {"suite": suite.name, "method": cell.method.name, "base_method": cell.method.base_name or cell.method.name,
            "variant": cell.method.variant, "dataset": cell.dataset, "seed": cell.seed,
            "fingerprint": suite.fingerprint(cell), "run_name": cell.run_name, "protocol": suite.protocol.as_dict(),
            "status": "failed", "phase": "job",
            "error": f"submitit job {job.job_id} ({job.state}) ended without a record: {type(error).__name__}: "
                     f"{str(error)[-1500:]}; its log: {job.paths.stderr}"}


class SubmititLauncher:
    """The cells as one job array (``cluster`` ``slurm``, or ``local``: processes on this machine, all
    cells at once); waits for every task."""

    current = None

    def __init__(self, cluster: str, resources: ClusterResources) -> None:
        require_submitit()
        if cluster == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
            raise ValueError("--launcher slurm: sbatch/srun are not on PATH; run onestep benchmark on a SLURM login "
                             "node (or --launcher submitit_local to run the cells here as submitit jobs)")
        self.cluster, self.resources = cluster, resources
        self.width = resources.parallelism or 1_000_000

    def run(self, plan, stop: dict[str, int | None], on_record) -> None:
        """``plan``: a :class:`onestep.benchmark.launchers.CellPlan`."""
        if not plan.cells:
            return
        self.width = min(self.width, len(plan.cells))
        folder = plan.out_dir / "submitit"
        executor = make_executor(self.cluster, self.resources, folder, f"onestep-{plan.suite.name}")
        task = CellTask(plan.suite, plan.out_dir, plan.wandb, plan.threads, plan.quiet)
        jobs = executor.map_array(task, plan.cells)
        started = time.perf_counter()
        plan.log(f"onestep benchmark: submitted {len(jobs)} cells as {self.cluster} job array "
              f"{jobs[0].job_id.split('_')[0]}; logs in {folder}", flush=True)
        pending = dict(zip(jobs, plan.cells))
        try:
            while pending and stop["signal"] is None:
                for job in [j for j in pending if j.done()]:
                    cell = pending.pop(job)
                    try:
                        record = job.result()
                    except Exception as err:  # noqa: BLE001 - killed, cancelled, out of requeues: recorded
                        record = lost_task_record(plan.suite, cell, job, err)
                        append_record(plan.out_dir / RESULTS_FILE, record)
                    on_record(cell, record, time.perf_counter() - started)
                if pending:
                    time.sleep(POLL_SECONDS)
        finally:
            self._leave(pending, plan.log)

    def _leave(self, pending: dict, log) -> None:
        """Stopped (SIGTERM, Ctrl-C) with tasks still running: on SLURM they go on (a later rerun skips the
        cells they finish); local tasks are children of this session and are cancelled (they resume from
        their newest checkpoint on a rerun)."""
        if not pending:
            return
        if self.cluster == "slurm":
            log(f"onestep benchmark: {len(pending)} SLURM tasks keep running "
                  f"({', '.join(job.job_id for job in pending)}); `scancel` them to stop them", flush=True)
            return
        for job in pending:
            job.cancel(check=False)
