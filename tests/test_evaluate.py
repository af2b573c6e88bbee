"""`onestep evaluate` on a checkpoint of every method, and the checkpoint checks of `onestep fit --ckpt_path`."""
from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO
from onestep.checkpoints import CheckpointMismatchError
from onestep.cli import OneStepCLI, main
from onestep.data import OneStepDataModule
from onestep.generators import OneStepGenerator
from onestep.metrics import wasserstein2

TINY_MLP = "{name: mlp, hidden: [16]}"
METHODS = {  # tiny versions of each method's 8gaussians config: two-stage methods reach their second stage
    "flow_matching": ["--model.init_args.backbone", TINY_MLP, "--model.init_args.steps", "4"],
    "otnfm": ["--model.init_args.backbone", TINY_MLP],
    "magt": ["--model.init_args.backbone", TINY_MLP, "--model.init_args.n_anchors", "64",
             "--model.init_args.eval_points", "64", "--model.init_args.eval_projection_points", "32"],
    "characteristic": ["--model.init_args.backbone", TINY_MLP, "--model.init_args.teacher_steps", "2",
                       "--model.init_args.grid_size", "5"],
    "lmppm": ["--model.init_args.encoder", TINY_MLP, "--model.init_args.decoder", TINY_MLP,
              "--model.init_args.distance_net", TINY_MLP, "--model.init_args.bank_size", "256"],
}
STEPS, N = 4, 128


def fit_args(method: str, out: Path, config: str = "8gaussians") -> list[str]:
    return ["fit", "--config", str(REPO / f"configs/{method}"), "--data.dataset", config, *METHODS[method],
            "--trainer.max_steps", str(STEPS), "--data.n_train", "512", "--data.batch_size", "64",
            "--eval.every_n_steps", "0", "--eval.n_samples", str(N), "--eval.w2_max_samples", str(N),
            "--eval.pictures", "false", "--trainer.enable_progress_bar", "false", "--out_dir", str(out)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Each method trained for 4 steps through `onestep fit` (its final evaluation in eval.jsonl)."""
    torch.set_num_threads(1)
    out, ckpts = tmp_path_factory.mktemp("runs"), {}
    for method in METHODS:
        before = set(out.rglob("last.ckpt"))
        assert main(fit_args(method, out)) == 0
        (ckpts[method],) = set(out.rglob("last.ckpt")) - before
    return ckpts


def scored_directly(ckpt_path: Path, use_ema: bool = True) -> float:
    """W2 of the protocol computed here, without onestep evaluate: Lightning's own loader, the EMA tensors of
    the file copied into the parameters by hand, sampling with the evaluation's seed."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module, _, name = checkpoint["hyper_parameters"]["_class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    assert isinstance(model, OneStepGenerator)
    if use_ema:
        with torch.no_grad():
            for name, value in checkpoint["ema"].items():
                model.get_parameter(name).copy_(value)
    data = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = OneStepDataModule(**data)
    datamodule.setup("fit")
    with torch.no_grad():
        fake = model.sample_chunked(N, generator=torch.Generator().manual_seed(0), use_ema=False)
    return float(wasserstein2(datamodule.denormalize(fake), datamodule.reference("test", N), N, 0))


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluate_scores_the_checkpoints_ema_weights(method, trained, capsys):
    ckpt = trained[method]
    capsys.readouterr()
    assert main(["evaluate", "--ckpt_path", str(ckpt)]) == 0
    printed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("eval/"))
    records = [json.loads(line) for line in (ckpt.parents[1] / "eval.jsonl").read_text().splitlines()]
    during_training, evaluated = records[0], records[-1]
    assert len(records) == 2 and evaluated["source"] == "onestep evaluate" and "source" not in during_training
    assert evaluated["ckpt_path"] == str(ckpt.resolve()) and evaluated["step"] == during_training["step"] == STEPS
    assert evaluated["protocol"] == during_training["protocol"]  # the run's protocol is the default
    assert set(printed) == set(evaluated["metrics"]) == set(during_training["metrics"])
    for key, value in evaluated["metrics"].items():
        assert float(printed[key]) == pytest.approx(value, rel=1e-5)
        if key != "eval/samples_per_s":  # a timing; everything else is the training's final evaluation again
            assert value == pytest.approx(during_training["metrics"][key], rel=1e-9, abs=1e-12), key
    direct = scored_directly(ckpt)
    assert evaluated["metrics"]["eval/w2"] == pytest.approx(direct, rel=1e-9)
    # the test can tell: the live (non-EMA) weights of the same checkpoint score differently
    assert abs(scored_directly(ckpt, use_ema=False) - direct) > 1e-6


