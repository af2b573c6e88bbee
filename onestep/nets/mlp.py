"""Fully connected networks, optionally conditioned on time by a concatenated sinusoidal embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .time import SinusoidalTimeEmbedding, as_batch_time

__all__ = ["ACTIVATIONS", "make_activation", "MLP"]

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


class MLP(nn.Module):
    """``y = MLP([flatten(x), emb(t)])`` with ``emb`` a sinusoidal embedding of size ``time_dim``.

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
        time_dim: int = 64,
        out_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if time_dim < 0:
            raise ValueError(f"MLP: time_dim must be >= 0, got {time_dim}")
        if out_shape is not None and math.prod(out_shape) != out_dim:
            raise ValueError(f"MLP: out_shape {tuple(out_shape)} does not hold out_dim={out_dim} values")
        self.in_dim, self.out_dim, self.time_dim = int(in_dim), int(out_dim), int(time_dim)
        self.out_shape = tuple(out_shape) if out_shape is not None else None
        self.time_embed = SinusoidalTimeEmbedding(time_dim) if time_dim > 0 else None
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
