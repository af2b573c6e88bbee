"""The GPU check's plan: the suite it writes loads under the suite rules, and its summary reads real records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from onestep.benchmark.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_gpu_suite_loads_with_every_method_and_gpu_precision(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(gpu_check.suite_yaml(300, cpu=False)))
    suite = load_suite(path)
    assert [m.name for m in suite.methods] == list(gpu_check.METHODS)
    assert suite.budget.max_steps == 300 and list(suite.datasets) == ["mnist"]
    assert suite.overrides["trainer.precision"] == "bf16-mixed" and suite.overrides["trainer.accelerator"] == "gpu"
    teacher = next(m for m in suite.methods if m.name == "characteristic").overrides
    assert teacher == {"model.init_args.teacher_steps": 150}  # half the budget: the student must train too


def test_cpu_suite_has_no_gpu_options(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(gpu_check.suite_yaml(4, cpu=True)))
    suite = load_suite(path)
    assert suite.overrides == {"trainer.accelerator": "cpu"}


def test_train_rows_and_markdown_from_records(tmp_path):
    cell = {"dataset": "mnist", "seed": 0}
    records = [{**cell, "method": "otnfm", "status": "ok", "budget": {"used": {"steps": 300, "seconds": 20.0}},
                "metrics": {"fd_lenet-mnist": 50.0}},  # an earlier run into the same folder: replaced below
               {**cell, "method": "magt", "status": "failed", "budget": {"used": {}}, "metrics": None},
               {**cell, "method": "otnfm", "status": "ok", "budget": {"used": {"steps": 300, "seconds": 12.0}},
                "metrics": {"fd_lenet-mnist": 41.5, "w2": 1.0}}]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = gpu_check.train_rows(tmp_path / "results.jsonl")
    assert len(rows) == 2  # one row per cell, its latest record
    rows = sorted(rows, key=lambda r: r["method"], reverse=True)
    assert rows[0]["steps_per_s"] == 25.0 and rows[0]["fd_lenet-mnist"] == 41.5 and "w2" not in rows[0]
    assert rows[1]["steps_per_s"] is None and rows[1]["status"] == "failed"
    report = {"date": "d", "steps": 300, "precision": "bf16-mixed",
              "environment": {"device": "NVIDIA H100", "torch": "2.11"},
              "parts": {"train": {"status": "ok", "seconds": 50, "rows": rows}, "fid": {"status": "skipped: x"},
                        "overhead": {"status": "ok", "result": {"steps": 2000, "onestep_over_bare": 1.234,
                                                                "ms_per_step": {"onestep": 2.5, "lightning": 2.2,
                                                                                "bare": 2.0}}}}}
    text = gpu_check.markdown(report)
    assert "NVIDIA H100" in text and "| otnfm | ok |" in text and "25" in text and "skipped: x" in text
    assert "onestep 2.50 ms, minimal Lightning 2.20 ms, bare loop 2.00 ms; onestep / bare 1.23x" in text


def test_the_check_trains_the_seeds_the_reference_and_the_families():
    assert {"flow_matching", "otnfm", "magt", "characteristic", "lmppm", "gan", "imle", "consistency",
            "meanflow"} <= set(gpu_check.METHODS)
