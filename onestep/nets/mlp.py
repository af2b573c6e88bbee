"""Fully connected networks, optionally conditioned on time by a concatenated time feature."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .time import SinusoidalTimeEmbedding, as_batch_time

__all__ = ["ACTIVATIONS", "make_activation", "MLP", "MLP_TIME_EMBEDDINGS"]

#: how an MLP sees the time: ``sinusoidal`` features ``[cos(s t w_k), sin(s t w_k)]`` or ``raw`` ``t`` itself
MLP_TIME_EMBEDDINGS = ("sinusoidal", "raw")

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    """Activation module by (case-insensitive) name, e.g. ``"silu"``, ``"relu"``, ``"gelu"``."""
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


class _RawTime(nn.Module):
    """``t`` itself as one feature column ``(B, 1)``."""

    def forward(self, t: Tensor) -> Tensor:
        return t[:, None]


class MLP(nn.Module):
    """``y = MLP([flatten(x), emb(t)])``.

    ``time_embedding="sinusoidal"``: ``emb`` is a :class:`SinusoidalTimeEmbedding` of size ``time_dim``
    with ``t`` multiplied by ``time_scale`` (1000, the diffusion convention: frequencies up to 1000 rad per
    unit of ``t``); ``time_dim`` defaults to 64. ``time_embedding="raw"``: ``emb(t) = t``, one column
    (``time_dim`` defaults to 1 and must be 0 or 1, so that a wider request is not silently ignored).
    Which one trains the better flow-matching velocity on 2-D data is measured by
    ``benchmarks/reference_torchcfm.py`` (the flow-matching configs say what was measured).

    ``x`` may have any shape ``(B, *in_shape)`` with ``prod(in_shape) == in_dim``; it is flattened.
    The output is ``(B, out_dim)``, or ``(B, *out_shape)`` when ``out_shape`` is given.
    With ``time_dim == 0`` the network ignores ``t``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        activation: str = "silu",
        time_dim: int | None = None,
        out_shape: Sequence[int] | None = None,
        time_embedding: str = "sinusoidal",
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if time_embedding not in MLP_TIME_EMBEDDINGS:
            raise ValueError(f"MLP: time_embedding must be one of {MLP_TIME_EMBEDDINGS}, got {time_embedding!r}")
        if time_dim is None:
            time_dim = 64 if time_embedding == "sinusoidal" else 1
        if time_dim < 0:
            raise ValueError(f"MLP: time_dim must be >= 0, got {time_dim}")
        if time_embedding == "raw" and time_dim > 1:
            raise ValueError(f"MLP: time_embedding='raw' feeds t as one feature; time_dim={time_dim} would be "
                             "ignored: set time_dim to 1 (or 0 for no time), or use time_embedding='sinusoidal'")
        if out_shape is not None and math.prod(out_shape) != out_dim:
            raise ValueError(f"MLP: out_shape {tuple(out_shape)} does not hold out_dim={out_dim} values")
        self.in_dim, self.out_dim, self.time_dim = int(in_dim), int(out_dim), int(time_dim)
        self.out_shape = tuple(out_shape) if out_shape is not None else None
        self.time_embedding = time_embedding
        if time_dim == 0:
            self.time_embed = None
        elif time_embedding == "raw":
            self.time_embed = _RawTime()
        else:
            self.time_embed = SinusoidalTimeEmbedding(time_dim, scale=time_scale)
        widths = [self.in_dim + self.time_dim, *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), make_activation(activation)]
        layers.append(nn.Linear(widths[-1], self.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t=None) -> Tensor:
        batch = x.shape[0]
        h = rearrange(x, "b ... -> b (...)")
        if h.shape[1] != self.in_dim:
            raise ValueError(
                f"MLP: input of shape {tuple(x.shape[1:])} has {h.shape[1]} features, expected {self.in_dim}"
            )
        if self.time_embed is not None:
            if t is None:
                raise ValueError("MLP: this network is time-conditioned (time_dim > 0); pass t")
            emb = self.time_embed(as_batch_time(t, batch, like=h))
            h = torch.cat([h, emb.to(h.dtype)], dim=1)
        y = self.net(h)
        if self.out_shape is not None:
            y = y.reshape(batch, *self.out_shape)
        return y
