"""The cheaper training step keeps its guarantees: training values are logged on the steps the loggers
write (and the last), the EMA is still the exponential average (one fused update), ``ema_decay: 0`` shares
the live weights instead of copying them, and the non-finite guard's fused gradient norm is the global norm
(in float32 at least, so float16 gradients do not overflow it)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from onestep.callbacks.fault import _global_norm
from onestep.data import OneStepDataModule
from onestep.generators import FlowMatching
from conftest import fit_quietly

NET = {"name": "mlp", "hidden": [16], "time_embedding": "raw"}


def small_fm(**options) -> FlowMatching:
    return FlowMatching(data_shape=(2,), backbone=NET, coupling="independent", steps=2, **options)


@pytest.mark.parametrize("every, steps, logged", [(5, 12, [5, 10, 12]), (4, 8, [4, 8]), (50, 3, [3])])
def test_training_values_are_logged_on_the_logging_steps_and_the_last(tmp_path, every, steps, logged):
    model = small_fm()
    calls: list[int] = []
    log = model.log

    def counting_log(name, value, *args, **kwargs):
        if name == "train/loss":
            calls.append(model.trainer.fit_loop.epoch_loop._batches_that_stepped + 1)
        return log(name, value, *args, **kwargs)

    model.log = counting_log
    dm = OneStepDataModule("8gaussians", batch_size=32, n_train=256)
    trainer = fit_quietly(model, dm, steps, log_every_n_steps=every, logger=CSVLogger(tmp_path))
    assert calls == logged
    assert "train/loss" in trainer.callback_metrics and "train/pair_cost" in trainer.callback_metrics


def test_the_fused_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    model = small_fm(ema_decay=0.9)
    model._ensure_ema()  # the average starts from the initial weights
    start = {n: p.detach().clone() for n, p in model._trainable().items()}
    expected = dict(start)
    for step in (1, 2, 50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = model.ema_decay_at(step)
        expected = {n: decay * expected[n] + (1 - decay) * p.detach() for n, p in model._trainable().items()}
        model.ema_update(step)
    for name, value in model._ensure_ema().items():
        torch.testing.assert_close(value, expected[name])
        assert not torch.equal(value, start[name])


def test_ema_decay_zero_shares_the_live_weights_and_averaging_resumes_apart_from_them():
    model = small_fm(ema_decay=0.0)
    model.ema_update(1)
    params = model._trainable()
    ema = model._ensure_ema()
    assert all(ema[n].data_ptr() == p.data_ptr() for n, p in params.items())  # nothing copied
    model.ema_decay = 0.5  # a later stage (or a changed option) that averages again
    model.ema_update(100)
    before = {n: v.clone() for n, v in ema.items()}
    assert all(ema[n].data_ptr() != p.data_ptr() for n, p in params.items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(ema[n], before[n]) for n in ema)  # the average no longer moves with the weights
    model.ema_update(101)
    for name, p in params.items():
        torch.testing.assert_close(ema[name], 0.5 * before[name] + 0.5 * p.detach())


def test_the_fused_gradient_norm_is_the_global_norm_and_does_not_overflow_in_float16():
    torch.manual_seed(0)
    grads = [torch.randn(7, 3), torch.randn(5), torch.randn(2, 2, 2)]
    whole = torch.cat([g.flatten() for g in grads]).norm()
    torch.testing.assert_close(_global_norm(grads), whole)
    big = [torch.full((10_000,), 1000.0, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]
    norm = _global_norm(big)  # 1e5: beyond float16's 65504, finite in float32
    assert torch.isfinite(norm) and norm == pytest.approx(1e5, rel=1e-3)
    assert not torch.isfinite(_global_norm([torch.tensor([float("nan")]), torch.ones(2)]))
