r"""IMLE: implicit maximum likelihood estimation (Li & Malik 2018).

A generator :math:`G_\theta(z) = z + F_\theta(z)`, :math:`z \sim N(0, I)` in the data's shape (``F`` the
configured backbone, without time input), is pulled towards the data by matching every data
point to its nearest generated sample. For a batch :math:`x_1..x_n`, draw :math:`m\,n` latents, pick for each
:math:`x_i` the nearest candidate :math:`\sigma(i) = \arg\min_j \|G_\theta(z_j) - x_i\|` (no gradient), and
minimise

.. math::  \mathcal L(\theta) = \frac1n \sum_i \|G_\theta(z_{\sigma(i)}) - x_i\|^2

(here as a mean over coordinates, so the learning rate carries over between dimensions). Every data point
thus pulls on *some* sample, which is why IMLE covers all modes: a mode without nearby samples still draws
the nearest one in, where a GAN could ignore it. ``candidates`` (``m``) trades coverage for sharpness:
with a large ``m`` each data point finds a close sample, but many candidates never receive a gradient.
The skip connection ``z +`` matters for backbones whose last layer starts at zero (the UNet): without it
every candidate of the first search is the same point and the nearest-sample choice is arbitrary.

This version re-selects the nearest candidates at every training step (the paper fixes the assignment for
several steps, a saving when generation is the cost; on a fresh batch each step it is the same estimator).
The search generates candidates ``search_chunk`` at a time and keeps a running minimum, so its memory is
``n x search_chunk`` distances whatever ``m``. Sampling is one network evaluation, :math:`x = G_\theta(z)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator
from onestep.modules import eval_mode
from onestep.nets import build_backbone
from onestep.options import AtLeastOne


def nearest_candidates(x: Tensor, draw: Any, generate: Any, total: int, chunk: int) -> tuple[Tensor, Tensor]:
    """For every row of ``x``, the latent (from ``draw(k)``) whose ``generate``d sample is nearest, and the
    squared distance; ``total`` candidates made ``chunk`` at a time (memory ``len(x) * chunk`` distances)."""
    flat = x.flatten(1)
    best = torch.full((len(x),), float("inf"), dtype=x.dtype, device=x.device)
    chosen: Tensor | None = None
    for start in range(0, total, chunk):
        z = draw(min(chunk, total - start))
        d = torch.cdist(flat, generate(z).flatten(1)).square()
        closest, j = d.min(dim=1)
        better = closest < best
        chosen = z[j] if chosen is None else torch.where(better.view(-1, *[1] * (z.dim() - 1)), z[j], chosen)
        best = torch.where(better, closest, best)
    return chosen, best


class IMLE(OneStepGenerator):
    """One-step generator trained by nearest-sample matching over ``candidates`` samples per data point.

    Args (besides the base optimiser/EMA options):
        candidates: ``m``, generated candidates per data point of the batch.
        search_chunk: candidates generated and compared at once (bounds the search's memory).
    """

    nfe = 1

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        candidates: Annotated[int, AtLeastOne] = 10,
        search_chunk: Annotated[int, AtLeastOne] = 4096,
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        self.candidates, self.search_chunk = candidates, search_chunk
        self.net = build_backbone(backbone, self.data_shape, time_conditioned=False)

    def generator_map(self, z: Tensor) -> Tensor:
        """``G(z) = z + F(z)``."""
        return z + self.net(z)

    @torch.no_grad()
    def match(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The latent of each data point's nearest candidate, and the squared distance to it."""
        with eval_mode(self.net):
            return nearest_candidates(x, lambda k: torch.randn(k, *self.data_shape, dtype=x.dtype, device=x.device),
                                      self.generator_map, self.candidates * len(x), self.search_chunk)

    def loss(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        z, nearest = self.match(x)
        loss = (self.generator_map(z) - x).square().mean()
        return loss, {"nearest_dist": nearest.sqrt().mean()}

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.generator_map(self.randn(n, generator=generator))
