"""Time handling and time embeddings.

* :func:`as_batch_time` turns a time given as a float, a 0-d tensor, ``(B,)`` or ``(B, 1)`` into ``(B,)``.
* :class:`SinusoidalTimeEmbedding` conditions ordinary networks on ``t in [0, 1]``.
* ``TimeIdentity`` / ``TimeLinear`` / ``TimeTanh`` / ``TimeLog`` are the neural-flow time embeddings
  (Bilos et al., stribor ``time_net.py``).  Every one satisfies ``h(0) = 0`` exactly, which is what makes a
  flow ``phi(x, t) = x + h(t) * g(x, t)`` start at ``phi(x, 0) = x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "as_batch_time",
    "SinusoidalTimeEmbedding",
    "TimeIdentity",
    "TimeLinear",
    "TimeTanh",
    "TimeLog",
    "FLOW_TIME_EMBEDDINGS",
    "make_flow_time",
]


def as_batch_time(t, batch_size: int | None = None, like: Tensor | None = None) -> Tensor:
    """Return ``t`` as a ``(B,)`` tensor.

    ``t`` may be a python number, a 0-d or one-element tensor (broadcast to ``batch_size``), or any
    tensor holding ``B`` values such as ``(B,)`` or ``(B, 1)``.  ``like`` supplies device and float dtype.
    """
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    elif not t.is_floating_point():
        t = t.float()
    t = t.reshape(-1)
    if batch_size is None:
        return t
    if t.numel() == 1:
        return t.expand(batch_size)
    if t.numel() != batch_size:
        raise ValueError(
            f"time t has {t.numel()} values but the batch has {batch_size} samples; "
            "pass t as a scalar, shape (B,) or shape (B, 1)"
        )
    return t


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style features ``[cos(s t w_k), sin(s t w_k)]`` of ``t in [0, 1]``.

    ``w_k = max_period^(-k / half)`` for ``k < half = dim // 2``; ``t`` is first multiplied by
    ``scale`` (1000 by default) so that the low frequencies still resolve the unit interval.
    Maps ``t`` of shape ``()``, ``(B,)`` or ``(B, 1)`` to ``(B, dim)`` (``B = 1`` for a scalar unless
    ``batch_size`` is given).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
        super().__init__()
        if dim < 1:
            raise ValueError(f"SinusoidalTimeEmbedding: dim must be >= 1, got {dim}")
        self.dim = dim
        self.scale = scale
        half = max(dim // 2, 1)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t, batch_size: int | None = None) -> Tensor:
        t = as_batch_time(t, batch_size, like=self.freqs)
        if len(t) > 1 and t.stride(0) == 0:  # one time broadcast over the batch (sampling): embed it once
            return self.forward(t[:1]).expand(len(t), -1)
        angles = (self.scale * t)[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if emb.shape[-1] < self.dim:  # odd dim: pad one zero column
            emb = nn.functional.pad(emb, (0, self.dim - emb.shape[-1]))
        return emb[:, : self.dim]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


class _FlowTime(nn.Module):
    """Base class: maps ``t`` (scalar, ``(B,)`` or ``(B, 1)``) to ``h(t)`` of shape ``(B, dim)``, ``h(0) = 0``."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be >= 1, got {dim}")
        self.dim = dim

    def _column(self, t, batch_size, like) -> Tensor:
        return as_batch_time(t, batch_size, like=like)[:, None]  # (B, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class TimeIdentity(_FlowTime):
    """``h(t) = t``, repeated over ``dim``."""

    def forward(self, t, batch_size: int | None = None) -> Tensor:
        like = t if torch.is_tensor(t) and t.is_floating_point() else None
        return self._column(t, batch_size, like).expand(-1, self.dim)


class _LearnedScaleTime(_FlowTime):
    """Holds a learnable ``a in R^dim`` with xavier-uniform init (as stribor)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.scale = nn.Parameter(torch.empty(1, dim))
        nn.init.xavier_uniform_(self.scale)

    def scaled(self, t, batch_size) -> Tensor:
        return self._column(t, batch_size, self.scale) * self.scale  # a * t, (B, dim)


class TimeLinear(_LearnedScaleTime):
    """``h(t) = a * t``."""

    def forward(self, t, batch_size: int | None = None) -> Tensor:
        return self.scaled(t, batch_size)


class TimeTanh(_LearnedScaleTime):
    """``h(t) = tanh(a * t)``; ``|h| < 1``, as the invertibility argument of the ResNet flow needs."""

    def forward(self, t, batch_size: int | None = None) -> Tensor:
        return torch.tanh(self.scaled(t, batch_size))


class TimeLog(_LearnedScaleTime):
    """``h(t) = log(exp(a) * t + 1)``."""

    def forward(self, t, batch_size: int | None = None) -> Tensor:
        t = self._column(t, batch_size, self.scale)
        return torch.log1p(torch.exp(self.scale) * t)


FLOW_TIME_EMBEDDINGS: dict[str, type[_FlowTime]] = {
    "identity": TimeIdentity,
    "linear": TimeLinear,
    "tanh": TimeTanh,
    "log": TimeLog,
}


def make_flow_time(name: str, dim: int) -> nn.Module:
    """Build a neural-flow time embedding (``h(0) = 0``) by name: identity, linear, tanh or log."""
    key = str(name).lower().removeprefix("time")
    if key not in FLOW_TIME_EMBEDDINGS:
        raise ValueError(
            f"unknown flow time embedding {name!r}; choose one of {sorted(FLOW_TIME_EMBEDDINGS)}"
        )
    return FLOW_TIME_EMBEDDINGS[key](dim)
