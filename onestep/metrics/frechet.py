"""Fréchet distance between Gaussian fits of two feature sets, in float64.

    FD = ||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr( (S_x^{1/2} S_y S_x^{1/2})^{1/2} )

(the squared W2 between N(mu_x, S_x) and N(mu_y, S_y); FID when the features are Inception's).
Moments come from float64 sums ``n, s = sum_i f_i, P = sum_i f_i f_i^T`` (so they add across batches and
processes): ``mu = s / n`` and the unbiased ``S = (P - n mu mu^T) / (n - 1)``. The trace term is computed
from eigenvalues: with ``R = S_x^{1/2}`` (symmetric square root from ``eigh``, negative rounding
eigenvalues clipped to 0), ``M = R S_y R`` is symmetric PSD and ``tr(M^{1/2}) = sum_k sqrt(max(l_k, 0))``,
which never produces the imaginary parts of a general ``sqrtm``. Tiny negative results from rounding are
clipped to 0. With fewer samples than feature dimensions the covariances are singular and the estimate
is strongly biased: a warning says so.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric


def _sym_sqrt(S: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(S)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_from_moments(mu_x: Tensor, cov_x: Tensor, mu_y: Tensor, cov_y: Tensor) -> Tensor:
    """FD between N(mu_x, cov_x) and N(mu_y, cov_y); 0-d float64 tensor."""
    mu_x, cov_x, mu_y, cov_y = (t.to(torch.float64) for t in (mu_x, cov_x, mu_y, cov_y))
    cov_x, cov_y = (cov_x + cov_x.T) / 2, (cov_y + cov_y.T) / 2
    root_x = _sym_sqrt(cov_x)
    middle = root_x @ cov_y @ root_x
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = ((mu_x - mu_y) ** 2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * trace_sqrt
    return fd.clamp_min(0.0)


def moments_from_sums(n: Tensor | int, total: Tensor, outer: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from ``n``, ``sum f`` and ``sum f f^T``."""
    n = float(n)
    if n < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per side, got {int(n)}")
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)


def _warn_if_few(n: float, dim: int) -> None:
    if n < dim:
        warnings.warn(f"Fréchet distance from {int(n)} samples in {dim} feature dimensions: the covariance "
                      "is singular and the estimate strongly biased; use more samples than dimensions",
                      stacklevel=3)


def frechet_distance(feats_x: Tensor, feats_y: Tensor) -> Tensor:
    """FD between the Gaussian fits of ``feats_x (n, F)`` and ``feats_y (m, F)``; 0-d float64 tensor."""
    stats = []
    for f in (feats_x, feats_y):
        f = f.detach().reshape(f.shape[0], -1).to(torch.float64)
        _warn_if_few(f.shape[0], f.shape[1])
        stats.extend(moments_from_sums(f.shape[0], f.sum(0), f.T @ f))
    return frechet_from_moments(*stats)


class FrechetDistance(Metric):
    """:func:`frechet_distance` with float64 sum states (``dist_reduce_fx="sum"``).

    ``update(fake=..., real=...)`` with ``(N, num_features)`` features; either side may be updated alone."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.num_features = int(num_features)
        f64 = torch.float64
        for side in ("fake", "real"):
            self.add_state(f"{side}_n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(self.num_features, dtype=f64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(self.num_features, self.num_features, dtype=f64),
                           dist_reduce_fx="sum")

    def _add(self, side: str, feats: Tensor) -> None:
        f = feats.detach().reshape(feats.shape[0], -1).to(torch.float64)
        if f.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {f.shape[1]}")
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)

    def update(self, fake: Tensor | None = None, real: Tensor | None = None) -> None:
        if fake is not None:
            self._add("fake", fake)
        if real is not None:
            self._add("real", real)

    def compute(self) -> Tensor:
        stats = []
        for side in ("fake", "real"):
            n = getattr(self, f"{side}_n")
            _warn_if_few(float(n), self.num_features)
            stats.extend(moments_from_sums(n, getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer")))
        return frechet_from_moments(*stats)
