r"""The characteristic generator's vector-mode loss (the paper's characteristic fitting, eq. 2.11).

Gaussian starts :math:`Z_0 \sim N(0, I)` are carried along the grid :math:`t_0 < \dots < t_{K-1}` (plus
``t = 1`` when ``t_max < 1``) by teacher steps (no grad). The loss is

.. math::  L = E_{(k, l)} \|Z_l - g(t_k, t_l, Z_k)\|^2
           + \lambda\, E_{(k, j, l)} \|g(t_j, t_l, g(t_k, t_j, Z_k)) - g(t_k, t_l, Z_k)\|^2 ,

with ``pairs_per_trajectory`` pairs (and as many triples) per trajectory, on ``trajectory_batch``
trajectories per step (default: the batch size; the data batch itself is not used, only its size). Pairs :math:`k < l` are drawn by
``pair_sampling``:

* ``uniform``: uniform over the :math:`K(K-1)/2` ordered pairs (eq. 2.11 as written). The one map that
  one-step sampling uses, :math:`(0 \to K-1)`, is then one draw in :math:`K(K-1)/2` (1275 at K = 51);
* ``long``: the jump :math:`n = l - k \in \{1..K-1\}` with :math:`P(n) \propto n`, then
  :math:`k \sim U\{0..K-1-n\}` (the authors' image recipe draws its teacher step count the same way).
  The pair :math:`(0, K-1)` then has probability :math:`2/K` (1 in 25.5 at K = 51); every pair keeps a
  positive probability, so the fitted map is the same at the optimum, only the weighting changes.

Triples are uniform over :math:`k < j < l`.

Speed: the pairs and triples are drawn *before* the teacher runs, and the teacher trajectory is
integrated only up to the last grid index any of them uses. The teacher draws no random numbers, so the
random stream, the pairs and the loss are bit-for-bit those of integrating the whole grid. (With
hundreds of pairs per step the last index is nearly always the end of the grid, so this saves little;
the teacher's 50 steps, ~70% of a 2-D student step, shrink with ``trajectory_batch`` instead, which
changes the estimator: fewer trajectories, more pairs on each.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from onestep.generators.characteristic_teacher import CharacteristicModel


PAIR_SAMPLINGS = ("uniform", "long")


def ordered_subsets(rows: int, n_times: int, count: int, device: torch.device) -> list[Tensor]:
    """``count`` sorted grid indices per row, a uniformly random ``count``-subset of ``range(n_times)``."""
    picks = torch.rand(rows, n_times, device=device).argsort(dim=1)[:, :count].sort(dim=1).values
    return list(picks.unbind(dim=1))


def long_jump_pairs(rows: int, n_times: int, device: torch.device) -> list[Tensor]:
    """Pairs ``k < l`` with the jump ``n = l - k`` drawn as ``P(n) ∝ n`` and ``k ~ U{0..n_times-1-n}``."""
    weights = torch.arange(1, n_times, dtype=torch.float32, device=device)
    jump = torch.multinomial(weights, rows, replacement=True) + 1
    start = (torch.rand(rows, device=device) * (n_times - jump)).long().clamp_max(n_times - 1 - jump)
    return [start, start + jump]


def draw_pairs(scheme: str, rows: int, n_times: int, device: torch.device) -> list[Tensor]:
    if scheme == "long":
        return long_jump_pairs(rows, n_times, device)
    return ordered_subsets(rows, n_times, 2, device)


def vector_loss(gen: CharacteristicModel, x1: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of the module docstring for one batch (only its size, dtype and device are used)."""
    times = gen.grid_times().to(x1)
    n_times, device = len(times), x1.device
    batch = gen.trajectory_batch or len(x1)
    z = torch.randn(batch, *x1.shape[1:], dtype=x1.dtype, device=device)
    rows = torch.arange(batch, device=device).repeat(gen.pairs_per_trajectory)
    k, l = draw_pairs(gen.pair_sampling, len(rows), n_times, device)
    use_semigroup = gen.semigroup_weight > 0 and n_times >= 3
    triple = ordered_subsets(len(rows), n_times, 3, device) if use_semigroup else []
    last = max([int(l.max())] + [int(idx.max()) for idx in triple])
    trajectory = torch.stack(gen.teacher_trajectory(z, times[: last + 1].tolist()))

    fit = (gen.map(trajectory[k, rows], times[k], times[l]) - trajectory[l, rows]).square().mean()
    logs = {"fit": fit.detach()}
    loss = fit
    if use_semigroup:
        k, j, l = triple
        start = trajectory[k, rows]
        direct = gen.map(start, times[k], times[l])
        two_step = gen.map(gen.map(start, times[k], times[j]), times[j], times[l])
        semigroup = (two_step - direct).square().mean()
        loss = loss + gen.semigroup_weight * semigroup
        logs["semigroup"] = semigroup.detach()
    return loss, logs
