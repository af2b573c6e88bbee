"""Precision, recall, density and coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020).

Real features X = {x_i} (N), fake features Y = {y_j} (M), k nearest neighbours. ``r_i`` is the distance
from x_i to its k-th nearest *other* real point, ``s_j`` likewise for y_j among fakes, and
B(c, r) = {z : ||z - c|| <= r} (closed ball)::

    precision = (1/M) #{j : y_j in U_i B(x_i, r_i)}        share of fakes on the real manifold
    recall    = (1/N) #{i : x_i in U_j B(y_j, s_j)}        share of reals on the fake manifold
    density   = 1/(k M) sum_j #{i : y_j in B(x_i, r_i)}    (can exceed 1)
    coverage  = (1/N) #{i : min_j ||x_i - y_j|| <= r_i}    share of real balls holding a fake

A mode-collapsed generator has precision near 1 and recall near 0; do not swap the two.
Distances are float64 and computed ``chunk_size`` rows at a time against the other set (three passes:
real-real and fake-fake for the radii, then fake-real once for all four numbers), so memory is
O(chunk_size * max(N, M)) instead of O(N * M) (10k x 10k never materialises); the result does not
depend on the chunk size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from onestep.metrics.wasserstein import TwoSampleMetric, flat64


def _squared_distances(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """||a_i - b_j||^2 = |a_i|^2 + |b_j|^2 - 2 a_i.b_j (one fused addmm; clipped at 0)."""
    return torch.addmm(b_sq[None, :], a, b.T, alpha=-2.0).add_(a_sq[:, None]).clamp_min_(0.0)


def knn_radii(x: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row (self excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {x.shape[0]}")
    x_sq = (x * x).sum(1)
    radii = []
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        d2 = _squared_distances(x[start:stop], x, x_sq[start:stop], x_sq)
        rows = torch.arange(stop - start, device=x.device)
        d2[rows, rows + start] = float("inf")  # exclude the point itself (not just any zero distance)
        radii.append(d2.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def prdc(real: Tensor, fake: Tensor, k: int = 5, chunk_size: int = 1024) -> dict[str, Tensor]:
    """``{"precision", "recall", "density", "coverage"}`` (0-d float64 tensors) of ``fake`` against ``real``."""
    real, fake = flat64(real), flat64(fake).to(real.device)
    real_r2, fake_r2 = knn_radii(real, k, chunk_size), knn_radii(fake, k, chunk_size)
    real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
    in_real_balls = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)  # per fake
    nearest_fake = torch.full((real.shape[0],), float("inf"), dtype=torch.float64, device=real.device)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)  # per real
    for start in range(0, fake.shape[0], chunk_size):  # one pass over the (M, N) fake-real distances
        stop = min(start + chunk_size, fake.shape[0])
        d2 = _squared_distances(fake[start:stop], real, fake_sq[start:stop], real_sq)  # (chunk, N)
        in_real_balls[start:stop] = (d2 <= real_r2[None, :]).sum(1).to(torch.float64)
        recalled |= (d2 <= fake_r2[start:stop, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d2.min(0).values)
    return {
        "precision": (in_real_balls > 0).to(torch.float64).mean(),
        "recall": recalled.to(torch.float64).mean(),
        "density": in_real_balls.sum() / (k * fake.shape[0]),
        "coverage": (nearest_fake <= real_r2).to(torch.float64).mean(),
    }


class PRDC(TwoSampleMetric):
    """:func:`prdc` as a torchmetrics ``Metric`` with cat states: ``update(fake=..., real=...)``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, k: int = 5, chunk_size: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.k, self.chunk_size = k, chunk_size

    def compute(self) -> dict[str, Tensor]:
        fake, real = self._samples()
        return prdc(real, fake, self.k, self.chunk_size)
