"""``onestep benchmark --reuse DIR``: take a finished cell from another suite's results instead of training it.

A tuning suite (grid variants of a suite's cells) and the suite that adopts the winning setting describe the
same cell twice: same method configuration and overrides, dataset, seed, budget, protocol and data options,
so the same fingerprint (:meth:`onestep.benchmark.suite.Suite.fingerprint`, which leaves out the method's
*name*). A cell of this suite whose fingerprint matches a finished (``ok``) record in a ``--reuse`` folder is
not trained again: its run folder (checkpoints, ``eval.jsonl``, ``final_samples.pt``) is copied under this
suite's run name and its record appended with this suite's method name and ``reused_from`` (the folder and
the run it came from). Every measurement is the original's; nothing is recomputed, so nothing can differ but
the names. A record whose run folder is gone, or whose config values differ from what this cell's config
files say now (:mod:`onestep.benchmark.staleness`), is not reused (the cell is trained).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from onestep.benchmark.cell import cell_stale_reason
from onestep.benchmark.records import RESULTS_FILE, append_record, latest_by_cell, read_records
from onestep.benchmark.suite import Cell, Suite


def reusable_records(sources: list[Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """fingerprint -> (folder, record) of every finished cell in ``sources`` (the first folder wins)."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for source in sources:
        if not (source / RESULTS_FILE).is_file():
            raise FileNotFoundError(f"--reuse {source}: no {RESULTS_FILE} there; give a onestep benchmark output folder")
        for record in latest_by_cell(read_records(source / RESULTS_FILE)).values():
            if record.get("status") == "ok" and record.get("fingerprint"):
                found.setdefault(record["fingerprint"], (source, record))
    return found


def reuse_cells(suite: Suite, todo: list[Cell], out_dir: Path, sources: list[Path], log=print) -> list[Cell]:
    """Copy every cell of ``todo`` that a ``sources`` folder finished under the same specification into
    ``out_dir`` (run folder and record); returns the cells still to run."""
    if not sources:
        return todo
    found = reusable_records([Path(s) for s in sources])
    left = []
    for cell in todo:
        hit = found.get(suite.fingerprint(cell))
        source_run = hit and cell_stale_reason(suite, cell, out_dir, hit[1]) is None and source_run_dir(*hit)
        if not source_run:
            left.append(cell)
            continue
        source, record = hit
        target = copy_run(source_run, out_dir / "runs" / cell.run_name)
        relative = target.relative_to(out_dir)
        samples = dict(record.get("final_samples") or {})
        if samples.get("path"):
            samples["path"] = str(relative / (source / samples["path"]).resolve().relative_to(source_run.resolve()))
        append_record(out_dir / RESULTS_FILE, {
            **record, "method": cell.method.name, "base_method": cell.method.base_name or cell.method.name,
            "variant": cell.method.variant, "run_name": cell.run_name, "run_dir": str(relative),
            "final_samples": samples or record.get("final_samples"), "suite": suite.name,
            "reused_from": {"dir": str(source.resolve()), "run_name": record.get("run_name"),
                            "suite": record.get("suite")}})
        log(f"{cell.run_name}: reused {source / record['run_dir']} (same specification)", flush=True)
    return left


def source_run_dir(source: Path, record: dict[str, Any]) -> Path | None:
    run_dir = Path(record.get("run_dir") or "")
    path = run_dir if run_dir.is_absolute() else source / run_dir
    return path if record.get("run_dir") and path.is_dir() else None


def copy_run(source_run: Path, cell_root: Path) -> Path:
    """Copy a run folder to the next free ``version_<k>`` under ``cell_root``: into a temporary folder
    beside it first, then renamed, so an interrupted copy never looks like a run."""
    cell_root.mkdir(parents=True, exist_ok=True)
    k = 0
    while (cell_root / f"version_{k}").exists():
        k += 1
    staging = Path(tempfile.mkdtemp(prefix=".reuse-", dir=cell_root))
    shutil.copytree(source_run, staging / "run")
    target = cell_root / f"version_{k}"
    (staging / "run").rename(target)
    staging.rmdir()
    return target
