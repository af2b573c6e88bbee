"""A finished cell whose config file changed since it ran is run again (resume, --reuse, checkpoints)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from onestep.benchmark import load_suite, read_records
from onestep.benchmark.cell import find_resume_checkpoint
from onestep.benchmark.runner import main as benchmark_main
from onestep.benchmark.runner import run_suite
from onestep.benchmark.staleness import configured_options, stale_reason

REPO = Path(__file__).resolve().parents[1]
RECORD_CONFIG = {"model": {"class_path": "onestep.generators.otnfm.OTNFM",
                           "init_args": {"lr": 0.001, "backbone": {"name": "mlp", "hidden": [8, 8]}, "p_t1": 0.0}},
                 "trainer": {"max_steps": 20}, "data": {"dataset": "8gaussians", "batch_size": 64},
                 "out_dir": "/elsewhere/runs", "run_name": "x"}


def layer_args(tmp_path: Path, layer: dict, *extra: str, name: str = "layer.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(layer))
    return ["--config", str(path), *extra]


def test_configured_options_reads_layers_then_the_command_line_in_order(tmp_path):
    base = tmp_path / "vector.yaml"
    base.write_text("model:\n  class_path: onestep.generators.OTNFM\n  init_args:\n    lr: 1e-3\n"
                    "    backbone: {name: mlp, hidden: [8, 8]}\ntrainer:\n  max_steps: 4000\n")
    own = tmp_path / "8gaussians.yaml"
    own.write_text("model:\n  init_args:\n    lr: 5.0e-4\n")
    options = configured_options(["--config", str(base), "--config", str(own), "--data.dataset=8gaussians",
                                  "--model.init_args.backbone.hidden=[16, 16]", "--trainer.max_steps=20",
                                  "--out_dir=/tmp/x", "--run_name=r"])
    assert options == {"model.class_path": "onestep.generators.OTNFM", "model.init_args.lr": 5.0e-4,
                       "model.init_args.backbone": {"name": "mlp", "hidden": [16, 16]},
                       "trainer.max_steps": 20, "data.dataset": "8gaussians"}  # where it is kept: not compared


@pytest.mark.parametrize("layer, extra, changed", [
    ({"model": {"init_args": {"lr": "1e-3", "p_t1": 0}}}, (), None),  # 1e-3 is text to YAML, a number to the parser
    ({"model": {"class_path": "onestep.generators.OTNFM"}}, ("--trainer.max_steps=20",), None),  # same class
    ({"model": {"init_args": {"lr": 5e-4}}}, (), "model.init_args.lr: 0.001 then, 0.0005 now"),
    ({"model": {"init_args": {"backbone": {"name": "mlp", "hidden": [8, 8], "time_embedding": "raw"}}}}, (),
     "model.init_args.backbone"),  # an entry added to a dict-valued option
    ({"model": {"init_args": {"backbone": {"name": "mlp"}}}}, (), "model.init_args.backbone"),  # one removed
    ({"model": {"init_args": {"coupling": "online"}}}, (), "model.init_args.coupling: unset then"),
    ({"model": {"class_path": "onestep.generators.FlowMatching"}}, (), "model.class_path"),
    ({}, ("--trainer.max_steps=40",), "trainer.max_steps: 20 then, 40 now"),
])
def test_stale_reason_names_the_option_that_changed(tmp_path, layer, extra, changed):
    reason = stale_reason(layer_args(tmp_path, layer, *extra), {"config": RECORD_CONFIG})
    if changed is None:
        assert reason is None
    else:
        assert reason.startswith("the config changed since it ran") and changed in reason


def test_a_record_without_a_resolved_config_is_not_judged(tmp_path):
    assert stale_reason(layer_args(tmp_path, {"model": {"init_args": {"lr": 9.0}}}), {"status": "ok"}) is None


def test_a_checkpoint_written_under_other_options_is_not_resumed(tmp_path):
    """Checked against the version's resolved config.yaml, so a version written before cell.json held the
    options is checked too (it once resumed a run of another network width and failed to load)."""
    def version(k: int, cell: dict, config: dict | None) -> Path:
        ckpt = tmp_path / "runs" / f"version_{k}" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        (ckpt.parents[1] / "cell.json").write_text(json.dumps(cell))
        if config is not None:
            (ckpt.parents[1] / "config.yaml").write_text(yaml.safe_dump(config))
        return ckpt

    same = layer_args(tmp_path, {"model": {"init_args": {"lr": 1e-3}}}, name="same.yaml")
    other = layer_args(tmp_path, {"model": {"init_args": {"lr": 5e-4}}}, name="other.yaml")
    old = version(0, {"fingerprint": "aaaa"}, RECORD_CONFIG)  # no options in cell.json: an older version
    runs = tmp_path / "runs"
    assert find_resume_checkpoint(runs, "aaaa", same) == old
    assert find_resume_checkpoint(runs, "aaaa", other) is None
    assert find_resume_checkpoint(runs, "aaaa") == old  # no args: the fingerprint alone (the old contract)
    (old.parents[1] / "config.yaml").unlink()  # nothing to check against: not resumed
    assert find_resume_checkpoint(runs, "aaaa", same) is None
    (old.parents[1] / "cell.json").write_text(json.dumps({"fingerprint": "aaaa", "options": {"model.init_args.lr": 1e-3}}))
    assert find_resume_checkpoint(runs, "aaaa", same) == old and find_resume_checkpoint(runs, "aaaa", other) is None


def test_editing_a_method_config_reruns_its_finished_cells_and_only_them(tmp_path, capsys):
    """End to end: the fingerprint names the config file, not its contents; the edited default must not
    leave the old results standing (nor be copied by --reuse), and the untouched method stays finished."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        configs = tmp_path / "configs"
        shutil.copytree(REPO / "configs/flow_matching", configs / "fm")
        shutil.copytree(REPO / "configs/otnfm", configs / "otnfm")
        suite_path = tmp_path / "suite.yaml"
        suite_path.write_text(yaml.safe_dump({
            "name": "edit", "datasets": ["8gaussians"], "seeds": [0], "budget": {"max_steps": 10},
            "data": {"n_train": 1024}, "eval": {"n_samples": 128, "w2_max_samples": 128, "final_samples": 128},
            "methods": [{"name": "fm", "config": str(configs / "fm"), "overrides": {"model.init_args.steps": 2}},
                        {"name": "otnfm", "config": str(configs / "otnfm")}]}))
        out, copy = tmp_path / "out", tmp_path / "copy"
        lines: list[str] = []
        quiet = lambda *a, **k: None  # noqa: E731
        assert len(run_suite(load_suite(suite_path), out, log=quiet)) == 2
        assert run_suite(load_suite(suite_path), out, log=quiet) == []  # unchanged: nothing to do

        for cell_json in out.glob("runs/*/version_*/cell.json"):  # as an older version wrote them
            cell_json.write_text(json.dumps({k: v for k, v in json.loads(cell_json.read_text()).items()
                                             if k != "options"}))
        vector = configs / "otnfm" / "vector.yaml"
        vector.write_text(vector.read_text().replace("lr: 1.0e-3", "lr: 5.0e-4"))
        assert benchmark_main(["--suite", str(suite_path), "--out", str(out), "--dry-run"]) == 0
        states = {line.split()[1].rstrip(":"): line for line in capsys.readouterr().out.splitlines()}
        assert states["fm-8gaussians-s0"].startswith("done")
        assert states["otnfm-8gaussians-s0"].startswith("todo") and "model.init_args.lr" in states["otnfm-8gaussians-s0"]
        # --reuse of the old folder must not copy the old-default cell either
        assert [r["method"] for r in run_suite(load_suite(suite_path), copy, log=quiet, reuse=[out])] == ["otnfm"]

        records = run_suite(load_suite(suite_path), out, log=lambda *a, **k: lines.append(a[0]))
        assert [r["method"] for r in records] == ["otnfm"]
        assert records[0]["config"]["model"]["init_args"]["lr"] == 5.0e-4 and records[0]["resumed_from"] is None
        assert any(line.startswith("otnfm-8gaussians-s0: run again: the config changed since it ran "
                                   "(model.init_args.lr: 0.001 then, 0.0005 now)") for line in lines)
        assert run_suite(load_suite(suite_path), out, log=quiet) == []
        latest = {r["method"]: r for r in read_records(out / "results.jsonl")}
        assert latest["otnfm"]["config"]["model"]["init_args"]["lr"] == 5.0e-4
    finally:
        torch.set_num_threads(threads)
