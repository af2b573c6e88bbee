"""The base's manual-optimisation path (several optimisers): the EMA, the step budget, the schedule and clipping
helpers, the refusal to score a never-updated EMA, and the GAN trained through ``onestep fit``.

``MomentMatcher`` is a tiny two-optimiser plugin: an auxiliary parameter ``target`` learns the data's mean and
spread (its own optimiser, not a training step) and the generator ``G(z) = scale * z + shift`` matches them. Its
generator starts with ``scale = 0.01``: every sample near the origin, W2 about 5 on 8gaussians (the reported
bug's number)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import lightning as L
import pytest
import torch
from torch import nn

from onestep.callbacks import EvaluationCallback
from onestep.data import OneStepDataModule
from onestep.generators.base import OneStepGenerator
from conftest import REPO, fit_quietly


class MomentMatcher(OneStepGenerator):
    def __init__(self, data_shape: Sequence[int] = (2,), use_helpers: bool = True, **base):
        super().__init__(data_shape=data_shape, **base)
        self.automatic_optimization = False
        self.use_helpers = use_helpers
        self.scale = nn.Parameter(torch.full((2,), 0.01))
        self.shift = nn.Parameter(torch.zeros(2))
        self.target = nn.Parameter(torch.zeros(2, 2))  # row 0: mean, row 1: std of the data
        self.generator_updates = 0
        self.grad_norms: list[float] = []

    def generate(self, n, generator=None):
        return self.scale * self.randn(n, generator=generator) + self.shift

    def configure_optimizers(self):
        opt_g = self.make_optimizer([self.scale, self.shift])
        opt_aux = self.make_optimizer([self.target])
        return [opt_g, opt_aux], [self.make_scheduler(opt_g), self.make_scheduler(opt_aux)]

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_aux = self.optimizers()
        aux_loss = (self.target - torch.stack([x.mean(0), x.std(0)])).pow(2).sum()
        fake = self.generate(len(x))
        g_loss = (torch.stack([fake.mean(0), fake.std(0)]) - self.target.detach()).pow(2).sum()
        if self.use_helpers:
            self.clip_and_step(opt_aux, aux_loss)
            self.generator_step(g_loss)
        else:  # a plugin that steps by hand and forgets ema_update()
            for opt, loss in ((opt_aux, aux_loss), (opt_g, g_loss)):
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
        self.generator_updates += 1
        return g_loss.detach()

    def on_before_optimizer_step(self, optimizer):  # the gradient norm the step sees (after clipping)
        grads = [p.grad for p in (self.scale, self.shift) if p.grad is not None]
        if grads and any(p is self.scale for g in optimizer.param_groups for p in g["params"]):
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


def toy_data():
    return OneStepDataModule("8gaussians", batch_size=64, n_train=512, n_val=64, n_test=256, seed=0)


def evaluation(every: int | None = None) -> EvaluationCallback:
    return EvaluationCallback(every_n_steps=every, n_samples=256, pictures=False, sw_projections=16)


def test_two_optimizer_evaluation_improves_as_it_trains_and_counts_generator_steps(tmp_path):
    torch.manual_seed(0)
    model, callback = MomentMatcher(lr=0.05, ema_decay=0.9), evaluation(every=30)
    trainer = fit_quietly(model, toy_data(), 60, callbacks=[callback], default_root_dir=tmp_path)
    assert model.generator_updates == 60 and trainer.global_step == 60  # the aux steps are not counted
    torch.manual_seed(0)
    start = callback.compute_metrics(trainer, MomentMatcher())[0]["eval/w2"]  # the same model at step 0
    middle, final = (record["metrics"]["eval/w2"] for record in callback.history)
    assert [r["step"] for r in callback.history] == [30, 60]
    assert start > 4.0 and final < middle < start - 0.5 and final < 2.5, (start, middle, final)
    assert model._ema_updates == 60


def test_max_steps_counts_generator_updates_with_and_without_helpers():
    for use_helpers in (True, False):
        model = MomentMatcher(use_helpers=use_helpers, ema_decay=0.0)
        trainer = fit_quietly(model, toy_data(), 20)
        assert model.generator_updates == 20 and trainer.global_step == 20
        # the auxiliary optimiser stepped as often, its moments say so
        assert int(trainer.optimizers[1].state_dict()["state"][0]["step"]) == 20


def test_a_manual_plugin_that_never_updates_the_ema_is_refused_at_evaluation(tmp_path):
    model = MomentMatcher(use_helpers=False, lr=0.05, ema_decay=0.99)
    with pytest.raises(ValueError, match=r"never updated in 5 training steps.*self\.ema_update\(\).*ema_decay: 0"):
        fit_quietly(model, toy_data(), 5, callbacks=[evaluation(every=5)], default_root_dir=tmp_path)
    model = MomentMatcher(use_helpers=False, ema_decay=0.99)  # the final evaluation too
    with pytest.raises(ValueError, match="never updated"):
        fit_quietly(model, toy_data(), 3, callbacks=[evaluation()], default_root_dir=tmp_path)


def test_onestep_evaluate_refuses_a_checkpoint_whose_ema_was_never_updated(tmp_path, capsys):
    from onestep.cli import main

    argv = ["fit", "--model", "test_manual_optimization.MomentMatcher", "--model.init_args.use_helpers", "false",
            "--model.init_args.ema_decay", "0.99", "--data.n_train", "256", "--data.batch_size", "64",
            "--trainer.max_steps", "3", "--eval.at_end", "false", "--eval.every_n_steps", "0",
            "--trainer.enable_progress_bar", "false", "--out_dir", str(tmp_path)]
    assert main(argv) == 0  # no evaluation during training: the stale EMA goes unnoticed until scored
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--eval.n_samples", "64", "--eval.pictures", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never updated in 3 training steps" in err[0] and "ema_update()" in err[0], err


def test_ema_decay_zero_samples_the_live_weights_and_checkpoints_them(tmp_path):
    torch.manual_seed(0)
    model = MomentMatcher(use_helpers=False, lr=0.05, ema_decay=0.0)  # no ema_update(): nothing stale is read
    callback = evaluation()
    trainer = fit_quietly(model, toy_data(), 20, callbacks=[callback], default_root_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    live = model.sample(64, generator=g, use_ema=False)
    assert torch.equal(model.sample(64, generator=torch.Generator().manual_seed(1)), live)
    start = callback.compute_metrics(trainer, MomentMatcher())[0]["eval/w2"]  # the initial weights' score
    assert callback.final_metrics["eval/w2"] < start - 0.3, (start, callback.final_metrics["eval/w2"])
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert torch.equal(checkpoint["ema"]["scale"], model.scale.detach())


def test_schedule_and_clipping_apply_through_the_helpers():
    model = MomentMatcher(lr=0.1, lr_schedule="cosine", warmup_steps=4, grad_clip=0.01, ema_decay=0.0)
    trainer = fit_quietly(model, toy_data(), 8)
    # both schedules advanced once per generator step: warm-up 4, then cosine to 0 at step 8
    factor = 0.5 * (1 + math.cos(math.pi * (8 - 4) / 4))
    for opt in trainer.optimizers:
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor, abs=1e-12)
    assert len(model.grad_norms) == 8 and max(model.grad_norms) <= 0.01 + 1e-6


def test_gan_fit_on_8gaussians_beats_an_untrained_generator(tmp_path):
    from onestep.cli import main

    steps = 400  # with 2x64 MLPs instead of the config's 3x256: seconds, not a minute
    argv = ["fit", "--config", str(REPO / "configs/gan/vector.yaml"), "--data.dataset", "8gaussians",
            "--model.init_args.backbone", "{name: mlp, hidden: [64, 64]}",
            "--trainer.max_steps", str(steps), "--eval.every_n_steps", "0", "--eval.n_samples", "500",
            "--eval.pictures", "false", "--trainer.enable_progress_bar", "false", "--out_dir", str(tmp_path),
            "--checkpoint_every", str(steps)]
    assert main(argv) == 0
    records = [json.loads(line) for line in next(tmp_path.rglob("eval.jsonl")).read_text().splitlines()]
    assert records[-1]["step"] == steps
    w2 = records[-1]["metrics"]["eval/w2"]
    assert w2 < 1.5, w2  # an untrained generator scores about 5; measured 1.16 at 400 steps (200: 1.94)
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["ema_updates"] == steps and ckpt["global_step"] == steps
    # the EMA averages the generator only: sampling never reads the discriminator
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])
    assert ckpt["ema"] and not any(k.startswith("discriminator.") for k in ckpt["ema"]), sorted(ckpt["ema"])


def test_gan_refuses_a_command_line_optimizer_before_training(tmp_path, capsys):
    from onestep.cli import main

    argv = ["fit", "--config", str(REPO / "configs/gan/vector.yaml"), "--optimizer", "Adam",
            "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false", "--out_dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--optimizer/--lr_scheduler" in err[0] and "manual optimisation" in err[0], err
    assert not list(tmp_path.rglob("*.ckpt"))
