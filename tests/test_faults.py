"""Faults: a NaN loss, SIGTERM / SIGUSR1 preemption, truncated or corrupted checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO
from onestep.callbacks.fault import (CheckpointCorruptedError, NonFiniteGuard, NonFiniteLossError,
                                     check_checkpoint_file)
from onestep.callbacks.reliability import ExactCheckpoint
from onestep.cli import main, run_lightning
from onestep.data import OneStepDataModule
from onestep.generators.flow_matching import FlowMatching

TINY = {"name": "mlp", "hidden": [16, 16]}
QUIET = ["--trainer.enable_progress_bar", "false", "--eval.every_n_steps", "0", "--eval.at_end", "false"]


def checkpoint_every(steps: int) -> list[str]:
    """Replace the CLI's callbacks by one ExactCheckpoint every `steps` (the model adds the reliability callbacks)."""
    spec = ("[{class_path: onestep.callbacks.reliability.ExactCheckpoint, init_args: {every_n_train_steps: %d, "
            "save_last: true, save_top_k: -1, filename: 'step{step}', auto_insert_metric_name: false}}]" % steps)
    return ["--trainer.callbacks", spec]


class NaNFlowMatching(FlowMatching):
    """Flow matching whose loss turns NaN from optimiser step ``nan_from_step`` on (a deliberate fault)."""

    def __init__(self, *args, nan_from_step: int = 7, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_from_step = nan_from_step

    def loss(self, x, idx):
        loss, logs = super().loss(x, idx)
        return (loss * torch.nan if self.global_step >= self.nan_from_step else loss), logs


def params_of(model) -> dict[str, torch.Tensor]:
    return {**{k: v.detach().clone() for k, v in model.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in model._ema.items()}}


# ------------------------------------------------------------------------------------------ NaN / inf
def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "configs/flow_matching"), "--data.dataset", "8gaussians",
            "--out_dir", str(tmp_path),
            "--model.class_path", "test_faults.NaNFlowMatching", "--model.init_args.nan_from_step", "7",
            "--model.init_args.backbone", "{name: mlp, hidden: [16, 16]}", "--model.init_args.steps", "2",
            "--data.batch_size", "32", "--data.n_train", "256", "--trainer.max_steps", "20",
            *checkpoint_every(5), *QUIET, "--debug"]  # --debug: the exception itself, not the one-line report
    with pytest.raises(NonFiniteLossError) as failure:
        main(args)
    message = str(failure.value)
    ckpt_dir = next(tmp_path.glob("*/version_0/checkpoints"))
    assert "optimizer step 8 (global_step=7" in message and "loss is nan" in message
    assert f"last good checkpoint is {ckpt_dir / 'last.ckpt'}" in message and "--ckpt_path" in message
    kept = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 5  # not overwritten after the fault
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in kept["ema"].values())
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "step5.ckpt"]


def test_non_finite_gradient_is_caught_before_the_step():
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.tensor([[1.0, float("inf")]])
    trainer = SimpleNamespace(world_size=1, global_step=41, current_epoch=3, checkpoint_callbacks=[])
    guard = NonFiniteGuard()
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 42 .*gradient norm is inf.*No checkpoint"):
        guard.on_before_optimizer_step(trainer, layer, optimizer=None)
    layer.weight.grad = torch.ones(1, 2)
    guard.on_before_optimizer_step(trainer, layer, optimizer=None)  # finite: nothing happens


# ------------------------------------------------------------------------------------------ signals
class SendSignalAt(Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _tiny_fit(root: Path, steps: int, ckpt_path=None, callbacks=()):
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("moons2d", batch_size=16, n_train=96, seed=0)
    model = FlowMatching(data_shape=dm.data_shape, backbone=TINY, coupling="independent", steps=2, ema_decay=0.9)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=root,
                        callbacks=[ExactCheckpoint(dirpath=root, every_n_train_steps=100), *callbacks])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


