"""Flow matching and OT-NFM: the behaviour the foundation issue promises."""

import lightning as L
import pytest
import torch

from conftest import fit_quietly
from onestep.data import OneStepDataModule
from onestep.generators import OTNFM, FlowMatching
from onestep.metrics import wasserstein2

SMALL_MLP = {"name": "mlp", "hidden": [128, 128]}


def total_variance(x: torch.Tensor) -> float:
    return float(x.var(0).sum())


@pytest.mark.parametrize("coupling", ["independent", "minibatch"])
def test_mean_collapse_depends_on_the_coupling(coupling):
    """The paper's central claim: independent pairs collapse one-step samples to the data mean."""
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("8gaussians", batch_size=256, n_train=4096, seed=0)
    model = OTNFM(data_shape=dm.data_shape, backbone=SMALL_MLP, coupling=coupling, ema_decay=0.99)
    fit_quietly(model, dm, steps=300)
    samples = model.sample(2000, generator=torch.Generator().manual_seed(1))
    ratio = total_variance(samples) / total_variance(dm.reference("test", 2000))
    if coupling == "independent":
        assert ratio < 0.2, ratio
        assert samples.mean(0).norm() < 1.0  # everything sits at the data mean (0 for 8gaussians)
    else:
        assert ratio > 0.6, ratio


def test_flow_matching_50_euler_steps_beats_untrained_3x():
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("8gaussians", batch_size=256, n_train=4096, seed=0)
    model = FlowMatching(data_shape=dm.data_shape, backbone=SMALL_MLP, steps=50, ema_decay=0.99, lr=2e-3)
    dm.setup()
    ref = dm.reference("test", 1000)
    w2_untrained = wasserstein2(model.sample(1000, generator=torch.Generator().manual_seed(0)), ref)
    fit_quietly(model, dm, steps=1000)
    w2_trained = wasserstein2(model.sample(1000, generator=torch.Generator().manual_seed(0)), ref)
    assert model.nfe == 50
    assert w2_trained * 3 < w2_untrained, (w2_trained, w2_untrained)


def test_heun_costs_two_evaluations_per_step():
    model = FlowMatching(data_shape=(2,), backbone=SMALL_MLP, steps=10, sampler="heun")
    calls = []
    model.net.register_forward_hook(lambda *a: calls.append(1))
    model.sample(4)
    assert model.nfe == 20 and len(calls) == 20


def test_flow_map_is_identity_at_time_zero_and_one_step():
    model = OTNFM(data_shape=(2,), backbone=SMALL_MLP)
    x = torch.randn(16, 2)
    assert torch.equal(model.phi(x, 0.0), x)
    calls = []
    model.flow.register_forward_hook(lambda *a: calls.append(1))
    assert model.sample(8).shape == (8, 2) and len(calls) == 1 and model.nfe == 1


@pytest.mark.parametrize("coupling", ["global", "online"])
def test_bank_couplings_train_and_lower_the_pair_cost(coupling):
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("8gaussians", batch_size=128, n_train=512, seed=0)
    model = OTNFM(data_shape=dm.data_shape, backbone=SMALL_MLP, coupling=coupling)
    fit_quietly(model, dm, steps=40)
    cost = model.bank.mean_pair_cost(dm.train_data)
    independent = float((torch.randn(512, 2) - dm.train_data).square().sum(1).mean())
    assert cost < 0.8 * independent
    state = model.state_dict()
    assert "bank.slot_of" in state  # the coupling is part of the checkpoint


def test_sampling_is_reproducible_with_a_generator():
    model = OTNFM(data_shape=(2,), backbone=SMALL_MLP)
    a = model.sample(32, generator=torch.Generator().manual_seed(5))
    b = model.sample(32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    c = model.sample_chunked(32, chunk_size=7, generator=torch.Generator().manual_seed(5))
    d = model.sample_chunked(32, chunk_size=7, generator=torch.Generator().manual_seed(5))
    assert c.shape == a.shape and torch.equal(c, d)


@pytest.mark.parametrize("kwargs, match", [
    ({"coupling": "sinkhorn"}, "coupling"),
    ({"p_t1": 1.5}, "p_t1"),
    ({"lr": 0.0}, "lr"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"backbone": {"name": "unet"}}, "unet"),
])
def test_otnfm_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OTNFM(data_shape=(2,), **kwargs)


@pytest.mark.parametrize("kwargs, match", [({"steps": 0}, "steps"), ({"sampler": "rk4"}, "sampler")])
def test_flow_matching_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatching(data_shape=(2,), **kwargs)


def test_global_coupling_refuses_a_large_training_set():
    dm = OneStepDataModule("8gaussians", batch_size=64, n_train=300, seed=0)
    model = OTNFM(data_shape=(2,), backbone=SMALL_MLP, coupling="global", global_max_size=100)
    with pytest.raises(ValueError, match="global_max_size"):
        fit_quietly(model, dm, steps=1)
