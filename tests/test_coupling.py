"""Couplings: exact assignment, counter-based noise, global and online banks."""

import itertools

import pytest
import torch

from onestep.generators.coupling import NoiseBank, hashed_normal, minibatch_ot, ot_permutation, pairwise_sq_dist


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