def test_sigusr1_writes_a_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        _tiny_fit(tmp_path / "a", 16, callbacks=[SendSignalAt(9, signal.SIGUSR1)])
    assert stopped.value.code in (None, 0)  # a clean exit
    assert signal.getsignal(signal.SIGUSR1) == previous  # handlers given back
    last = tmp_path / "a" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9
    trainer, resumed = _tiny_fit(tmp_path / "b", 16, ckpt_path=last)
    assert trainer.global_step == 16
    _, uninterrupted = _tiny_fit(tmp_path / "c", 16)
    a, b = params_of(resumed), params_of(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_onestep_fit_checkpoints_and_the_run_resumes(tmp_path):
    """A real `onestep fit` process is sent SIGTERM mid-training; it writes last.ckpt and exits with 0, and
    the run resumed from that file ends where an uninterrupted run ends."""
    args = ["fit", "--config", str(REPO / "configs/otnfm"), "--data.dataset", "8gaussians", "--out_dir", str(tmp_path),
            "--model.init_args.backbone", "{name: mlp, hidden: [32, 32]}", "--model.init_args.coupling", "online",
            "--data.batch_size", "64", "--data.n_train", "512", *checkpoint_every(20), *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "onestep.cli", *args, "--trainer.max_steps", "100000"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900  # a hang guard, not a timing check: loaded CI machines are slow
        while not list(tmp_path.glob("*/version_0/checkpoints/step20.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    last = next(tmp_path.glob("*/version_0/checkpoints/last.ckpt"))
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 20 and f"received SIGTERM at step {step}; checkpoint written to {last}" in err

    end = ["--trainer.max_steps", str(step + 8)]
    resumed = run_lightning(args[1:] + end + ["--out_dir", str(tmp_path / "resumed")], run=False)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(last))
    reference = run_lightning(args[1:] + end + ["--out_dir", str(tmp_path / "reference")], run=False)
    reference.trainer.fit(reference.model, datamodule=reference.datamodule)
    assert resumed.trainer.global_step == reference.trainer.global_step == step + 8
    a, b = params_of(resumed.model), params_of(reference.model)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


# ------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    trainer, _ = _tiny_fit(root, 3)
    path = root / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def _broken_copies(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    flipped = bytearray(data)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        flipped[i] ^= 0xFF
    copies = {"truncated": data[: len(data) // 2], "flipped": bytes(flipped), "empty": b"", "text": b"not a ckpt\n"}
    paths = {}
    for name, content in copies.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(content)
    return paths


def test_corrupted_checkpoints_are_named_with_the_fix(good_checkpoint, tmp_path):
    check_checkpoint_file(good_checkpoint)  # a good file passes
    (tmp_path / "earlier.ckpt").write_bytes(good_checkpoint.read_bytes())
    for name, path in _broken_copies(good_checkpoint, tmp_path).items():
        with pytest.raises(CheckpointCorruptedError, match=r"truncated or corrupted.*earlier checkpoint") as err:
            check_checkpoint_file(path)
        assert str(path) in str(err.value) and "earlier.ckpt" in str(err.value), name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint_file(tmp_path / "missing.ckpt")


def test_onestep_fit_refuses_a_truncated_checkpoint_before_training(good_checkpoint, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good_checkpoint.read_bytes()[:-200])
    args = ["fit", "--config", str(REPO / "configs/flow_matching"), "--data.dataset", "moons2d",
            "--out_dir", str(tmp_path / "o"),
            "--trainer.max_steps", "3", "--ckpt_path", str(broken), *QUIET, "--debug"]
    with pytest.raises(ValueError, match=rf"checkpoint {broken} .*truncated or corrupted.*earlier checkpoint"):
        main(args)
    assert not list((tmp_path / "o").rglob("*.ckpt"))


class Opaque:  # an arbitrary class: weights_only loading must refuse it
    pass


def test_weights_only_refusal_is_explained(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "extra": Opaque()}, path)
    with pytest.raises(CheckpointCorruptedError, match="weights_only.*--weights_only false"):
        check_checkpoint_file(path)
    check_checkpoint_file(path, weights_only=False)  # trusted: fine


SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "cell", "SLURM_NODELIST": "node1", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "42", "SLURM_NTASKS_PER_NODE": "1"}


@pytest.mark.parametrize("in_slurm", [True, False])
def test_under_slurm_lightning_does_not_requeue_the_job_itself(tmp_path, monkeypatch, in_slurm):
    """PreemptionCheckpoint answers SIGUSR1; Lightning's SLURM handler would requeue the job a second time on top
    of the job script or submitit (--launcher slurm), so its auto-requeue is off under SLURM."""
    for key, value in SLURM_TASK.items():
        if in_slurm:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    cli = run_lightning(["--config", str(REPO / "configs/flow_matching"), "--data.dataset", "moons2d",
                         "--trainer.max_steps", "1", "--out_dir", str(tmp_path), "--trainer.enable_progress_bar",
                         "false"], run=False)
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == ("SLURMEnvironment" if in_slurm else "LightningEnvironment")
    if in_slurm:
        assert environment.auto_requeue is False
