"""DDP on CPU (gloo): `onestep fit --trainer.strategy ddp --trainer.devices 2` against one process.

What should agree, and why:
* Parameters. DDP averages the ranks' gradients; with the same global batch split over the ranks (the
  ResumableSampler deals each global batch round-robin) the averaged gradient equals the one-process
  gradient *if every sample's random draws are the same in both runs*. Ordinary methods draw noise from a
  per-rank stream (each rank is seeded from (seed, rank)), so their parameters agree only in distribution.
  ``KeyedFlowMatching`` below keys each sample's noise and time on (data index, step), which makes the two
  runs the same computation up to float summation order: parameters must agree to ~1e-6.
* Metrics. The evaluation draws its samples split over the ranks with per-rank seeds, so a 2-process
  evaluation of the same model sees different samples than a 1-process one: metrics agree within the
  sampling error of the protocol, and NFE exactly.
* Files. Loggers, eval.jsonl and pictures are written once, by rank 0, into one run directory.
* OT-NFM online coupling: every rank re-pairs its own share of the batch and the slot updates of all ranks
  are applied everywhere, so the bank is the same on every rank and stays a bijection.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.special import ndtr

from conftest import REPO
from onestep.callbacks.reliability import rank_seed
from onestep.cli import run_lightning
from onestep.generators.coupling import hashed_normal
from onestep.generators.flow_matching import FlowMatching
from onestep.generators.otnfm import OTNFM
from onestep.metrics import sliced_wasserstein, wasserstein2

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


class KeyedFlowMatching(FlowMatching):
    """Independent-coupling flow matching whose noise x0 and time t are functions of (data index, step)."""

    def loss(self, x1, idx):
        key = idx.long() * 1_000_003 + int(self.global_step)
        x0 = hashed_normal(key.cpu(), x1.shape[1:], seed=11).to(x1)
        t = torch.as_tensor(ndtr(hashed_normal(key.cpu(), (1,), seed=12).numpy()), dtype=x1.dtype).view(-1)
        tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1)
        xt = (1 - tb) * x0 + tb * x1
        return (self.velocity(xt, t.to(x1)) - (x1 - x0)).square().mean()


class BankReportingOTNFM(OTNFM):
    """OT-NFM that writes each rank's bank, seed and initial bank cost to $ONESTEP_TEST_DUMP at the end."""

    def on_train_start(self) -> None:
        super().on_train_start()
        data = self.trainer.datamodule.train_data
        self._start = {"seed": torch.initial_seed(), "cost": self.bank.mean_pair_cost(data)}

    def on_train_end(self) -> None:
        super().on_train_end()
        data = self.trainer.datamodule.train_data
        report = {**self._start, "final_cost": self.bank.mean_pair_cost(data), "slot_of": self.bank.slot_of.cpu()}
        torch.save(report, Path(os.environ["ONESTEP_TEST_DUMP"]) / f"rank{self.global_rank}.pt")


def _start_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "onestep.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]


