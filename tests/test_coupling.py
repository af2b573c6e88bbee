"""Couplings: exact assignment, counter-based noise, global and online banks."""

import itertools
import sys

import pytest
import torch

from conftest import fit_quietly
from onestep.data import OneStepDataModule
from onestep.generators import OTNFM, FlowMatching

from onestep.generators.coupling import (
    NoiseBank,
    PairingPipeline,
    hashed_normal,
    minibatch_ot,
    ot_permutation,
    pairwise_sq_dist,
)


def test_ot_permutation_is_optimal_by_brute_force():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    cost = pairwise_sq_dist(x0, x1)
    best = min(sum(cost[p[j], j] for j in range(6)) for p in itertools.permutations(range(6)))
    perm = ot_permutation(x0, x1)
    assert sorted(perm.tolist()) == list(range(6))
    assert torch.isclose(cost[perm, torch.arange(6)].sum(), torch.as_tensor(best), atol=1e-5)


def test_minibatch_ot_lowers_the_pair_cost():
    """N(0, I) to N(0, 25 I) in 2-D: independent cost 2 * (1 + 25) = 52, W2^2 = 2 * (5 - 1)^2 = 32."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(512, 2, generator=g), 5 * torch.randn(512, 2, generator=g)
    before = (x0 - x1).square().sum(1).mean()
    after = (minibatch_ot(x0, x1) - x1).square().sum(1).mean()
    assert abs(before - 52) < 6 and abs(after - 32) < 3.5, (before, after)


def test_hashed_normal_is_standard_normal_and_a_function_of_the_slot():
    z = hashed_normal(torch.arange(20_000), (3,), seed=7)
    assert z.mean().abs() < 0.02 and (z.std() - 1).abs() < 0.02
    assert torch.equal(hashed_normal(torch.tensor([11, 3]), (3,), seed=7), z[[11, 3]])
    assert not torch.equal(hashed_normal(torch.tensor([11]), (3,), seed=8), z[[11]])


def test_online_bank_converges_to_global_ot_cost():
    """The bank's mean pair cost decreases over epochs and ends within 2% of the global OT cost."""
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    data = centres[torch.randint(4, (512,), generator=g)] + 0.3 * torch.randn(512, 2, generator=g)
    exact = NoiseBank(len(data), (2,), seed=3)
    exact.solve_global(data)
    global_cost = exact.mean_pair_cost(data)
    bank = NoiseBank(len(data), (2,), seed=3)
    costs = [bank.mean_pair_cost(data)]
    for _ in range(15):
        for idx in torch.randperm(len(data), generator=g).split(64):
            bank.pair_online(data[idx], idx)
        costs.append(bank.mean_pair_cost(data))
    assert all(b <= a + 1e-6 for a, b in zip(costs, costs[1:])), costs
    assert costs[0] > 1.5 * global_cost
    assert costs[-1] <= 1.02 * global_cost, (costs[-1], global_cost)
    # the bank stays a bijection onto the slots
    assert sorted(bank.slot_of.flatten().tolist()) == list(range(len(data)))


def test_online_pair_returns_the_noise_it_stores():
    data = torch.randn(32, 2)
    bank = NoiseBank(32, (2,), slots=2, seed=0)
    idx = torch.arange(8, 24)
    x0 = bank.pair_online(data[idx], idx, generator=torch.Generator().manual_seed(0))
    stored = hashed_normal(bank.slot_of[idx].flatten(), (2,), 0).view(16, 2, 2)
    assert all(any(torch.allclose(x0[i], stored[i, c]) for c in range(2)) for i in range(16))


def test_global_coupling_refuses_large_sets():
    with pytest.raises(ValueError, match="online"):
        NoiseBank(50, (2,)).solve_global(torch.randn(50, 2), max_size=10)


