"""The benchmark's bookkeeping without training: which cells rerun, which checkpoint a cell may resume
from, which record of a cell counts, and which direction each table column is ranked in.

A wrong answer here shows stale or lost numbers in the report while every number looks plausible, so
each test builds the exact situation (records and checkpoints on disk) and checks the decision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from onestep.benchmark import append_record, suite_from_dict
from onestep.benchmark.cell import find_resume_checkpoint
from onestep.benchmark.records import RESULTS_FILE, latest_by_cell
from onestep.benchmark.runner import finished_cells
from onestep.benchmark.tables import BASE_COLUMNS, dataset_table

REPO = Path(__file__).resolve().parents[1]


def make_suite(**changes):
    raw = {"name": "tiny", "methods": [{"name": "fm", "config": str(REPO / "configs/flow_matching")}],
           "datasets": ["8gaussians"], "seeds": [0], "budget": {"max_steps": 20},
           "eval": {"n_samples": 256, "w2_max_samples": 256}}
    for key, value in changes.items():
        raw[key] = value
    return suite_from_dict(raw)


def ok_record(suite, cell, **extra):
    return {"method": cell.method.name, "dataset": cell.dataset, "seed": cell.seed, "status": "ok",
            "fingerprint": suite.fingerprint(cell), "metrics": {"w2": 0.1}, **extra}


@pytest.mark.parametrize("changes", [
    {"budget": {"max_steps": 40}},
    {"eval": {"n_samples": 512, "w2_max_samples": 256}},
    {"overrides": {"model.init_args.lr": 1e-3}},
    {"methods": [{"name": "fm", "config": str(REPO / "configs/flow_matching"),
                  "overrides": {"model.init_args.steps": 2}}]},
], ids=["budget", "protocol", "suite-override", "method-override"])
def test_a_finished_cell_is_rerun_when_its_specification_changes(tmp_path, changes):
    old = make_suite()
    [cell] = old.cells()
    append_record(tmp_path / RESULTS_FILE, ok_record(old, cell))
    assert finished_cells(tmp_path, old) == {cell.key}  # same spec: skipped
    new = make_suite(**changes)
    [new_cell] = new.cells()
    assert new_cell.key == cell.key and new.fingerprint(new_cell) != old.fingerprint(cell)
    assert finished_cells(tmp_path, new) == set()  # another spec: the stale ok record does not count


def test_a_failed_latest_record_is_not_finished(tmp_path):
    suite = make_suite()
    [cell] = suite.cells()
    append_record(tmp_path / RESULTS_FILE, {**ok_record(suite, cell), "status": "failed"})
    assert finished_cells(tmp_path, suite) == set()


def _checkpoint(run_root: Path, version: int, fingerprint: str) -> Path:
    ckpt = run_root / f"version_{version}" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not read by the lookup")
    (run_root / f"version_{version}" / "cell.json").write_text(json.dumps({"fingerprint": fingerprint}))
    return ckpt


def test_a_cell_never_resumes_from_a_checkpoint_of_another_specification(tmp_path):
    old = _checkpoint(tmp_path, 0, "aaaa")
    assert find_resume_checkpoint(tmp_path, "aaaa") == old
    assert find_resume_checkpoint(tmp_path, "bbbb") is None  # written under the old spec: start afresh
    new = _checkpoint(tmp_path, 1, "bbbb")
    assert find_resume_checkpoint(tmp_path, "bbbb") == new and find_resume_checkpoint(tmp_path, "aaaa") == old
    (tmp_path / "version_1" / "cell.json").unlink()  # a version without its spec is never trusted
    assert find_resume_checkpoint(tmp_path, "bbbb") is None


def test_the_finished_result_survives_a_later_failed_retry():
    key = {"method": "fm", "dataset": "8gaussians", "seed": 0}
    ok = {**key, "status": "ok", "fingerprint": "a", "metrics": {"w2": 0.1}}
    failed = {**key, "status": "failed", "fingerprint": "a", "error": "training: boom"}
    assert latest_by_cell([ok, failed])[("fm", "8gaussians", 0)] is ok  # same spec: the ok stays
    assert latest_by_cell([failed, ok])[("fm", "8gaussians", 0)] is ok  # a success replaces a failure
    other_spec = {**failed, "fingerprint": "b"}
    assert latest_by_cell([ok, other_spec])[("fm", "8gaussians", 0)] is other_spec  # new spec: latest wins
    newer_ok = {**ok, "metrics": {"w2": 0.2}}
    assert latest_by_cell([ok, newer_ok])[("fm", "8gaussians", 0)] is newer_ok
    # same fingerprint, but the config file's values changed in between (a stale cell's rerun failed):
    # the old result must not stand as the cell's; another output folder or config path alone is no change
    ran = {**ok, "config": {"model": {"init_args": {"lr": 0.001}}, "out_dir": "/a/runs", "config": ["/a/x.yaml"]}}
    moved = {**failed, "config": {"model": {"init_args": {"lr": 0.001}}, "out_dir": "/b/runs", "config": ["/b/x.yaml"]}}
    changed = {**failed, "config": {"model": {"init_args": {"lr": 0.0005}}, "out_dir": "/a/runs"}}
    assert latest_by_cell([ran, moved])[("fm", "8gaussians", 0)] is ran
    assert latest_by_cell([ran, changed])[("fm", "8gaussians", 0)] is changed


EXPECTED_DIRECTION = {"w2": "min", "w2_ratio": "min", "sw2": "min", "offmanifold": "min",
                      "manifold_dist_mean": "min", "precision": "max", "recall": "max", "density": None,
                      "coverage": "max", "nfe": "min", "samples_per_s": "max", "train_seconds": None,
                      "steps": None}


def test_every_column_is_ranked_in_its_own_direction():
    assert {key: direction for key, _, direction in BASE_COLUMNS} == EXPECTED_DIRECTION
    # through the table: method "a" is better on every ranked metric (lower W2/FD/NFE, higher precision ...)
    good = {"w2": 0.1, "sw2": 0.05, "fd_pixels": 1.0, "offmanifold": 0.01, "manifold_dist_mean": 0.01,
            "precision": 0.95, "recall": 0.9, "density": 1.0, "coverage": 0.97, "nfe": 1.0, "samples_per_s": 1e5}
    bad = {"w2": 0.5, "sw2": 0.3, "fd_pixels": 9.0, "offmanifold": 0.2, "manifold_dist_mean": 0.3,
           "precision": 0.5, "recall": 0.4, "density": 0.5, "coverage": 0.6, "nfe": 8.0, "samples_per_s": 1e3}
    records = [{"method": "a", "_values": good}, {"method": "b", "_values": bad}]
    table = dataset_table(records, ["b", "a"], 1, floors=[])
    rows = {row[0][0]: dict(zip(table.columns, row)) for row in table.rows}
    for label in ("W2", "SW2", "FD (pixels)", "off-manifold", "dist. to manifold", "precision", "recall",
                  "coverage", "NFE", "samples/s"):
        assert rows["a"][label][1] and not rows["b"][label][1], label  # bold on the better method only
    assert not rows["a"]["density"][1] and not rows["b"]["density"][1]  # density is not ranked


def test_sensitivity_panels_only_options_each_variant_sets(tmp_path):
    """Two grids of one method with different keys (a tuning suite): the report's sensitivity figure must
    not look an option up in a variant that does not set it (it raised KeyError and no report was written)."""
    from onestep.benchmark import figures

    def record(method, variant, fd):
        return {"method": method, "base_method": "char", "variant": variant, "metrics": {"fd": fd}}

    lr, lr_steps = {"lr": 1e-3}, {"lr": 1e-3, "steps": 200}
    mixed = {"mnist": {"a": [record("a", lr, 5.0)], "b": [record("b", lr_steps, 4.0)]}}
    assert figures.sensitivity(mixed, {"mnist": "fd"}, {}, tmp_path / "none.png") is None  # nothing is swept
    swept = {"mnist": {**mixed["mnist"], "c": [record("c", {"lr": 1e-4, "steps": 200}, 6.0)]}}
    path = figures.sensitivity(swept, {"mnist": "fd"}, {}, tmp_path / "lr.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("suite_file", sorted((REPO / "configs" / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_suite_resolves_each_cell_to_a_command(suite_file, tmp_path, capsys):
    """A suite naming a config that is gone, an option with a typo'd section or a class that no longer
    imports fails here, not hours into a run (``--dry-run`` exits 1 and says which cell will fail)."""
    from onestep.benchmark.runner import main as benchmark_main

    assert benchmark_main(["--suite", str(suite_file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("todo  ") and " onestep fit " in line for line in lines)
