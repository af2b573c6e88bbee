"""The `onestep` command: configs for every method, overrides, and errors before any training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, needs_mnist
from onestep.cli import main, run_lightning

QUIET = ["--trainer.enable_progress_bar", "false"]
# every method folder with an image default (a method's mnist config is its image.yaml plus mnist.yaml if any),
# and the image configs beside the defaults (configs/magt/image_pixels.yaml)
MNIST_CONFIGS = sorted([p.parent for p in (REPO / "configs").glob("*/image.yaml") if p.parent.name != "suites"]
                       + list((REPO / "configs").glob("*/image_*.yaml")))


def tiny_fit_args(config: Path, out: Path, steps: int = 1) -> list[str]:
    return ["fit", "--config", str(config), "--trainer.max_steps", str(steps), "--out_dir", str(out),
            "--eval.every_n_steps", "0", "--eval.at_end", "false", *QUIET]


@needs_mnist
@pytest.mark.parametrize("config", MNIST_CONFIGS, ids=lambda p: p.stem if p.suffix else p.name)
def test_every_method_trains_one_step_and_samples_on_mnist(config, tmp_path):
    cli = run_lightning(tiny_fit_args(config, tmp_path)[1:] + ["--data.dataset", "mnist", "--data.n_train", "64",
                                                               "--data.batch_size", "8"],
                        run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    samples = cli.model.sample(3)
    assert samples.shape == (3, 1, 28, 28) and torch.isfinite(samples).all()


def test_fit_writes_eval_jsonl_and_prints_the_log_dir(tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", "8gaussians", "--trainer.max_steps", "30",
            "--out_dir", str(tmp_path), "--eval.every_n_steps", "15", "--eval.n_samples", "256", *QUIET,
            "--model.init_args.backbone", "{name: mlp, hidden: [32, 32]}"]
    assert main(args) == 0
    log_dirs = list(tmp_path.glob("otnfm-8gaussians/version_*"))
    assert len(log_dirs) == 1 and str(log_dirs[0].resolve()) in capsys.readouterr().out
    lines = [json.loads(line) for line in (log_dirs[0] / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [15, 30]
    assert {"eval/w2", "eval/manifold_dist_mean"} <= set(lines[-1]["metrics"])
    assert lines[-1]["protocol"]["n_samples"] == 256


def test_fit_from_the_command_line_does_not_warn_about_its_own_expanded_args(tmp_path, monkeypatch):
    """`onestep fit --config <folder>` hands LightningCLI the expanded command and keeps the user's in sys.argv;
    Lightning's warning about getting both is not for the user."""
    command = tiny_fit_args(REPO / "configs/flow_matching", tmp_path, steps=2)
    monkeypatch.setattr(sys, "argv", ["onestep", *command, "--data.dataset", "moons2d",
                                      "--model.init_args.backbone", "{name: mlp, hidden: [8]}"])
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main() == 0
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]
    assert list(tmp_path.glob("*-moons2d/version_0/checkpoints/last.ckpt"))


def test_print_config_resolves_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "onestep.cli", "fit", "--config", str(REPO / "configs/flow_matching"),
         "--data.dataset", "moons2d",
         "--model.init_args.steps", "7", "--data.batch_size", "64", "--print_config"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steps: 7" in out.stdout and "batch_size: 64" in out.stdout and "FlowMatching" in out.stdout


# bad input (unknown dataset, batch 0, max_steps 0, a UNet on vectors, an unknown method, missing or truncated
# data files, ...) is covered case by case, through main(argv), in tests/test_bad_input.py


def test_a_plugin_outside_the_package_runs_through_the_cli(tmp_path, monkeypatch):
    """The README's one-file plugin: a class path outside `onestep`, no edit to onestep."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", "8gaussians", "--model.class_path",
            "ot_regression.OTRegression", "--model.init_args.backbone", "{name: mlp, hidden: [64, 64]}",
            "--trainer.max_steps", "300", "--out_dir", str(tmp_path), "--eval.every_n_steps", "0",
            "--eval.n_samples", "1000", "--eval.pictures", "false", *QUIET]
    assert main(args) == 0
    result = json.loads(next(tmp_path.glob("otregression-8gaussians/version_0/eval.jsonl")).read_text())
    assert result["metrics"]["eval/nfe"] == 1
    assert result["metrics"]["eval/w2"] < 1.5  # the untrained map sits near N(0, I): W2 about 4.5


@pytest.mark.parametrize("trainer, expected", [
    ({"strategy": "ddp", "devices": 1}, True),
    ({"strategy": "auto", "devices": 2}, True),
    ({"strategy": "auto", "devices": "0,1"}, True),
    ({"strategy": "auto", "devices": [0]}, False),
    ({"strategy": "auto", "devices": 1, "num_nodes": 2}, True),
    ({"strategy": "auto", "devices": 1}, False),
    ({"strategy": "ddp_find_unused_parameters_true", "devices": 2}, False),  # the user's own choice stays
    ({"strategy": "fsdp", "devices": 2}, False),
])
def test_two_stage_plugins_get_unused_parameter_search_only_under_plain_ddp(trainer, expected):
    from onestep.cli import _plain_ddp
    assert _plain_ddp(trainer) is expected