# ---------------------------------------------------------------------- pairing one batch ahead
def test_pairing_pipeline_returns_the_exact_pairing_of_the_submitted_batch():
    g = torch.Generator().manual_seed(3)
    pipeline = PairingPipeline((2,), seed=5)
    batches = [(3 * torch.randn(64, 2, generator=g), torch.randperm(1000, generator=g)[:64]) for _ in range(3)]
    for k, (x1, idx) in enumerate(batches):
        pipeline.submit(x1, idx, draw=idx + 1000 * k)
    x1, idx = batches[1]
    x0 = hashed_normal(idx + 1000, (2,), seed=5)
    expected = x0[ot_permutation(x0, x1)]
    assert torch.equal(pipeline.take(idx), expected)  # the first batch was skipped (never trained on)
    assert pipeline.take(batches[0][1]) is None  # ... and dropped: asking for it later is a miss
    assert (pipeline.hits, pipeline.misses) == (1, 1)
    pipeline.close()


def test_pairing_pipeline_keeps_a_bounded_queue_and_copies_without_its_thread():
    import copy
    pipeline = PairingPipeline((2,), seed=0)
    for k in range(PairingPipeline.max_pending + 3):
        pipeline.submit(torch.randn(8, 2), torch.arange(8) + 8 * k, torch.arange(8) + 8 * k)
    assert len(pipeline._pending) == PairingPipeline.max_pending
    clone = copy.deepcopy(pipeline)
    assert clone.take(torch.arange(8)) is None and clone.seed == 0
    pipeline.close()


@pytest.mark.parametrize("make", [
    lambda: OTNFM(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]}, coupling="minibatch"),
    lambda: FlowMatching(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]}, coupling="minibatch"),
], ids=["otnfm", "flow_matching"])
def test_training_takes_every_pairing_from_the_pipeline_and_pairs_optimally(make, monkeypatch):
    """With OneStepDataModule every step's batch was solved ahead (no inline fallback), and the pairs the
    loss sees are the exact OT assignment of the batch (re-solving them cannot lower their cost)."""
    torch.manual_seed(0)
    model, pairs = make(), []
    module = sys.modules["onestep.generators.coupling"]  # PrefetchedPairing.minibatch_noise calls it there
    original = module.paired_noise

    def spy(x1, idx, pipeline):
        x0 = original(x1, idx, pipeline)
        pairs.append((x0, x1))
        return x0

    monkeypatch.setattr(module, "paired_noise", spy)
    fit_quietly(model, OneStepDataModule("8gaussians", batch_size=64, n_train=512), steps=12)
    assert (model._pairing.hits, model._pairing.misses) == (12, 0) and len(pairs) == 12
    for x0, x1 in pairs:
        cost = pairwise_sq_dist(x0, x1)
        assert torch.allclose(cost.diagonal().sum(), cost[ot_permutation(x0, x1), torch.arange(64)].sum())
        assert cost.diagonal().sum() < 0.8 * cost.sum() / 64  # far below a random pairing's cost


def test_prefetch_off_or_loader_workers_pair_inline():
    model = OTNFM(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]}, prefetch_pairing=False)
    fit_quietly(model, OneStepDataModule("8gaussians", batch_size=64, n_train=256), steps=2)
    assert model._pairing is None
    model = OTNFM(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]})
    fit_quietly(model, OneStepDataModule("8gaussians", batch_size=64, n_train=256, num_workers=1), steps=2)
    assert model._pairing is None  # a worker process could not reach the model's queue


def test_the_next_batch_is_submitted_before_the_current_one_is_trained(monkeypatch):
    """The overlap itself: when step s takes its pairing, batch s + 1 has already been collated and handed
    to the background thread (Lightning does not prefetch a loader with a length; the data module does)."""
    events = []
    submit, take = PairingPipeline.submit, PairingPipeline.take
    monkeypatch.setattr(PairingPipeline, "submit", lambda self, x1, idx, draw: (events.append("submit"),
                                                                               submit(self, x1, idx, draw))[1])
    monkeypatch.setattr(PairingPipeline, "take", lambda self, idx: (events.append("take"), take(self, idx))[1])
    model = OTNFM(data_shape=(2,), backbone={"name": "mlp", "hidden": [16]})
    fit_quietly(model, OneStepDataModule("8gaussians", batch_size=64, n_train=256), steps=6)  # 1.5 epochs
    takes = [i for i, e in enumerate(events) if e == "take"]
    assert len(takes) == 6 and model._pairing.misses == 0
    for step, position in enumerate(takes):
        submitted = events[:position].count("submit")
        assert submitted >= step + 2 or step in (3, 5), (step, events)  # ahead, except at a pass's last batch
