"""A user's own data through the CLI: a Manifold outside the package (class path, registered name through a
suite's imports), a file of points, the errors that say how to add a dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from onestep.benchmark import read_records
from onestep.benchmark.runner import main as benchmark_main
from onestep.cli import main
from onestep.data import MANIFOLDS, OneStepDataModule

QUIET = ["--trainer.enable_progress_bar", "false"]
TINY_OTNFM = ["--model.init_args.backbone", "{name: mlp, hidden: [16]}", "--trainer.max_steps", "4",
              "--data.n_train", "256", "--data.n_val", "64", "--data.n_test", "128", "--data.batch_size", "32",
              "--eval.every_n_steps", "0", "--eval.n_samples", "128", "--eval.w2_max_samples", "128",
              "--eval.pictures", "false", *QUIET]


def readme_manifold() -> str:
    """The README's complete user Manifold ("Adding a dataset"), as the user would save it in my_data.py."""
    section = (REPO / "README.md").read_text().split("## Adding a dataset", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 30
    return code


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The README's my_data.py in a folder outside the package, importable here and (PYTHONPATH) in children;
    the registry and the module are restored afterwards."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_data.py").write_text(readme_manifold())
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    saved = dict(MANIFOLDS)
    yield folder
    MANIFOLDS.clear()
    MANIFOLDS.update(saved)
    sys.modules.pop("my_data", None)


def eval_record(root: Path, run: str) -> dict:
    (path,) = root.glob(f"{run}/version_*/eval.jsonl")
    return json.loads(path.read_text().splitlines()[-1])


def save_points(path: Path, n: int = 1000, dim: int = 3) -> np.ndarray:
    points = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float64) * 2.0 + 1.0
    np.save(path, points)
    return points


def test_user_manifold_by_class_path_trains_through_fit(user_module, tmp_path):
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", "my_data.Circle",
            "--data.dataset_args", "{radius: 2.0}", "--out_dir", str(tmp_path / "runs"), *TINY_OTNFM]
    assert main(args) == 0
    record = eval_record(tmp_path / "runs", "otnfm-my_data.Circle")
    assert record["protocol"]["dataset"] == "my_data.Circle" and "skipped_metrics" not in record["protocol"]
    assert {"eval/w2", "eval/manifold_dist_mean", "eval/offmanifold"} <= set(record["metrics"])
    config = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert config["data"]["dataset_args"] == {"radius": 2.0}
    dm = OneStepDataModule("my_data.Circle", dataset_args={"radius": 2.0}, n_train=512, noise_std=0.0)
    dm.setup()
    assert torch.allclose(dm.train_data.norm(dim=1), torch.full((512,), 2.0), atol=1e-5)  # the radius arrived


