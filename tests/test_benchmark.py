"""The benchmark runner and report: end to end on tiny budgets, resumability, failures, kills, plugins."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from onestep.benchmark import append_record, load_suite, read_records, suite_from_dict
from onestep.benchmark.runner import main as benchmark_main
from onestep.benchmark.runner import run_suite

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
EVAL = {"n_samples": 256, "w2_max_samples": 256, "final_samples": 256}

USER_GENERATOR = '''
import math
import torch
from onestep.generators.base import OneStepGenerator


class DiagonalGaussian(OneStepGenerator):
    """x = mu + exp(log_sigma) * z, fitted by maximum likelihood (a user's plugin outside onestep)."""

    nfe = 1

    def __init__(self, data_shape=(2,), init_scale: float = 0.1, **base):
        super().__init__(data_shape=data_shape, **base)
        self.mu = torch.nn.Parameter(torch.zeros(*self.data_shape))
        self.log_sigma = torch.nn.Parameter(torch.full(tuple(self.data_shape), math.log(init_scale)))

    def loss(self, x, idx):
        z = (x - self.mu) * torch.exp(-self.log_sigma)
        return 0.5 * z.square().mean() + self.log_sigma.mean()

    def generate(self, n, generator=None):
        return self.mu + torch.exp(self.log_sigma) * self.randn(n, generator=generator)
'''


def write_suite(path: Path, methods: list[dict], seeds=(0,), steps: int = 20, name: str = "tiny") -> Path:
    suite = {"name": name, "methods": methods, "datasets": ["8gaussians"], "seeds": list(seeds),
             "budget": {"max_steps": steps}, "data": {"n_train": 2048}, "eval": dict(EVAL)}
    path.write_text(yaml.safe_dump(suite))
    return path


def lines_of(out: Path) -> list[bytes]:
    return (out / "results.jsonl").read_bytes().split(b"\n")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """One tiny suite: flow matching, OT-NFM, a broken config and a user's own generator module."""
    root = tmp_path_factory.mktemp("bench")
    (root / "userpkg_bench").mkdir()
    (root / "userpkg_bench" / "__init__.py").write_text("")
    (root / "userpkg_bench" / "gaussian.py").write_text(USER_GENERATOR)
    sys.path.insert(0, str(root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    methods = [
        {"name": "fm", "config": str(REPO / "configs/flow_matching"), "overrides": {"model.init_args.steps": 4}},
        {"name": "otnfm", "config": str(REPO / "configs/otnfm")},
        {"name": "broken", "config": str(REPO / "configs/otnfm"), "overrides": {"model.init_args.coupling": "nope"}},
        {"name": "mine", "class_path": "userpkg_bench.gaussian.DiagonalGaussian",
         "init_args": {"init_scale": 0.1, "lr": 0.05}},
    ]
    suite_path = write_suite(root / "suite.yaml", methods)
    out = root / "out"
    start = time.perf_counter()
    code = benchmark_main(["--suite", str(suite_path), "--out", str(out)])
    seconds = time.perf_counter() - start
    yield {"root": root, "out": out, "suite": suite_path, "code": code, "seconds": seconds}
    torch.set_num_threads(threads)
    sys.path.remove(str(root))


def ok_records(out: Path) -> dict[str, dict]:
    return {r["method"]: r for r in read_records(out / "results.jsonl") if r["status"] == "ok"}


def test_suite_end_to_end_writes_results_report_and_figures(suite_run):
    out = suite_run["out"]
    assert suite_run["code"] == 1  # the "broken" cell failed: the exit status says so
    records = read_records(out / "results.jsonl")
    assert sorted((r["method"], r["status"]) for r in records) == [
        ("broken", "failed"), ("fm", "ok"), ("mine", "ok"), ("otnfm", "ok")]
    fm = ok_records(out)["fm"]
    assert fm["nfe"] == 4 and fm["budget"]["used"]["steps"] == 20 and fm["budget"]["used"]["stopped_by"] == "max_steps"
    assert fm["protocol"]["n_samples"] == 256 and fm["metrics"]["w2"] > 0
    assert fm["timing"]["training_seconds"] > 0 and fm["versions"]["torch"] == torch.__version__
    assert fm["machine"]["cpu_count"] >= 1 and "--trainer.max_steps=20" in fm["command"]
    assert torch.load(out / fm["final_samples"]["path"], weights_only=True).shape == (256, 2)
    # the NFE sweep re-evaluates the multi-step model at other step counts (nfe_sweep not set: none)
    assert fm["nfe_sweep"] == []
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("qualitative", "metric_vs_nfe", "metric_vs_time", "sampling_speed"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG)
        assert f"figures/{name}.png" in md
    images = page.split("src='data:image/png;base64,")[1:]
    assert len(images) == 4 and "src='figures/" not in page
    assert all(base64.b64decode(img.split("'", 1)[0]).startswith(PNG) for img in images)
    assert "| *data floor* |" in md and "broken seed 0: configuration" in md


def test_best_value_is_bold_and_floor_matches_an_independent_computation(suite_run):
    from onestep.data import OneStepDataModule
    from onestep.metrics import wasserstein2

    out, records = suite_run["out"], ok_records(suite_run["out"])
    best = min(records, key=lambda m: records[m]["metrics"]["w2"])
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith(f"| {best} | 1/1 |"))
    assert row.split("|")[3].strip().startswith("**"), row  # the W2 column of the best method is bold
    for other in set(records) - {best}:
        other_row = next(line for line in (out / "report.md").read_text().splitlines()
                         if line.startswith(f"| {other} | 1/1 |"))
        assert not other_row.split("|")[3].strip().startswith("**")
    floor = next(iter(json.loads((out / "floors.json").read_text()).values()))
    dm = OneStepDataModule(dataset="8gaussians", n_train=2048)
    dm.setup()
    # the mean over 5 disjoint train chunks of 256 against the one reference sample the methods face
    chunks = [float(wasserstein2(dm.train_data[k * 256:(k + 1) * 256], dm.reference("test", 256), 256, 0))
              for k in range(5)]
    assert floor["repeats"] == 5
    assert floor["metrics"]["w2"] == pytest.approx(sum(chunks) / 5, rel=1e-9)
    assert floor["metrics"]["w2_std"] == pytest.approx(float(torch.tensor(chunks).std()), rel=1e-6)
    ratio = records["otnfm"]["metrics"]["w2"] / floor["metrics"]["w2"]
    assert f"{ratio:.3g}" in (out / "report.md").read_text()


def test_broken_config_is_recorded_and_the_others_finish(suite_run):
    broken = next(r for r in read_records(suite_run["out"] / "results.jsonl") if r["method"] == "broken")
    assert broken["status"] == "failed"
    assert "coupling must be one of" in broken["error"] and "nope" in broken["error"]
    assert broken["traceback"]
    assert set(ok_records(suite_run["out"])) == {"fm", "otnfm", "mine"}


def test_user_module_outside_onestep_runs_in_a_suite(suite_run):
    mine = ok_records(suite_run["out"])["mine"]
    assert mine["config"]["model"]["class_path"] == "userpkg_bench.gaussian.DiagonalGaussian"
    assert mine["nfe"] == 1 and mine["metrics"]["w2"] > 0
    run_config = yaml.safe_load((suite_run["out"] / mine["run_dir"] / "config.yaml").read_text())
    assert run_config["model"]["init_args"]["init_scale"] == 0.1


def test_rerun_trains_nothing_for_finished_cells(suite_run):
    out = suite_run["out"]
    before = len(read_records(out / "results.jsonl"))
    records = run_suite(load_suite(suite_run["suite"]), out, log=lambda *a, **k: None)
    assert [r["method"] for r in records] == ["broken"]  # only the failed cell is retried
    assert len(read_records(out / "results.jsonl")) == before + 1
    for method in ("fm", "otnfm", "mine"):  # a new training run would have opened version_1
        assert sorted(p.name for p in (out / "runs" / f"{method}-8gaussians-s0").glob("version_*")) == ["version_0"]


def test_reuse_copies_a_cell_finished_under_the_same_specification_and_trains_the_rest(suite_run, tmp_path, capsys):
    """A tuning suite's winner adopted by another suite: same options, other name, so the same fingerprint."""
    source = suite_run["out"]
    adopted = write_suite(tmp_path / "adopt.yaml", name="adopt", methods=[
        {"name": "fm", "config": str(REPO / "configs/flow_matching"), "grid": {"model.init_args.steps": [4]}},
        {"name": "mine", "class_path": "userpkg_bench.gaussian.DiagonalGaussian",
         "init_args": {"init_scale": 0.1, "lr": 0.02}}])  # another lr: another specification, trained
    out = tmp_path / "out"
    assert benchmark_main(["--suite", str(adopted), "--out", str(out), "--reuse", str(source), "--dry-run"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["reuse", "todo"]
    records = run_suite(load_suite(adopted), out, log=lambda *a, **k: None, reuse=[source])
    assert [r["method"] for r in records] == ["mine"]  # trained; the other one was copied
    copied = ok_records(out)["fm[steps=4]"]
    original = ok_records(source)["fm"]
    assert copied["metrics"] == original["metrics"] and copied["fingerprint"] == original["fingerprint"]
    assert copied["reused_from"]["run_name"] == "fm-8gaussians-s0" and copied["suite"] == "adopt"
    assert copied["run_dir"].startswith("runs/fm[steps=4]-8gaussians-s0/version_")
    samples = torch.load(out / copied["final_samples"]["path"], weights_only=True)
    original_samples = torch.load(source / original["final_samples"]["path"], weights_only=True)
    assert torch.equal(samples, original_samples)
    assert ok_records(out)["mine"].get("reused_from") is None
    from onestep.benchmark.report import _header  # the report names where a copied cell ran

    header = dict(_header({"suite": {"name": "adopt"}, "run_info": {}, "records": [copied], "seeds": [0]}))
    assert "fm[steps=4]-8gaussians-s0 = fm-8gaussians-s0 of " in header["reused cells"]
    assert run_suite(load_suite(adopted), out, log=lambda *a, **k: None, reuse=[source]) == []  # all done
    assert benchmark_main(["--suite", str(adopted), "--out", str(tmp_path / "o2"), "--reuse", str(tmp_path)]) == 2


def test_cell_resumes_from_its_last_checkpoint(suite_run, tmp_path):
    """A cell whose record was lost (killed after training) resumes from last.ckpt: no new training
    steps, the training time restored from the checkpoint, the final evaluation redone."""
    out = tmp_path / "out"
    shutil.copytree(suite_run["out"], out)
    kept = [line for line in lines_of(out) if line and b'"method": "otnfm"' not in line]
    (out / "results.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    original = ok_records(suite_run["out"])["otnfm"]
    suite = load_suite(suite_run["suite"])
    cells = [c for c in suite.cells() if c.method.name == "otnfm"]
    [record] = run_suite(suite, out, cells=cells, log=lambda *a, **k: None)
    assert record["status"] == "ok" and record["resumed_from"].endswith("version_0/checkpoints/last.ckpt")
    assert record["budget"]["used"]["steps"] == 20
    assert record["timing"]["training_seconds"] == pytest.approx(original["timing"]["training_seconds"], rel=0.05)
    assert record["metrics"]["w2"] == pytest.approx(original["metrics"]["w2"], rel=1e-6)


def test_kill_mid_suite_loses_no_finished_cell_and_leaves_no_torn_line(tmp_path):
    suite_path = write_suite(tmp_path / "suite.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
                             seeds=(0, 1, 2), steps=30)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from onestep.cli import main; sys.exit(main())",
                             "benchmark", "--suite", str(suite_path), "--out", str(out), "--no-report",
                             "--threads", "1"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    # no wall-clock deadline (a loaded CI machine can take minutes for the first cell): wait for the first
    # record or for the process to end, whichever comes first
    while proc.poll() is None and not (results.is_file() and results.stat().st_size > 0):
        time.sleep(0.05)
    assert proc.poll() is None, f"the suite ended (exit {proc.returncode}) before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    raw = results.read_bytes()
    assert raw.endswith(b"\n")
    finished = read_records(results)
    assert 1 <= len(finished) < 3, "the kill must land mid-suite"
    assert len(finished) == raw.count(b"\n") and all(r["status"] == "ok" for r in finished)
    # a writer killed inside its one write would leave an unterminated fragment: readers skip it and
    # the next append starts on a new line
    with open(results, "ab") as f:
        f.write(b'{"method": "otnfm", "dataset": "8gau')
    assert len(read_records(results)) == len(finished)
    records = run_suite(load_suite(suite_path), out, log=lambda *a, **k: None)
    assert len(records) == 3 - len(finished)
    with pytest.warns(UserWarning, match="not valid JSON"):  # the fragment, now mid-file, is skipped
        final = read_records(results)
    assert sorted(r["seed"] for r in final) == [0, 1, 2] and all(r["status"] == "ok" for r in final)


def test_append_and_read_records_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"method": "a", "dataset": "d", "seed": 0, "status": "ok", "x": float("nan"),
                         "t": torch.tensor(2.5)})
    append_record(path, {"method": "b", "dataset": "d", "seed": 0, "status": "ok"})
    records = read_records(path)
    assert [r["method"] for r in records] == ["a", "b"] and records[0]["x"] is None and records[0]["t"] == 2.5
    path.write_bytes(path.read_bytes() + b'{"method": "c"')  # torn last line
    assert len(read_records(path)) == 2


def test_report_divides_every_method_by_the_reference(suite_run, tmp_path):
    """``reference: fm`` adds a methods x datasets table of metric / fm's metric, bold where <= 1."""
    from onestep.benchmark.report import write_report

    out = tmp_path / "out"
    shutil.copytree(suite_run["out"], out, ignore=shutil.ignore_patterns("runs"))
    suite = yaml.safe_load((out / "suite.yaml").read_text())
    (out / "suite.yaml").write_text(yaml.safe_dump({**suite, "reference": "fm"}))
    md = write_report(out, with_floor=False)["md"].read_text()
    section = md.split("## Against the reference: metric / fm's")[1].split("\n## ")[0]
    records = ok_records(out)
    for method in ("otnfm", "mine"):
        ratio = records[method]["metrics"]["w2"] / records["fm"]["metrics"]["w2"]
        row = next(line for line in section.splitlines() if line.startswith(f"| {method} |"))
        cell = f"{ratio:.3g} (NFE 1 vs 4)"
        assert (f"**{cell}**" if ratio <= 1 else cell) in row, (row, ratio)
    assert "| fm |" not in section


def _raw_suite(**changes):
    raw = {"name": "s", "methods": [{"name": "otnfm", "config": "configs/otnfm"}], "datasets": ["8gaussians"],
           "seeds": [0], "budget": {"max_steps": 10}, "eval": {"n_samples": 128}}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, message", [
    ({"budget": {}}, "give max_steps"),
    ({"budget": {"max_steps": 0}}, "budget.max_steps"),
    ({"budget": {"minutes": -1}}, "budget.minutes"),
    ({"datasets": ["nope"]}, "'nope' is not a known dataset"),
    ({"seeds": [0, 0]}, "repeated seeds"),
    ({"eval": {"n_samples": 128, "bogus": 1}}, "eval.bogus"),
    ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ({"methods": ["otnfm"]}, "bare string"),
    ({"methods": [{"name": "a", "config": "x", "class_path": "y.Z"}]}, "exactly one of config"),
    ({"methods": [{"name": "a", "config": "x", "overrides": {"eval.n_samples": 10}}]}, "fixed by the suite"),
    ({"methods": [{"name": "a", "config": "x", "overrides": {"trainer.max_steps": 10}}]}, "fixed by the suite"),
    ({"methods": [{"name": "a", "config": "x"}, {"name": "a", "config": "y"}]}, "repeated: ['a']"),
    ({"methods": [{"name": "a b", "config": "x"}]}, "name 'a b'"),
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"threads": 0}, "threads"),
    ({"reference": "flow_matching"}, "'flow_matching' is not one of the suite's methods ['otnfm']"),
])
def test_suite_validation_names_the_option(changes, message):
    with pytest.raises(ValueError, match=None) as err:
        suite_from_dict(_raw_suite(**changes))
    assert message in str(err.value)


def test_grid_expands_into_named_variants_and_cells():
    suite = suite_from_dict(_raw_suite(methods=[{
        "name": "fm", "config": "configs/flow_matching",
        "grid": {"model.init_args.steps": [2, 8], "data.n_train": [500, 1000]}}], seeds=[0, 1]))
    names = [m.name for m in suite.methods]
    assert names == ["fm[steps=2,n_train=500]", "fm[steps=2,n_train=1000]", "fm[steps=8,n_train=500]",
                     "fm[steps=8,n_train=1000]"]
    assert suite.methods[1].overrides == {"model.init_args.steps": 2, "data.n_train": 1000}
    assert len(suite.cells()) == 8 and len({suite.fingerprint(c) for c in suite.cells()}) == 8


def test_shipped_suites_load_and_list_every_method():
    for name in ("quick", "toy", "toy_extra", "mnist", "mnist_cpu"):  # (mnist_backbone: a measurement)
        suite = load_suite(REPO / "configs" / "suites" / f"{name}.yaml")
        assert {"flow_matching", "otnfm", "magt", "characteristic", "lmppm"} <= {m.name for m in suite.methods}


def test_the_backbone_measurement_suite_gives_each_candidate_the_same_minutes():
    suite = load_suite(REPO / "configs" / "suites" / "mnist_backbone.yaml")
    backbones = {m.name: m.overrides.get("model.init_args.backbone", "config") for m in suite.methods}
    assert backbones["fm_mlp1024"] == backbones["otnfm_mlp1024"] == {"name": "mlp", "hidden": [1024, 1024, 1024]}
    assert backbones["fm_unet32"] == backbones["otnfm_unet32"] == "config"
    assert suite.budget.minutes == 8 and suite.budget.max_steps is None and list(suite.datasets) == ["mnist"]


def test_wandb_flag_without_wandb_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    suite_path = write_suite(tmp_path / "s.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}])
    assert benchmark_main(["--suite", str(suite_path), "--out", str(tmp_path / "out"), "--wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_wandb_summary_run_gets_every_table_and_figure(suite_run, monkeypatch, tmp_path):
    from onestep.benchmark.report import write_report

    logged, inits = {}, {}

    class Run:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["_finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: inits.update(kw) or Run(),
                                 Table=lambda columns, data: ("table", columns, data),
                                 Image=lambda path, caption="": ("image", Path(path).name))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "out"
    shutil.copytree(suite_run["out"], out)
    write_report(out, wandb={"project": "p"})
    assert inits["group"] == "tiny" and inits["job_type"] == "summary" and inits["mode"] == "offline"
    assert logged["tables/8gaussians"][0] == "table" and logged["_finished"]
    assert {k for k in logged if k.startswith("figures/")} == {
        "figures/qualitative", "figures/metric_vs_nfe", "figures/metric_vs_time", "figures/sampling_speed"}


def test_time_budget_stops_training(tmp_path):
    from onestep.benchmark.cell import run_cell

    raw = _raw_suite(methods=[{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
                     budget={"minutes": 0.02, "max_steps": 100000}, data={"n_train": 2048},
                     eval={"n_samples": 128, "w2_max_samples": 128})
    suite = suite_from_dict(raw)
    record = run_cell(suite, suite.cells()[0], tmp_path)
    used = record["budget"]["used"]
    assert record["status"] == "ok", record.get("error")
    assert used["stopped_by"] == "minutes" and 1.2 <= used["seconds"] < 1.2 + 5 and used["steps"] < 100000


def test_sigterm_finishes_the_running_cell_then_stops_the_suite(tmp_path, monkeypatch):
    """SIGTERM during a cell (here: while it is being configured): that cell's record is written, the
    suite stops instead of swallowing the signal, and a rerun runs only the remaining cell."""
    import onestep.benchmark.launchers as launchers

    suite_path = write_suite(tmp_path / "s.yaml", [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
                             seeds=(0, 1), steps=5)
    real_run_cell, calls = launchers.run_cell, []

    def run_cell_then_terminate(*args, **kwargs):
        calls.append(args[1].seed)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(launchers, "run_cell", run_cell_then_terminate)
    messages, before = [], signal.getsignal(signal.SIGTERM)
    records = run_suite(load_suite(suite_path), tmp_path / "out", log=lambda m, **k: messages.append(m))
    assert [r["seed"] for r in records] == [0] and records[0]["status"] == "ok" and calls == [0]
    assert "stopped by SIGTERM with 1 cells left" in messages[-1]
    assert signal.getsignal(signal.SIGTERM) is before and len(read_records(tmp_path / "out/results.jsonl")) == 1
    records = run_suite(load_suite(suite_path), tmp_path / "out", log=lambda *a, **k: None)
    assert [r["seed"] for r in records] == [1]


KILLER_GENERATOR = '''
import os, signal
import torch
from onestep.generators.base import OneStepGenerator


class Killer(OneStepGenerator):
    """Dies (SIGKILL) at its first training step, as an out-of-memory kill would."""

    def __init__(self, data_shape=(2,), **base):
        super().__init__(data_shape=data_shape, **base)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def loss(self, x, idx):
        os.kill(os.getpid(), signal.SIGKILL)

    def generate(self, n, generator=None):
        return self.randn(n, generator=generator)
'''


def test_parallel_workers_run_every_cell_once_and_record_a_killed_worker(tmp_path, monkeypatch):
    """--jobs 2: every cell in its own process, one record each (appended concurrently, no torn line), a
    worker killed mid-cell recorded as failed by the parent, then a rerun trains nothing."""
    (tmp_path / "userpkg_killer").mkdir()
    (tmp_path / "userpkg_killer" / "__init__.py").write_text("")
    (tmp_path / "userpkg_killer" / "killer.py").write_text(KILLER_GENERATOR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    methods = [{"name": "fm", "config": str(REPO / "configs/flow_matching"), "overrides": {"model.init_args.steps": 2}},
               {"name": "otnfm", "config": str(REPO / "configs/otnfm")},
               {"name": "killer", "class_path": "userpkg_killer.killer.Killer"}]
    suite = write_suite(tmp_path / "suite.yaml", methods, seeds=(0, 1), steps=10)
    out = tmp_path / "out"
    assert benchmark_main(["--suite", str(suite), "--out", str(out), "--jobs", "2", "--threads", "1",
                           "--no-report"]) == 1  # the killed cells failed
    lines = [line for line in lines_of(out) if line]
    assert len(lines) == 6 and all(json.loads(line)["status"] for line in lines)  # whole records only
    records = read_records(out / "results.jsonl")
    assert sorted((r["method"], r["seed"], r["status"]) for r in records) == [
        ("fm", 0, "ok"), ("fm", 1, "ok"), ("killer", 0, "failed"), ("killer", 1, "failed"),
        ("otnfm", 0, "ok"), ("otnfm", 1, "ok")]
    killed = next(r for r in records if r["method"] == "killer")
    assert "killed by SIGKILL" in killed["error"] and (out / "logs" / "killer-8gaussians-s0.log").is_file()
    assert benchmark_main(["--suite", str(suite), "--out", str(out), "--jobs", "2", "--methods", "fm", "otnfm",
                           "--no-report"]) == 0
    assert len(read_records(out / "results.jsonl")) == 6  # finished cells are not run again


TERM_PARENT_GENERATOR = '''
import os, signal
import torch
from onestep.generators.base import OneStepGenerator


class TermParent(OneStepGenerator):
    """A mean-and-scale fit that, when ONESTEP_TEST_TERM is set, sends SIGTERM to the benchmark parent at
    step 3 of seed 0 (a scheduler pre-empting the job while two workers train)."""

    def __init__(self, data_shape=(2,), **base):
        super().__init__(data_shape=data_shape, **base)
        self.mu = torch.nn.Parameter(torch.zeros(*self.data_shape))

    def loss(self, x, idx):
        if os.environ.get("ONESTEP_TEST_TERM") and self.global_step == 3 and torch.initial_seed() == 0:
            os.kill(os.getppid(), signal.SIGTERM)
        return (x - self.mu).square().mean()

    def generate(self, n, generator=None):
        return self.mu + self.randn(n, generator=generator)
'''


def test_sigterm_to_a_parallel_run_stops_the_workers_and_a_rerun_resumes(tmp_path, monkeypatch):
    (tmp_path / "userpkg_term").mkdir()
    (tmp_path / "userpkg_term" / "__init__.py").write_text("")
    (tmp_path / "userpkg_term" / "term.py").write_text(TERM_PARENT_GENERATOR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    suite = write_suite(tmp_path / "suite.yaml", [{"name": "term", "class_path": "userpkg_term.term.TermParent"}],
                        seeds=(0, 1, 2), steps=3000)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "onestep.cli", "benchmark", "--suite", str(suite), "--out", str(out),
               "--jobs", "2", "--threads", "1", "--no-report"]
    first = subprocess.run(command, env={**os.environ, "ONESTEP_TEST_TERM": "1"}, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped by SIGTERM" in first.stdout, first.stdout
    assert not (out / "logs" / "term-8gaussians-s2.log").exists()  # no cell is started after the signal
    assert not any(r["status"] == "ok" and r["budget"]["used"]["steps"] == 3000
                   for r in read_records(out / "results.jsonl") if r["seed"] == 0)
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    latest = {r["seed"]: r for r in read_records(out / "results.jsonl")}
    assert all(latest[s]["status"] == "ok" and latest[s]["budget"]["used"]["steps"] == 3000 for s in (0, 1, 2))
    assert latest[0]["resumed_from"]  # the interrupted cell went on from its checkpoint


def test_the_mnist_cpu_suite_builds_every_method_on_the_measured_backbone(tmp_path):
    """Every method folder with an image config is in the suite, each cell's `onestep fit` configuration is
    accepted, and every image-to-image network is the UNet-16 the backbone measurement chose."""
    from onestep.benchmark.cell import _configure, cell_args
    from onestep.nets import UNet

    suite = load_suite(REPO / "configs" / "suites" / "mnist_cpu.yaml")
    image_methods = {p.parent.name for p in (REPO / "configs").glob("*/image.yaml")}
    assert {Path(m.config).name for m in suite.methods} == image_methods
    assert list(suite.datasets) == ["mnist", "fashion_mnist"] and suite.budget.max_steps
    for cell in suite.cells():
        if cell.dataset != "mnist":
            continue
        model = _configure(cell_args(suite, cell, tmp_path)).model
        unets = [m for m in model.modules() if isinstance(m, UNet)]
        widths = {u.input_conv.out_channels for u in unets}
        levels = {u.channel_mult for u in unets}
        if cell.method.name in ("magt", "gan", "lmppm"):  # latent to image: their conv decoders
            assert not unets, cell.method.name
        else:
            assert widths == {16} and levels == {(1, 2)}, (cell.method.name, widths, levels)


def test_image_rows_put_real_images_first_and_one_row_per_method(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    from onestep.benchmark.figures import image_rows

    real = torch.zeros(12, 1, 8, 8)  # black real row, white method rows: the rows are told apart by colour
    samples = {("mnist", "fm"): torch.ones(20, 1, 8, 8), ("mnist", "gan"): torch.ones(12, 1, 8, 8)}
    path = image_rows(samples, real, "mnist", ["fm", "gan", "magt"], tmp_path / "rows.png", per_row=6)
    grey = imread(path)[..., :3].mean(-1)
    # the image axes span the right part of the figure; sample one column of it through every row
    column = grey[:, int(0.9 * grey.shape[1])]
    dark = np.flatnonzero(column < 0.2)
    assert len(dark) and dark.max() < len(column) / 4  # the real (black) images: the first of four rows only


@pytest.mark.parametrize("keys,headline", [
    (["fd_lenet-mnist", "fd_pixels", "w2"], "fd_lenet-mnist"),  # sorted keys put pixels last
    (["fd_pixels", "fd_lenet-mnist"], "fd_lenet-mnist"),
    (["fd_inception", "fd_lenet-mnist", "fd_pixels"], "fd_inception"),
    (["fd_pixels", "w2"], "fd_pixels"),
    (["w2", "sw2"], "w2"),
    (["sw2"], None),
])
def test_the_headline_is_the_most_semantic_feature_space(keys, headline):
    from onestep.benchmark.tables import primary_metric

    assert primary_metric(dict.fromkeys(keys, 1.0)) == headline


def test_the_overview_of_an_image_set_shows_the_lenet_fd_not_the_pixel_fd():
    from onestep.benchmark.tables import overview_table

    values = {("fm", "mnist"): [{"fd_lenet-mnist_ratio": 12.5, "fd_pixels_ratio": 0.97, "w2_ratio": 1.07}],
              ("gan", "mnist"): [{"fd_lenet-mnist_ratio": 30.0, "fd_pixels_ratio": 3.0, "w2_ratio": 1.2}]}
    table = overview_table(values, ["fm", "gan"], ["mnist"])
    assert [row[1][0] for row in table.rows] == ["12.5", "30"]
    assert "mnist: fd_lenet-mnist" in table.notes[0]


def test_nearest_train_distance_is_exact_and_finds_a_copied_training_image():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nearest_train", REPO / "benchmarks" / "nearest_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    train, x = torch.rand(50, 1, 4, 4), torch.rand(7, 1, 4, 4)
    x[3] = train[17]  # a copy of a training image
    brute = torch.stack([(train.flatten(1) - xi.flatten()).norm(dim=1).min() for xi in x])
    got = module.nearest_distances(x, train, chunk=8)  # chunks that do not divide the training set
    assert torch.allclose(got.float(), brute, atol=1e-5) and got[3] == 0