def test_evaluate_takes_protocol_overrides_and_refuses_a_bad_file(trained, tmp_path, capsys):
    ckpt = tmp_path / "elsewhere.ckpt"
    shutil.copy(trained["otnfm"], ckpt)
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--eval.n_samples", "64", "--eval.seed", "3"]) == 0
    record = json.loads((tmp_path / "eval.jsonl").read_text())  # no run directory: beside the file
    assert record["protocol"]["n_samples"] == 64 and record["protocol"]["seed"] == 3
    (tmp_path / "broken.ckpt").write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["evaluate", "--ckpt_path", str(tmp_path / "broken.ckpt")]) == 2
    assert "broken.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("method, config, match", [
    ("otnfm", "8gaussians", r"model FlowMatching \(checkpoint\) vs OTNFM \(configuration\)"),
    ("flow_matching", "moons2d", r"dataset 8gaussians \(checkpoint\) vs moons2d \(configuration\)"),
])
def test_fit_refuses_a_checkpoint_of_another_model_or_dataset(method, config, match, trained, tmp_path, capsys):
    assert main(fit_args(method, tmp_path, config) + ["--ckpt_path", str(trained["flow_matching"])]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search("^onestep: error: .*" + match + ".*config.yaml", last_line), last_line
    with pytest.raises(CheckpointMismatchError, match=match + ".*config.yaml"):  # --debug: the exception itself
        main(["--debug"] + fit_args(method, tmp_path, config) + ["--ckpt_path", str(trained["flow_matching"])])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fit_refuses_a_checkpoint_of_another_data_shape(trained, tmp_path):
    checkpoint = torch.load(trained["otnfm"], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["data_shape"] = (3,)
    torch.save(checkpoint, tmp_path / "other_shape.ckpt")
    args = fit_args("otnfm", tmp_path / "out") + ["--ckpt_path", str(tmp_path / "other_shape.ckpt")]
    with pytest.raises(CheckpointMismatchError, match=r"data shape \(3,\) \(checkpoint\) vs \(2,\)"):
        main(["--debug"] + args)
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_ckpt_path_last_resumes_the_newest_version_or_is_refused(trained, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no checkpoint .*version_\*"):
        main(["--debug"] + fit_args("otnfm", tmp_path) + ["--ckpt_path", "last"])
    assert not list(tmp_path.rglob("*.ckpt"))
    run = trained["otnfm"].parents[2]
    newer = run / "version_7" / "checkpoints"
    newer.mkdir(parents=True)
    shutil.copy(trained["otnfm"], newer / "last.ckpt")
    resumed_from = []  # the path Lightning would restore (checked here; restoring it is Lightning's job)
    monkeypatch.setattr(OneStepCLI, "_run_subcommand", lambda cli, name: resumed_from.append(cli.config.fit.ckpt_path))
    main(fit_args("otnfm", run.parent) + ["--ckpt_path", "last"])
    assert resumed_from == [str(newer / "last.ckpt")]
    shutil.rmtree(newer.parent)


def test_help_lists_every_command_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "evaluate", "benchmark", "report", "train-features"))
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("onestep 0.")
    assert main(["validate"]) == 2 and "unknown command 'validate'" in capsys.readouterr().err


def test_resuming_with_other_model_arguments_warns_which_ones_the_checkpoint_replaces(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(OneStepCLI, "_run_subcommand", lambda cli, name: None)  # parsing is what is checked
    args = fit_args("otnfm", tmp_path) + ["--ckpt_path", str(trained["otnfm"]), "--model.init_args.lr", "0.01"]
    with pytest.warns(UserWarning, match=r"replace the configuration's: lr=0.001 \(configuration: 0.01\)"):
        main(args)
