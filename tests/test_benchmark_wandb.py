"""`onestep benchmark --wandb` in one process: one W&B run per cell and one summary run (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from onestep.benchmark.runner import main as benchmark_main
from wandb_offline import read_run

TINY = {"model.init_args.backbone": {"name": "mlp", "hidden": [16]}}


def test_single_process_benchmark_gives_one_wandb_run_per_cell_and_a_summary_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    suite = {"name": "tinywb", "datasets": ["8gaussians"], "seeds": [0, 1], "budget": {"max_steps": 3},
             "data": {"n_train": 512}, "eval": {"n_samples": 128, "w2_max_samples": 128, "final_samples": 128},
             "methods": [{"name": "fm", "config": str(REPO / "configs/flow_matching"),
                          "overrides": {**TINY, "model.init_args.steps": 2}},
                         {"name": "otnfm", "config": str(REPO / "configs/otnfm"), "overrides": TINY}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    assert benchmark_main(["--suite", str(tmp_path / "suite.yaml"), "--out", str(out), "--wandb"]) == 0
    wandb.teardown()  # joins the W&B service: every run file is complete and closed from here on

    runs = [read_run(p) for p in tmp_path.rglob("offline-run-*/run-*.wandb")]
    assert all(run["finished"] for run in runs)
    summary_runs = [run for run in runs if run["job_type"] == "summary"]
    cell_runs = [run for run in runs if run["job_type"] != "summary"]
    assert len(summary_runs) == 1 and len(cell_runs) == 4 and len({run["id"] for run in runs}) == 5
    assert summary_runs[0]["group"] == "tinywb"

    results = {(r["method"], r["seed"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    seen = set()
    for run in cell_runs:
        config = run["config"]
        cell = (config["method"], config["seed"])
        seen.add(cell)
        assert config["dataset"] == "8gaussians" and config["suite"] == "tinywb" and run["group"] == "tinywb"
        assert {config["method"], "8gaussians", f"seed{config['seed']}"} <= set(run["tags"])
        assert config["data"]["dataset"] == "8gaussians" and config["seed_everything"] == config["seed"]
        record = results[cell]
        assert run["summary"]["status"] == "ok" and run["summary"]["headline_metric"] == "w2"
        assert run["summary"]["final/w2"] == pytest.approx(record["metrics"]["w2"], rel=1e-12)
        assert run["summary"]["best/w2"] <= run["summary"]["final/w2"] and run["summary"]["best/step"] == 3
        assert run["summary"]["eval/w2"] == pytest.approx(record["metrics"]["w2"], rel=1e-12)
    assert seen == {("fm", 0), ("fm", 1), ("otnfm", 0), ("otnfm", 1)}
