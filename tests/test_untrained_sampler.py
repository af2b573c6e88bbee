"""A staged generator (teacher then student, autoencoder then generator) is never scored before the stage its
samples come from: a periodic evaluation there is skipped with a warning, a run that ends there has no final
metrics (the benchmark runner fails the cell with the reason), and `onestep evaluate` refuses its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from onestep.cli import main

TINY = "{name: mlp, hidden: [16]}"
STAGED = {  # tiny 8gaussians versions; the option that places the switch to the sampling stage
    "characteristic": (["--model.init_args.backbone", TINY, "--model.init_args.grid_size", "5"],
                       "--model.init_args.teacher_steps"),
    "lmppm": (["--model.init_args.encoder", TINY, "--model.init_args.decoder", TINY,
               "--model.init_args.distance_net", TINY, "--model.init_args.bank_size", "256"],
              "--model.init_args.ae_steps"),
}


def fit_args(method: str, out: Path, switch: int, steps: int = 4) -> list[str]:
    options, switch_option = STAGED[method]
    return ["fit", "--config", str(REPO / f"configs/{method}"), "--data.dataset", "8gaussians", *options,
            switch_option, str(switch), "--trainer.max_steps", str(steps), "--data.n_train", "512",
            "--data.batch_size", "64", "--eval.every_n_steps", "2", "--eval.n_samples", "128",
            "--eval.w2_max_samples", "128", "--eval.pictures", "false", "--trainer.enable_progress_bar", "false",
            "--out_dir", str(out)]


def eval_steps(out: Path) -> list[int]:
    files = list(out.rglob("eval.jsonl"))
    return [json.loads(line)["step"] for f in files for line in f.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", list(STAGED))
def test_evaluations_before_the_sampling_stage_are_skipped_and_after_it_run(method, tmp_path):
    torch.set_num_threads(1)
    # the switch at step 2: the evaluation after batch 2 is still stage 1 (batch 3 switches), the one at 4 is not
    with pytest.warns(UserWarning, match=r"no evaluation at step 2: .* is in stage 1"):
        assert main(fit_args(method, tmp_path / "switched", switch=2)) == 0
    assert eval_steps(tmp_path / "switched") == [4]
    # the switch after the end: nothing is scored, and the warning says why the run has no final metrics
    with pytest.warns(UserWarning, match=r"no evaluation at step 4: .*training ended before it"):
        assert main(fit_args(method, tmp_path / "early", switch=6)) == 0
    assert eval_steps(tmp_path / "early") == []


def test_onestep_evaluate_refuses_a_checkpoint_before_the_sampling_stage(tmp_path, capsys):
    with pytest.warns(UserWarning, match="no evaluation"):
        assert main(fit_args("lmppm", tmp_path, switch=6)) == 0
    (ckpt,) = tmp_path.rglob("last.ckpt")
    capsys.readouterr()
    assert main(["evaluate", "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "is in stage 1" in err and "untrained networks" in err and str(ckpt) in err
    assert eval_steps(tmp_path) == []


def test_a_suite_cell_whose_budget_ends_in_the_teacher_stage_fails_with_the_reason(tmp_path):
    from onestep.benchmark.cell import run_cell
    from onestep.benchmark.suite import suite_from_dict

    suite = suite_from_dict({
        "name": "s", "datasets": ["8gaussians"], "seeds": [0], "data": {"n_train": 512},
        "methods": [{"name": "characteristic", "config": str(REPO / "configs/characteristic"),
                     "overrides": {"model.init_args.backbone": {"name": "mlp", "hidden": [16]},
                                   "model.init_args.teacher_steps": 3, "model.init_args.grid_size": 5}}],
        "budget": {"max_steps": 3}, "eval": {"n_samples": 128, "w2_max_samples": 128}})
    record = run_cell(suite, suite.cells()[0], tmp_path)
    assert record["status"] == "failed"
    assert "no evaluation at step 3: CharacteristicGenerator is in stage 1" in record["error"]
    assert not record.get("metrics")


def test_latent_magt_names_its_switch_step():
    from onestep.generators.magt_latent import LatentMAGT

    model = LatentMAGT(data_shape=(2,), code_dim=2, latent_dim=1, ae_steps=7, n_anchors=8)
    assert model.untrained_sampler() == ("LatentMAGT is in stage 1; its samples come from the networks of "
                                         "stage 2, which begins at step 7")
    model.stage.fill_(2)
    assert model.untrained_sampler() is None