def test_point_file_trains_by_path_without_manifold_metrics(tmp_path):
    points = save_points(tmp_path / "cloud.npy")
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", str(tmp_path / "cloud.npy"),
            "--out_dir", str(tmp_path / "runs"), *TINY_OTNFM]
    assert main(args) == 0
    record = eval_record(tmp_path / "runs", "otnfm-cloud.npy")
    assert "eval/w2" in record["metrics"]
    assert not [k for k in record["metrics"] if "manifold" in k]
    assert "file of points" in record["protocol"]["skipped_metrics"]["manifold"]
    # the splits: disjoint rows of the file, fixed by the seed, another seed another split
    dm = OneStepDataModule(str(tmp_path / "cloud.npy"), n_val=100, n_test=200, seed=3)
    dm.setup()
    assert (len(dm.train_data), len(dm.val_data), len(dm.test_data)) == (700, 100, 200)
    rows = {tuple(r) for r in np.float32(points).tolist()}
    splits = [{tuple(r) for r in getattr(dm, f"{s}_data").tolist()} for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == 1000 and set().union(*splits) == rows
    again = OneStepDataModule(str(tmp_path / "cloud.npy"), n_val=100, n_test=200, seed=3)
    other = OneStepDataModule(str(tmp_path / "cloud.npy"), n_val=100, n_test=200, seed=4)
    again.setup(), other.setup()
    assert torch.equal(again.test_data, dm.test_data) and not torch.equal(other.test_data, dm.test_data)


def test_user_datasets_through_benchmark_workers_and_report(user_module, tmp_path, monkeypatch):
    """A registered name (through imports:), a class path and a point file, in two worker processes; then
    `onestep report` in a process of its own needs the imports to compute the registered set's floor."""
    save_points(tmp_path / "cloud.npy")
    suite = {"name": "user", "imports": ["my_data"], "datasets": ["circle", "my_data.Circle", "cloud.npy"],
             "methods": [{"name": "otnfm", "config": str(REPO / "configs/otnfm"),
                          "overrides": {"model.init_args.backbone": {"name": "mlp", "hidden": [16]}}}],
             "seeds": [0], "budget": {"max_steps": 4}, "data": {"n_train": 256, "n_val": 64, "n_test": 128,
                                                                "batch_size": 32},
             "eval": {"n_samples": 128, "w2_max_samples": 128, "final_samples": 128, "pictures": False}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    monkeypatch.chdir(tmp_path)  # point files are read relative to the current directory (workers inherit it)
    assert benchmark_main(["--suite", "suite.yaml", "--out", "out", "--jobs", "2", "--threads", "1",
                           "--no-report"]) == 0
    records = {r["dataset"]: r for r in read_records(tmp_path / "out" / "results.jsonl")}
    assert {d: r["status"] for d, r in records.items()} == {"circle": "ok", "my_data.Circle": "ok", "cloud.npy": "ok"}
    assert "manifold_dist_mean" in records["circle"]["metrics"]
    assert "manifold_dist_mean" in records["my_data.Circle"]["metrics"]
    assert not [k for k in records["cloud.npy"]["metrics"] if "manifold" in k]
    assert "manifold" in records["cloud.npy"]["protocol"]["skipped_metrics"]
    report = subprocess.run([sys.executable, "-m", "onestep.cli", "report", str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "could not be computed" not in report.stderr, report.stderr[-2000:]  # every floor, circle's included
    markdown = (tmp_path / "out" / "report.md").read_text()
    circle = markdown.split("## circle", 1)[1].split("## ", 1)[0]
    assert "data floor" in circle
    assert "Not computed: manifold metrics" in markdown.split("## cloud.npy", 1)[1]


def _write(path: Path, array) -> Path:
    np.save(path, array) if path.suffix == ".npy" else torch.save(array, path)
    return path


def _with_nan(array: np.ndarray, row: int) -> np.ndarray:
    array[row, -1] = np.nan
    return array


BAD_DATASETS = [  # (id, --data.dataset builder, fragments of the one error line)
    ("unknown-name", lambda t: "nope", ["--data.dataset='nope' is not a known dataset", "class path",
                                        "points.npy", "@register_manifold", "imports:"]),
    ("missing-file", lambda t: str(t / "absent.npy"), ["absent.npy", "does not exist"]),
    ("wrong-suffix", lambda t: str(_write(t / "x.npy", np.zeros((10, 2))).with_suffix(".csv")),
     ["must end in .npy"]),
    ("not-2d", lambda t: str(_write(t / "flat.npy", np.zeros(500))), ["shape (500,) is not (n, D)"]),
    ("non-finite", lambda t: str(_write(t / "nan.npy", _with_nan(np.ones((500, 2)), row=7))),
     ["1 of 500 points have non-finite", "rows [7]"]),
    ("too-few", lambda t: str(_write(t / "few.pt", torch.zeros(100, 2))), ["100 points are too few",
                                                                            "--data.n_test"]),
    ("not-a-manifold", lambda t: "collections.OrderedDict", ["OrderedDict is not a subclass of",
                                                             "onestep.data.Manifold"]),
    ("no-module", lambda t: "no_such_module_xyz.Thing", ["no module 'no_such_module_xyz'", "PYTHONPATH"]),
]


@pytest.mark.parametrize("case", BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS])
def test_bad_datasets_get_one_line_before_training(case, tmp_path, capsys):
    _, build, fragments = case
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", build(tmp_path),
            "--out_dir", str(tmp_path / "runs"), *QUIET]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onestep: error:") and len(err.splitlines()) == 1, err
    assert all(f in err for f in fragments), err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_suite_refuses_an_unknown_dataset_saying_how_to_add_one(tmp_path, capsys):
    suite = {"name": "s", "methods": [{"name": "otnfm", "config": str(REPO / "configs/otnfm")}],
             "datasets": ["nope"], "budget": {"max_steps": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert benchmark_main(["--suite", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "datasets entry='nope' is not a known dataset" in err and "@register_manifold" in err, err
    suite["imports"] = ["no_such_module_xyz"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert benchmark_main(["--suite", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "suite imports: no module 'no_such_module_xyz'" in capsys.readouterr().err