FLOW_ARGS = ["fit", "--config", str(REPO / "configs/flow_matching"), "--data.dataset", "8gaussians",
             "--model.class_path", "test_ddp.KeyedFlowMatching", "--model.init_args.steps", "8",
             "--model.init_args.backbone", "{name: mlp, hidden: [32, 32]}", "--model.init_args.ema_decay", "0.9",
             "--model.init_args.lr", "3e-3",
             "--data.n_train", "2048", "--trainer.max_steps", "40", "--eval.every_n_steps", "20",
             "--eval.n_samples", "1024", *QUIET]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Both 2-process runs, started together (most of their time is process start-up)."""
    root = tmp_path_factory.mktemp("ddp")
    dump = root / "dump"
    dump.mkdir()
    flow = _start_cli(FLOW_ARGS + ["--out_dir", str(root / "flow"), "--data.batch_size", "32", *DDP])
    bank = _start_cli(["fit", "--config", str(REPO / "configs/otnfm"),
                       "--data.dataset", "8gaussians", "--out_dir", str(root / "bank"),
                       "--model.class_path", "test_ddp.BankReportingOTNFM", "--model.init_args.coupling", "online",
                       "--model.init_args.bank_slots", "2", "--model.init_args.backbone", "{name: mlp, hidden: [16]}",
                       "--data.n_train", "512", "--data.batch_size", "64", "--trainer.max_steps", "24",
                       "--eval.every_n_steps", "0", "--eval.at_end", "false", *DDP, *QUIET],
                      env_extra={"ONESTEP_TEST_DUMP": str(dump)})
    try:
        yield {"root": root, "flow": flow, "bank": bank, "dump": dump}
    finally:
        for proc in (flow, bank):
            proc.kill()


def _eval_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_and_write_files_once(ddp_runs, tmp_path):
    one = run_lightning(FLOW_ARGS[1:] + ["--out_dir", str(tmp_path / "one"), "--data.batch_size", "64"], run=False)
    one.trainer.fit(one.model, datamodule=one.datamodule)
    initial = run_lightning(FLOW_ARGS[1:] + ["--out_dir", str(tmp_path / "init")], run=False).model.state_dict()
    _finish(ddp_runs["flow"])

    runs = list((ddp_runs["root"] / "flow").glob("*/version_*"))
    assert len(runs) == 1, runs  # one run directory, not one per rank
    ddp_dir = runs[0]
    assert sorted(p.name for p in ddp_dir.glob("*.png")) == ["samples_step20.png", "samples_step40.png"]
    ddp_records = _eval_records(ddp_dir)
    assert [r["step"] for r in ddp_records] == [20, 40]  # each evaluation written once
    assert ddp_records[-1]["protocol"]["world_size"] == 2

    ckpt = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    ddp_state = {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}
    one_state = {**one.model.state_dict(), **{f"ema.{k}": v for k, v in one.model._ema.items()}}
    for name, value in one_state.items():
        assert torch.allclose(ddp_state[name], value, atol=2e-6, rtol=1e-5), name
    moved = max((one_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-2  # the comparison is not between two untrained networks

    one_metrics = _eval_records(Path(one.trainer.log_dir))[-1]["metrics"]
    ddp_metrics = ddp_records[-1]["metrics"]
    assert ddp_metrics["eval/nfe"] == one_metrics["eval/nfe"] == 8
    # same model, half of the 1024 samples different: W2 and SW2 agree within their sampling error, measured
    # here as the spread of the one-process model's metrics over 5 other sampling seeds (4 sigma of the
    # difference of two independent estimates; the two runs share half their samples, so this is loose)
    protocol = ddp_records[-1]["protocol"]
    reference = one.datamodule.reference("test", 1024)
    spread: dict[str, list[float]] = {"eval/w2": [], "eval/sw2": []}
    for seed in range(100, 105):
        fake = one.datamodule.denormalize(one.model.sample_chunked(1024, generator=torch.Generator().manual_seed(seed)))
        spread["eval/w2"].append(float(wasserstein2(fake, reference, protocol["w2_max_samples"], 0)))
        spread["eval/sw2"].append(float(sliced_wasserstein(fake, reference, protocol["sw_projections"], 0)))
    for key, values in spread.items():
        tolerance = 4 * 2 ** 0.5 * statistics.stdev(values)
        assert abs(ddp_metrics[key] - one_metrics[key]) < tolerance, (key, ddp_metrics[key], one_metrics[key], values)


def test_online_bank_identical_on_every_rank_and_ranks_draw_different_noise(ddp_runs):
    _finish(ddp_runs["bank"])
    reports = [torch.load(ddp_runs["dump"] / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(reports[0]["slot_of"], reports[1]["slot_of"])
    slots = reports[0]["slot_of"].flatten()
    assert torch.equal(slots.sort().values, torch.arange(512 * 2))  # still a bijection data x slot -> noise
    assert reports[0]["final_cost"] < 0.8 * reports[0]["cost"]  # 3 epochs of re-pairing lower the OT cost
    assert [r["seed"] for r in reports] == [rank_seed(0, 0), rank_seed(0, 1)]  # per-rank, from the run's seed


def test_two_stage_plugins_train_under_plain_ddp(tmp_path):
    """`--trainer.strategy ddp` with a plugin whose stages train different parameters (the student or the
    distance net gets no gradient in stage 1): the CLI turns on DDP's unused-parameter search, so both
    stages run on 2 processes and the run is evaluated. Plain DDP would stop at the first step."""
    tiny = ["--trainer.max_steps", "8", "--data.n_train", "512", "--data.batch_size", "32", "--eval.n_samples", "256",
            "--eval.every_n_steps", "0", *DDP, *QUIET]
    runs = {
        "characteristic": _start_cli(["fit", "--config", str(REPO / "configs/characteristic"),
                                      "--data.dataset", "8gaussians",
                                      "--model.init_args.teacher_steps", "4", "--model.init_args.grid_size", "8",
                                      "--model.init_args.backbone", "{name: mlp, hidden: [16]}",
                                      "--out_dir", str(tmp_path / "characteristic"), *tiny]),
        "lmppm": _start_cli(["fit", "--config", str(REPO / "configs/lmppm"), "--data.dataset", "8gaussians",
                             "--model.init_args.encoder", "{name: mlp, hidden: [16]}",
                             "--model.init_args.decoder", "{name: mlp, hidden: [16]}",
                             "--model.init_args.distance_net", "{name: mlp, hidden: [16]}",
                             "--model.init_args.bank_size", "128", "--model.init_args.steps", "2",
                             "--out_dir", str(tmp_path / "lmppm"), *tiny]),
    }
    for name, proc in runs.items():
        _finish(proc)
        records = [json.loads(line) for path in (tmp_path / name).rglob("eval.jsonl")
                   for line in path.read_text().splitlines()]
        assert len(records) == 1 and records[0]["step"] == 8, records  # written once, by rank 0, at the end
        metrics, protocol = records[0]["metrics"], records[0]["protocol"]
        assert protocol["world_size"] == 2 and protocol["n_samples"] == 256
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        # 8 steps barely train (4.9 measured for the characteristic student): real samples of a network,
        # neither equal to the data (W2 ~0) nor exploded
        assert 0.1 < metrics["eval/w2"] < 20 and 0 <= metrics["eval/coverage"] <= 1, metrics
