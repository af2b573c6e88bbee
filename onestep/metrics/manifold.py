"""Distance-to-manifold statistics for synthetic data with a known noiseless support.

Given d_i = dist(x_i, M) (Euclidean, raw units; ``Manifold.distance``) for generated samples x_i::

    mean = (1/n) sum_i d_i
    median, p95 = empirical 50% / 95% quantiles (linear interpolation between order statistics,
                  numpy's default; the median of an even count is the mean of the two middle values)
    offmanifold = (1/n) #{i : d_i > threshold}        (threshold default 0.1 raw units)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def manifold_distance_stats(distances: Tensor, threshold: float = 0.1) -> dict[str, Tensor]:
    """``{"mean", "median", "p95", "offmanifold"}`` of a vector of distances (0-d float64 tensors)."""
    d = distances.detach().reshape(-1).to(torch.float64)
    if d.numel() == 0:
        raise ValueError("manifold_distance_stats needs at least one distance")
    q = torch.quantile(d, torch.tensor([0.5, 0.95], dtype=torch.float64, device=d.device))
    return {"mean": d.mean(), "median": q[0], "p95": q[1],
            "offmanifold": (d > threshold).to(torch.float64).mean()}


class ManifoldDistance(Metric):
    """Stores ``distance_fn(samples)`` per update (cat state) and returns :func:`manifold_distance_stats`."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, distance_fn: Callable[[Tensor], Tensor], threshold: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.distance_fn, self.threshold = distance_fn, threshold
        self.add_state("distances", default=[], dist_reduce_fx="cat")

    def update(self, samples: Tensor) -> None:
        self.distances.append(self.distance_fn(samples).detach().reshape(-1).to(torch.float64))

    def compute(self) -> dict[str, Tensor]:
        return manifold_distance_stats(dim_zero_cat(self.distances), self.threshold)
