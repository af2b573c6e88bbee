r"""Neural flows (Bilos et al. 2021, stribor-style): networks that model an ODE *solution* directly.

A flow ``phi(x0, t)`` is valid when (i) ``phi(x0, 0) = x0`` and (ii) ``phi(., t)`` is invertible for every
``t`` (trajectories cannot cross).  Both families here get (i) exactly from a time embedding with
``h(0) = 0``:

* :class:`ResNetFlow` (vectors) stacks blocks ``x <- x + h(t) * g([x, t])``.  With ``invertible=True`` the
  linear layers of ``g`` after the first are spectrally normalised, which bounds their Lipschitz constant by
  1; with ``|h| < 1`` (``time_embed="tanh"``) the residual ``h(t) g`` is then (near) contractive, so every
  block is an i-ResNet-style bijection whose inverse is the Banach fixed point of
  ``x <- y - h(t) * g([x, t])``.
* :class:`FlowMap` (any backbone, e.g. a UNet on images): ``phi(x0, t) = x0 + h(t) * net(x0, t)``; (i) holds
  exactly, (ii) is not enforced (spectral normalisation of a UNet is impractical).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from .mlp import make_activation
from .time import as_batch_time, make_flow_time

__all__ = ["ResNetFlowBlock", "ResNetFlow", "FlowMap"]


def _exact_spectral_norm(linear: nn.Linear, n_power_iterations: int) -> nn.Linear:
    """``spectral_norm`` whose power-iteration vectors start at the exact top singular pair.

    torch's 15 initial power iterations can underestimate ``sigma`` by a few percent (normalised norm ~1.02);
    starting from the SVD makes ``||W / sigma|| = 1`` at init, and training-mode iterations then track it.
    """
    linear = spectral_norm(linear, n_power_iterations=n_power_iterations)
    normaliser = linear.parametrizations.weight[0]
    if hasattr(normaliser, "_u") and hasattr(normaliser, "_v"):
        with torch.no_grad():
            left, _, right = torch.linalg.svd(linear.parametrizations.weight.original, full_matrices=False)
            normaliser._u.copy_(left[:, 0])
            normaliser._v.copy_(right[0])
    return linear


class ResNetFlowBlock(nn.Module):
    r"""One block ``F(x, t) = x + h(t) * g([x, t])`` with ``g: R^{d+1} -> hidden -> R^d``.

    Why spectral normalisation: the block is a bijection when ``Lip_x(h(t) g) < 1`` (i-ResNet argument).
    ``spectral_norm`` rescales each wrapped weight to spectral norm ~1.  As in the reference code (stribor
    ``MLP(wrapper_func=spectral_norm)``) the *first* layer, which also reads ``t``, is left unnormalised by
    default, so the bound is not strict: pass ``normalize_first_layer=True`` for a provable
    ``Lip_x(g) <= 1`` (and ``< 1`` per block when ``|h| < 1``).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256),
        time_embed: str = "tanh",
        invertible: bool = True,
        activation: str = "relu",
        n_power_iterations: int = 5,
        normalize_first_layer: bool = False,
    ):
        super().__init__()
        widths = [dim + 1, *[int(h) for h in hidden], dim]
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            linear = nn.Linear(fan_in, fan_out)
            if index == len(widths) - 2:
                nn.init.zeros_(linear.bias)  # last bias starts at 0, as stribor
            if invertible and (index > 0 or normalize_first_layer):
                linear = _exact_spectral_norm(linear, n_power_iterations)
            layers.append(linear)
            if index < len(widths) - 2:
                layers.append(make_activation(activation))
        self.g = nn.Sequential(*layers)
        self.h = make_flow_time(time_embed, dim)

    def residual(self, x: Tensor, t: Tensor) -> Tensor:
        """``h(t) * g([x, t])`` for ``t`` of shape ``(B,)``."""
        return self.h(t) * self.g(torch.cat([x, t[:, None]], dim=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return x + self.residual(x, t)

    def inverse(self, y: Tensor, t: Tensor, n_iter: int = 100) -> Tensor:
        """Fixed-point iteration ``x <- y - h(t) * g([x, t])`` (converges when the residual is contractive)."""
        x = y
        for _ in range(n_iter):
            x = y - self.residual(x, t)
        return x


class ResNetFlow(nn.Module):
    r"""Stribor-style ResNet flow ``phi(x0, t) = F_L(... F_1(x0, t) ..., t)`` on vectors ``(B, dim)``.

    Each block is ``F_k(x, t) = x + h_k(t) * g_k([x, t])`` with ``h_k(0) = 0``, hence ``phi(x0, 0) = x0``
    exactly.  ``t`` may be a scalar, ``(B,)`` or ``(B, 1)``; it is required.
    """

    def __init__(
        self,
        dim: int,
        n_blocks: int = 4,
        hidden: Sequence[int] = (256, 256),
        time_embed: str = "tanh",
        invertible: bool = True,
        activation: str = "relu",
        n_power_iterations: int = 5,
        normalize_first_layer: bool = False,
    ):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"ResNetFlow: n_blocks must be >= 1, got {n_blocks}")
        self.dim, self.invertible = int(dim), bool(invertible)
        self.blocks = nn.ModuleList(
            ResNetFlowBlock(self.dim, hidden, time_embed, invertible, activation, n_power_iterations, normalize_first_layer)
            for _ in range(n_blocks)
        )

    def _check(self, x: Tensor, t) -> Tensor:
        if t is None:
            raise ValueError("ResNetFlow: the flow needs a time t (phi(x0, t)); got t=None")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ResNetFlow: expected x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return as_batch_time(t, x.shape[0], like=x)

    def forward(self, x0: Tensor, t=None) -> Tensor:
        t = self._check(x0, t)
        x = x0
        for block in self.blocks:
            x = block(x, t)
        return x

    @torch.no_grad()
    def inverse(self, y: Tensor, t=None, n_iter: int = 100) -> Tensor:
        """``phi^{-1}(y, t)``: undo the blocks in reverse order, each by fixed-point iteration."""
        t = self._check(y, t)
        with parametrize.cached():  # evaluate each spectral-normalised weight once
            for block in reversed(self.blocks):
                y = block.inverse(y, t, n_iter)
        return y


class FlowMap(nn.Module):
    r"""``phi(x0, t) = x0 + h(t) * net(x0, t)`` for any backbone ``net`` with ``net(x, t)`` shaped like ``x``.

    ``h`` is a flow time embedding (``h(0) = 0``, so ``phi(x0, 0) = x0`` exactly) of size ``time_dim``:
    1 gives one scalar per sample, ``C`` one value per channel (dim 1); it is broadcast over the other dims.
    """

    def __init__(self, net: nn.Module, time_fn: str | nn.Module = "identity", time_dim: int = 1):
        super().__init__()
        self.net = net
        self.time_dim = int(time_dim)
        self.h = make_flow_time(time_fn, self.time_dim) if isinstance(time_fn, str) else time_fn

    def forward(self, x0: Tensor, t=None) -> Tensor:
        if t is None:
            raise ValueError("FlowMap: the flow map needs a time t (phi(x0, t)); got t=None")
        t = as_batch_time(t, x0.shape[0], like=x0)
        h = self.h(t)  # (B, time_dim)
        if h.shape[1] not in (1, x0.shape[1] if x0.ndim > 1 else 1):
            raise ValueError(f"FlowMap: h(t) has {h.shape[1]} values, which do not broadcast over x of shape {tuple(x0.shape)}")
        h = h.reshape(*h.shape, *([1] * (x0.ndim - 2))) if x0.ndim > 1 else rearrange(h, "b 1 -> b")
        return x0 + h * self.net(x0, t)
