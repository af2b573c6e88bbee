"""Benchmark suites (methods x datasets x seeds under one protocol), the resumable runner and the report.

* :mod:`onestep.benchmark.suite`: the suite YAML format (typed, validated) and its cells;
* :mod:`onestep.benchmark.cell` / :mod:`onestep.benchmark.runner`: ``onestep benchmark``; where the cells
  run: :mod:`onestep.benchmark.launchers` (this process, local workers, :mod:`onestep.benchmark.cluster`:
  submitit job arrays on SLURM), with :mod:`onestep.benchmark.resources` (what a cell asks of a cluster);
* :mod:`onestep.benchmark.records`: the atomic ``results.jsonl`` and machine/version descriptions;
* :mod:`onestep.benchmark.floor`, :mod:`~onestep.benchmark.tables`, :mod:`~onestep.benchmark.figures`,
  :mod:`onestep.benchmark.report`: ``onestep report``.
"""
from onestep.benchmark.records import append_record, latest_by_cell, read_records
from onestep.benchmark.suite import Budget, Cell, MethodSpec, Protocol, Suite, load_suite, suite_from_dict

__all__ = ["Budget", "Cell", "MethodSpec", "Protocol", "Suite", "load_suite", "suite_from_dict", "append_record",
           "read_records", "latest_by_cell", "run_suite", "write_report"]


def __getattr__(name: str):  # the runner and report import Lightning and matplotlib: load them on use
    if name == "run_suite":
        from onestep.benchmark.runner import run_suite
        return run_suite
    if name == "write_report":
        from onestep.benchmark.report import write_report
        return write_report
    raise AttributeError(name)
