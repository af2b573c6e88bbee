r"""Intrinsic density of a pushforward ``g_# N(0, I_d)`` and projection onto its image ``g(R^d)``.

The model law of a one-step generator ``g: R^d -> R^D`` (``d < D``) has no Lebesgue density in R^D, but
it has one with respect to the d-dimensional volume measure of the learned manifold ``M = g(R^d)``
whenever ``g`` is an injective immersion (``J = dg/dz`` of full column rank). The area formula gives

.. math::  \log p^M(g(z)) = \log \mathcal{N}(z; 0, I_d) - \tfrac12 \log\det(J^\top J)
                          = -\tfrac12\|z\|^2 - \tfrac d2 \log 2\pi - \sum_{i=1}^d \log \varsigma_i(J(z)),

with ``varsigma_i`` the singular values of ``J`` (a D x d matrix). The Jacobian is built with d
forward-mode passes (``torch.func.jacfwd`` under ``vmap``; cheaper than ``jacrev``'s D reverse passes
because d << D) and, by default, in float64: the network's weights are cast to float64 for the call
(``torch.func.functional_call``; the module itself is untouched), so small singular values are not lost
to float32 round-off.

For a point ``x`` the model did not generate, :func:`project_to_manifold` solves

.. math::  z^*(x) = \arg\min_z \|x - g(z)\|^2 + \lambda \|z\|^2

by Levenberg-Marquardt (Gauss-Newton with adaptive damping; a step is kept only where it lowers the
objective, so the iteration is monotone) from several starting points, and reports the off-manifold
residual ``||x - g(z*)||``. ``lambda = 0`` is the Euclidean projection; ``lambda = sigma^2`` is the MAP
latent of the smoothed model, which MAGT's MAP-Laplace anchor proposal uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, vmap

#: singular values below this make a point "degenerate" (the map is not an immersion there)
DEGENERATE_SINGULAR_VALUE = 1e-6


def pointwise_map(g: Callable[[Tensor], Tensor], dtype: torch.dtype | None = None,
                  post: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """``u (d,) -> post(g(u[None]))`` flattened to ``(D,)``, evaluated in ``dtype``.

    For an ``nn.Module`` the parameters and floating buffers are cast to ``dtype`` for the call only.
    ``post`` is applied to the output (e.g. the datamodule's affine ``denormalize`` for raw units).
    """
    if isinstance(g, nn.Module) and dtype is not None:
        params = {k: v.detach().to(dtype) for k, v in g.named_parameters()}
        buffers = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in g.named_buffers()}

        def call(u: Tensor) -> Tensor:
            return functional_call(g, (params, buffers), (u.unsqueeze(0),))
    else:
        def call(u: Tensor) -> Tensor:
            return g(u.unsqueeze(0))

    def f(u: Tensor) -> Tensor:
        u = u.to(dtype) if dtype is not None else u
        out = call(u)
        return (post(out) if post is not None else out).reshape(-1)

    return f


def jacobian(g: Callable[[Tensor], Tensor], z: Tensor, dtype: torch.dtype | None = torch.float64,
             post: Callable[[Tensor], Tensor] | None = None, chunk_size: int | None = None) -> Tensor:
    """Jacobians ``d post(g)(z_n) / dz`` of shape ``(N, D, d)`` for latents ``z (N, d)``.

    ``vmap(jacfwd)`` runs the network on ``chunk_size * d`` inputs at once; the default keeps that at
    about 512 (a float64 conv decoder on 8192 inputs needs tens of GB of memory).
    """
    f = pointwise_map(g, dtype, post)
    z = z.to(dtype) if dtype is not None else z
    chunk_size = chunk_size or max(1, 512 // z.shape[1])
    with torch.enable_grad():  # the callback may call us under no_grad; torch.func does not need it, be safe
        return torch.cat([vmap(jacfwd(f))(chunk) for chunk in z.split(chunk_size)])


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I_d)`` summed over the last dimension."""
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def intrinsic_log_density(g: Callable[[Tensor], Tensor], z: Tensor, dtype: torch.dtype = torch.float64,
                          post: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(log p^M(g(z)), singular values)`` for latents ``z (N, d)``; log-density in nats, shape ``(N,)``.

    The density is with respect to the d-dimensional volume on ``g(R^d)`` and assumes ``g`` injective
    (otherwise the area formula sums over the preimages and this is the contribution of ``z`` alone).
    Degenerate points (smallest singular value 0) give ``+inf``; see :data:`DEGENERATE_SINGULAR_VALUE`.
    """
    if z.ndim != 2:
        raise ValueError(f"intrinsic_log_density: z must have shape (N, d), got {tuple(z.shape)}")
    jac = jacobian(g, z, dtype=dtype, post=post)
    if jac.shape[1] < jac.shape[2]:
        raise ValueError(f"intrinsic_log_density: the map goes from d={jac.shape[2]} to D={jac.shape[1]} "
                         "dimensions; the area formula needs d <= D")
    sv = torch.linalg.svdvals(jac.to(torch.float64))
    logp = standard_normal_log_prob(z.to(torch.float64)) - sv.log().sum(-1)
    return logp, sv


def _objective(g: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, prior_weight: float) -> tuple[Tensor, Tensor]:
    residual = x - g(u).reshape(len(u), -1)
    return residual.pow(2).sum(1) + prior_weight * u.pow(2).sum(1), residual


@torch.no_grad()
def levenberg_marquardt(g: Callable[[Tensor], Tensor], x: Tensor, u0: Tensor, prior_weight: float = 0.0,
                        steps: int = 30, damping: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Minimise ``||x_n - g(u_n)||^2 + prior_weight ||u_n||^2`` for every row independently.

    ``x (N, D)`` flattened targets, ``u0 (N, d)`` starts. Each step solves
    ``(J^T J + (prior_weight + mu) I) delta = J^T r - prior_weight u`` (``r = x - g(u)``), keeps it where
    the objective decreases (then ``mu /= 3``) and otherwise grows ``mu`` by 4. Returns ``(u, objective)``.
    """
    u = u0.clone()
    value, residual = _objective(g, x, u, prior_weight)
    mu = torch.full_like(value, damping)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    for _ in range(steps):
        jac = jacobian(g, u, dtype=None)                                      # (N, D, d)
        jt = jac.transpose(1, 2)
        lhs = jt @ jac + (prior_weight + mu)[:, None, None] * eye
        rhs = (jt @ residual.unsqueeze(-1)).squeeze(-1) - prior_weight * u
        delta = torch.linalg.solve(lhs, rhs)
        candidate = u + delta
        new_value, new_residual = _objective(g, x, candidate, prior_weight)
        better = new_value < value
        u = torch.where(better[:, None], candidate, u)
        residual = torch.where(better[:, None], new_residual, residual)
        value = torch.where(better, new_value, value)
        mu = torch.where(better, mu / 3, mu * 4).clamp(1e-8, 1e8)
    return u, value


@torch.no_grad()
def project_to_manifold(g: Callable[[Tensor], Tensor], x: Tensor, latent_dim: int, n_starts: int = 4,
                        bank_size: int = 2048, steps: int = 30, prior_weight: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Project ``x (N, ...)`` onto ``g(R^d)``: ``(z* (N, d), residual ||x - g(z*)|| (N,))``.

    Starts: the ``n_starts`` nearest images among ``bank_size`` prior draws (nearest-anchor initialisation,
    so the local solver starts in the right branch of a folded manifold); the best end point is kept.
    """
    if n_starts < 1 or bank_size < n_starts:
        raise ValueError(f"project_to_manifold: need 1 <= n_starts <= bank_size, got {n_starts}, {bank_size}")
    target = x.reshape(len(x), -1)
    device = target.device
    bank = torch.randn(bank_size, latent_dim, generator=generator,
                       device=generator.device if generator is not None else device).to(device, target.dtype)
    images = g(bank).reshape(bank_size, -1).to(target.dtype)
    cost = torch.cdist(target, images).pow(2) + prior_weight * bank.pow(2).sum(1)[None]
    starts = bank[cost.topk(n_starts, dim=1, largest=False).indices]          # (N, S, d)
    repeated = target.repeat_interleave(n_starts, dim=0)
    u, value = levenberg_marquardt(g, repeated, starts.reshape(-1, latent_dim), prior_weight, steps)
    best = value.view(-1, n_starts).argmin(1)
    z = u.view(-1, n_starts, latent_dim)[torch.arange(len(target), device=device), best]
    residual = (target - g(z).reshape(len(z), -1)).norm(dim=1)
    return z, residual
