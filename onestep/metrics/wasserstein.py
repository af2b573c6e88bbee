"""Exact and sliced 2-Wasserstein distances between empirical measures, in raw units.

W2 (exact)::

    W2(x, y)^2 = min_{P in U(a, b)} sum_ij P_ij ||x_i - y_j||^2,   a = 1/n, b = 1/m (uniform weights)

solved by the network simplex (``ot.emd2``) on the float64 squared-Euclidean cost. The cost matrix is
n x m, so each side is subsampled to at most ``max_samples`` points: the kept indices are the first
``max_samples`` of ``torch.randperm(n)`` drawn from a CPU generator seeded with ``seed`` (for ``x``) and
``seed + 1`` (for ``y``). With ``n <= max_samples`` every point is used and the result is exact.

Sliced W2 (SW2)::

    SW2(x, y)^2 = E_theta [ W2(<theta, x>, <theta, y>)^2 ],   theta uniform on the unit sphere

estimated with ``n_projections`` directions (Gaussian vectors normalised, float64, seeded). Each 1-D
term is exact: for uniform empirical measures ``W2^2 = int_0^1 |F^-1(t) - G^-1(t)|^2 dt`` where the
quantile functions are step functions, so the integral is a finite sum over the merged breakpoints
``{i/n} U {j/m}`` (this handles n != m without approximation; for n == m it is the sorted matching).
For isotropic differences (a translation, a common scaling) ``SW2 = W2 / sqrt(D)``.
"""
from __future__ import annotations

import ot
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def flat64(x: Tensor) -> Tensor:
    """``(n, ...) -> (n, D)`` float64, detached: the layout every sample-based metric computes in."""
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def _subsample(x: Tensor, max_samples: int | None, seed: int) -> Tensor:
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return x[idx.to(x.device)]


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """float64 matrix of ||x_i - y_j||^2 (difference form for small D, Gram form otherwise)."""
    x, y = flat64(x), flat64(y)
    if x.shape[1] <= 16:
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return d2.clamp_min_(0.0)


def wasserstein2(x: Tensor, y: Tensor, max_samples: int | None = 2048, seed: int = 0) -> Tensor:
    """Exact W2 between the empirical measures of ``x (n, ...)`` and ``y (m, ...)``; 0-d float64 tensor."""
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("wasserstein2 needs at least one sample on each side")
    x = _subsample(flat64(x), max_samples, seed)
    y = _subsample(flat64(y), max_samples, seed + 1)
    cost = squared_distances(x, y).cpu().numpy()
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64).numpy()
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64).numpy()
    w2_squared = ot.emd2(a, b, cost, numItermax=max(1_000_000, 50 * x.shape[0] * y.shape[0]))
    return torch.tensor(float(w2_squared), dtype=torch.float64).clamp_min(0.0).sqrt()


def wasserstein2_1d_squared(u: Tensor, v: Tensor) -> Tensor:
    """Exact squared W2 between uniform empirical measures on the line, column by column.

    ``u (n, P)``, ``v (m, P)`` -> ``(P,)``: the integral of the squared difference of the two step
    quantile functions over the merged breakpoints."""
    n, m = u.shape[0], v.shape[0]
    u, v = u.sort(dim=0).values, v.sort(dim=0).values
    if n == m:
        return ((u - v) ** 2).mean(0)
    # breakpoints i/n and j/m compared exactly as integers i*m and j*n on the common grid 1/(n*m)
    grid = torch.unique(torch.cat([torch.arange(n + 1, device=u.device) * m,
                                   torch.arange(m + 1, device=u.device) * n]))
    weights = (grid[1:] - grid[:-1]).to(torch.float64) / (n * m)
    left = grid[:-1]  # on [left, right) the quantile indices are floor(left / m) and floor(left / n)
    iu, iv = torch.div(left, m, rounding_mode="floor"), torch.div(left, n, rounding_mode="floor")
    return (weights[:, None] * (u[iu] - v[iv]) ** 2).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> Tensor:
    """Sliced W2 between the empirical measures of ``x`` and ``y``; 0-d float64 tensor (raw units)."""
    x, y = flat64(x), flat64(y)
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_wasserstein needs at least one sample on each side")
    theta = torch.randn(x.shape[1], n_projections, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return wasserstein2_1d_squared(x @ theta, y.to(x.device) @ theta).mean().clamp_min(0.0).sqrt()


class TwoSampleMetric(Metric):
    """Cat states ``fake`` and ``real``: each process adds its share; ``compute`` sees the concatenation
    in rank order (identical on every rank, identical to one process holding all the data in that order)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")

    def update(self, fake: Tensor | None = None, real: Tensor | None = None) -> None:
        if fake is not None:
            self.fake.append(flat64(fake))
        if real is not None:
            self.real.append(flat64(real))

    def _samples(self) -> tuple[Tensor, Tensor]:
        if not len(self.fake) or not len(self.real):  # list or tensor after sync
            raise RuntimeError(f"{type(self).__name__}.compute() needs both fake and real samples")
        return dim_zero_cat(self.fake), dim_zero_cat(self.real)


class Wasserstein2(TwoSampleMetric):
    """:func:`wasserstein2` as a torchmetrics ``Metric``: ``update(fake=..., real=...)``."""

    def __init__(self, max_samples: int | None = 2048, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.max_samples, self.seed = max_samples, seed

    def compute(self) -> Tensor:
        return wasserstein2(*self._samples(), max_samples=self.max_samples, seed=self.seed)


class SlicedWasserstein2(TwoSampleMetric):
    """:func:`sliced_wasserstein` as a torchmetrics ``Metric``: ``update(fake=..., real=...)``."""

    def __init__(self, n_projections: int = 256, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_projections, self.seed = n_projections, seed

    def compute(self) -> Tensor:
        return sliced_wasserstein(*self._samples(), n_projections=self.n_projections, seed=self.seed)
