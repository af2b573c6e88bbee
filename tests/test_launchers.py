"""Launchers of ``onestep benchmark``: submitit job arrays (run here with submitit's local executor), the
SLURM parameters built from a suite and the command line, and ``results.jsonl`` appends from many processes."""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from onestep.benchmark import read_records, suite_from_dict
from onestep.benchmark.records import append_record, results_lock
from onestep.benchmark.runner import build_parser
from onestep.benchmark.runner import main as benchmark_main

REPO = Path(__file__).resolve().parents[1]
EVAL = {"n_samples": 256, "w2_max_samples": 256, "final_samples": 256}

FLAKY_GENERATOR = '''
import os, signal
import torch
from onestep.generators.base import OneStepGenerator


class Flaky(OneStepGenerator):
    """A mean fit that, at step 5 while the file ``marker`` exists, removes it and sends itself ``fault``:
    SIGUSR1 (what SLURM sends before a time limit) or SIGKILL (a node lost, an out-of-memory kill)."""

    def __init__(self, data_shape=(2,), fault: str = "SIGUSR1", marker: str = "", **base):
        super().__init__(data_shape=data_shape, **base)
        self.fault, self.marker = fault, marker
        self.mu = torch.nn.Parameter(torch.zeros(*self.data_shape))

    def loss(self, x, idx):
        if self.global_step == 5 and self.marker and os.path.exists(self.marker):
            os.remove(self.marker)
            os.kill(os.getpid(), getattr(signal, self.fault))
        return (x - self.mu).square().mean() + 0.1 * self.randn(1).square().mean()

    def generate(self, n, generator=None):
        return self.mu + self.randn(n, generator=generator)
'''


def _suite_file(path: Path, methods: list[dict], resources: dict | None = None) -> Path:
    raw = {"name": "tiny", "methods": methods, "datasets": ["8gaussians"], "seeds": [0],
           "budget": {"max_steps": 30}, "data": {"n_train": 2048}, "eval": dict(EVAL)}
    if resources is not None:
        raw["resources"] = resources
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow  # four job starts, each importing torch and Lightning in a fresh process (~40 s unloaded)
def test_submitit_array_gives_the_local_records_and_a_killed_cell_reruns_once(tmp_path, monkeypatch):
    """The issue's acceptance test. Two cells through ``--launcher submitit_local``: one preempted (SIGUSR1 at
    step 5: checkpoint, submitit requeue, resume), one killed (SIGKILL at step 5: recorded as failed).
    The records carry the local launcher's fingerprints and metrics; a rerun runs only the killed cell,
    and every cell ends with exactly one ``ok`` record."""
    pytest.importorskip("submitit")
    (tmp_path / "userpkg_flaky").mkdir()
    (tmp_path / "userpkg_flaky" / "__init__.py").write_text("")
    (tmp_path / "userpkg_flaky" / "flaky.py").write_text(FLAKY_GENERATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    markers = {"preempted": tmp_path / "preempt.marker", "killed": tmp_path / "kill.marker"}
    methods = [{"name": "preempted", "class_path": "userpkg_flaky.flaky.Flaky",
                "init_args": {"fault": "SIGUSR1", "marker": str(markers["preempted"]), "lr": 0.05}},
               {"name": "killed", "class_path": "userpkg_flaky.flaky.Flaky",
                "init_args": {"fault": "SIGKILL", "marker": str(markers["killed"]), "lr": 0.05}}]
    suite = _suite_file(tmp_path / "suite.yaml", methods)
    common = ["--suite", str(suite), "--threads", "1", "--no-report"]
    threads = torch.get_num_threads()
    try:
        assert benchmark_main([*common, "--out", str(tmp_path / "local")]) == 0  # no marker: no fault
    finally:
        torch.set_num_threads(threads)
    local = {r["method"]: r for r in read_records(tmp_path / "local/results.jsonl")}

    for marker in markers.values():
        marker.touch()
    out = tmp_path / "array"
    assert benchmark_main([*common, "--out", str(out), "--launcher", "submitit_local"]) == 1  # the killed cell
    assert not any(m.exists() for m in markers.values())  # both faults happened
    first = {r["method"]: r for r in read_records(out / "results.jsonl")}
    assert first["killed"]["status"] == "failed" and "without a record" in first["killed"]["error"]
    preempted = first["preempted"]
    assert preempted["status"] == "ok", preempted.get("error")
    assert preempted["resumed_from"] and preempted["resumed_from"].endswith("version_0/checkpoints/last.ckpt")
    assert preempted["budget"]["used"]["steps"] == 30

    assert benchmark_main([*common, "--out", str(out), "--launcher", "submitit_local"]) == 0
    records = read_records(out / "results.jsonl")
    assert sorted((r["method"], r["status"]) for r in records) == [("killed", "failed"), ("killed", "ok"),
                                                                   ("preempted", "ok")]
    assert records[-1]["method"] == "killed" and not records[-1]["resumed_from"]  # rerun: only the lost cell
    for r in records:
        if r["status"] == "ok":  # same specification, same numbers as in one local process
            assert r["fingerprint"] == local[r["method"]]["fingerprint"]
            assert r["metrics"]["w2"] == local[r["method"]]["metrics"]["w2"], r["method"]


def _parse(argv: list[str]):
    from onestep.benchmark.resources import command_line_options, with_command_line

    args = build_parser().parse_args(["--suite", "unused.yaml", *argv])
    return args, lambda resources: with_command_line(resources, command_line_options(args))


def test_slurm_job_parameters_come_from_the_suite_and_the_command_line(tmp_path, monkeypatch):
    """The sbatch script submitit writes for a cell holds the suite's resources, with the command line's
    ``--slurm.*`` values in their place; resources do not change a cell's fingerprint. (No cluster here:
    submitit's check for ``srun`` is answered yes; nothing is submitted.)"""
    submitit = pytest.importorskip("submitit")
    from onestep.benchmark.cluster import make_executor

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    resources = {"partition": "gpu", "account": "proj", "gpus": 1, "cpus": 8, "mem_gb": 32, "time_min": 90,
                 "parallelism": 4, "setup": ["module load cuda/12.4"], "slurm": {"qos": "high"}}
    raw = {"name": "tiny", "methods": [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
           "datasets": ["8gaussians"], "budget": {"max_steps": 30}}
    suite = suite_from_dict({**raw, "resources": resources})
    assert suite.fingerprint(suite.cells()[0]) == suite_from_dict(raw).fingerprint(suite_from_dict(raw).cells()[0])
    _, merge = _parse(["--slurm.partition", "a100", "--slurm.gpus", "2", "--slurm.time_min", "30",
                       "--slurm.slurm", "constraint=a100"])
    executor = make_executor("slurm", merge(suite.resources), tmp_path, "onestep-tiny")
    assert executor._executor.parameters["array_parallelism"] == 4 and executor._executor.max_num_timeout == 3
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    sbatch = {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")}
    for expected in ("--partition=a100", "--account=proj", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB",
                     "--time=30", "--qos=high", "--constraint=a100", "--signal=USR1@120", "--nodes=1",
                     "--ntasks-per-node=1", "--job-name=onestep-tiny"):
        assert expected in sbatch, (expected, sorted(sbatch))
    assert "module load cuda/12.4" in script


@pytest.mark.parametrize("argv, message", [
    (["--slurm.slurm", "qos"], "--slurm.slurm 'qos': give KEY=VALUE"),
    (["--slurm.gpus", "-1"], "--slurm.gpus: must be an integer >= 0"),
])
def test_bad_command_line_resources_name_the_option(argv, message):
    from onestep.benchmark.resources import ClusterResources

    _, merge = _parse(argv)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge(ClusterResources())


def test_bad_suite_resources_and_missing_submitit_get_one_line(tmp_path, capsys, monkeypatch):
    suite = _suite_file(tmp_path / "s.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
                        resources={"gpu": 1})
    assert benchmark_main(["--suite", str(suite), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "suite resources: unknown keys ['gpu']" in err
    suite = _suite_file(tmp_path / "s.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}])
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert benchmark_main(["--suite", str(suite), "--launcher", "slurm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install onestep[cluster]" in err
    assert not (tmp_path / "o").exists()  # refused before anything ran


def _append_many(path: str, writer: int, count: int, start) -> None:
    start.wait(60)  # every writer begins together, so their appends overlap
    for i in range(count):  # records of very different sizes, up to ~300 kB (far beyond any atomic write size)
        append_record(path, {"method": f"w{writer}", "dataset": "d", "seed": i, "status": "ok",
                             "payload": "x" * (1 + (writer * 7919 + i * 104729) % 300_000)})


def test_concurrent_appends_from_several_processes_keep_every_line_whole(tmp_path):
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(4)
    writers = [context.Process(target=_append_many, args=(str(path), w, 25, start)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 101
    records = [json.loads(line) for line in lines[:-1]]  # every line parses: nothing interleaved or torn
    for w in range(4):  # each writer's records all there, in its own order, with their full payloads
        mine = [r for r in records if r["method"] == f"w{w}"]
        assert [r["seed"] for r in mine] == list(range(25))
        assert all(len(r["payload"]) == 1 + (w * 7919 + r["seed"] * 104729) % 300_000 for r in mine)


def _hold_lock(path: str, locked, release) -> None:
    with results_lock(path):
        locked.set()
        release.wait(60)


def test_an_append_waits_for_the_lock_held_by_another_process(tmp_path):
    """Appends are serialised by the lock file (what keeps hosts sharing an NFS directory apart): while
    another process holds it, an append writes nothing and, past its wait, says which file is locked."""
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(path), locked, release))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(TimeoutError, match="results.jsonl.lock is still locked by another process"):
            append_record(path, {"method": "a", "dataset": "d", "seed": 0, "status": "ok"}, wait_seconds=0)
        assert not path.exists() or path.read_bytes() == b""
    finally:
        release.set()
        holder.join(timeout=60)
    append_record(path, {"method": "a", "dataset": "d", "seed": 0, "status": "ok"}, wait_seconds=0)
    assert [r["method"] for r in read_records(path)] == ["a"]


def test_onestep_imports_submitit_only_inside_functions():
    """submitit is an optional extra (``onestep[cluster]``): no module imports it at load time."""
    import ast

    def module_level(body):
        for node in body:
            yield node
            for field in ("body", "orelse", "finalbody", "handlers"):  # if/try blocks still run at import
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    yield from module_level(getattr(node, field, []) or [])
            if isinstance(node, ast.ClassDef):
                yield from module_level(node.body)

    found, anywhere = [], 0
    for path in (REPO / "onestep").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = lambda n: [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]  # noqa: E731
        anywhere += sum(any(x.split(".")[0] == "submitit" for x in names(n)) for n in ast.walk(tree)
                        if isinstance(n, (ast.Import, ast.ImportFrom)))
        found += [f"{path.name}:{n.lineno}" for n in module_level(tree.body) if isinstance(n, (ast.Import, ast.ImportFrom))
                  and any(x.split(".")[0] == "submitit" for x in names(n))]
    assert anywhere >= 1 and not found, found  # it is used, and only lazily


def test_slurm_options_with_the_local_launcher_are_refused(tmp_path, capsys):
    suite = _suite_file(tmp_path / "s.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}])
    assert benchmark_main(["--suite", str(suite), "--slurm.gpus", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--slurm.gpus apply to --launcher slurm or submitit_local" in capsys.readouterr().err


def test_a_submitit_task_imports_the_suite_modules_before_its_cell(tmp_path, monkeypatch):
    # a submitit task is a fresh process: unpickling the suite does not import a user's dataset module,
    # so the task must, before the cell looks its dataset up in the registry
    pytest.importorskip("submitit")
    from onestep.benchmark import cluster

    (tmp_path / "user_sets_for_task.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_sets_for_task", raising=False)
    suite = suite_from_dict({"name": "t", "methods": [{"name": "fm", "config": str(REPO / "configs/flow_matching")}],
                             "datasets": ["8gaussians"], "seeds": [0], "budget": {"max_steps": 2},
                             "imports": ["user_sets_for_task"]})
    monkeypatch.delitem(sys.modules, "user_sets_for_task")  # as in the task's fresh process
    seen = {}
    monkeypatch.setattr(cluster, "run_cell", lambda *a, **k: seen.setdefault("imported", "user_sets_for_task" in sys.modules)
                        and {"status": "ok"})
    cluster.CellTask(suite, tmp_path, None, None, True)(suite.cells()[0])
    assert seen["imported"] is True


class StopAfterStart(dict):
    """A stop flag that reads None until the workers are started, then SIGTERM (a scheduler's signal
    arriving while the workers are still starting up)."""

    def __init__(self, reads_before: int) -> None:
        super().__init__(signal=None)
        self.reads = 0
        self.reads_before = reads_before

    def __getitem__(self, key):
        self.reads += 1
        import signal
        return signal.SIGTERM if self.reads > self.reads_before else None


def test_a_worker_killed_by_the_forwarded_sigterm_while_starting_is_stopped_not_failed(tmp_path, monkeypatch):
    from onestep.benchmark import parallel

    # a worker with no SIGTERM handler yet: the default action kills it (return code -SIGTERM)
    monkeypatch.setattr(parallel, "worker_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(120)"])
    suite = suite_from_dict({"name": "t", "methods": [{"name": "fm", "config": str(REPO / "configs/flow_matching")}],
                             "datasets": ["8gaussians"], "seeds": [0], "budget": {"max_steps": 2}})
    seen = []
    parallel.run_cells_in_workers(suite, "suite.yaml", suite.cells(), tmp_path, jobs=1, threads=None,
                                  wandb_project=None, stop=StopAfterStart(reads_before=2),
                                  on_record=lambda cell, record, seconds: seen.append(record))
    assert seen == [None]  # stopped: a rerun runs the cell again
    assert read_records(tmp_path / "results.jsonl") == []  # no failure recorded
