r"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling").

Written in this project's time (``t = 0`` noise, ``t = 1`` data; the paper runs the other way). On the
linear path :math:`z_s = (1 - s)x_0 + s x_1` with conditional velocity :math:`v = x_1 - x_0`, the network
models the *average* velocity from the current time ``s`` to a later time ``t``,

.. math::  u(z_s, s, t) = \frac{1}{t - s}\int_s^t v(z_\tau, \tau)\,d\tau, \qquad z_t = z_s + (t - s)\,u(z_s, s, t),

and ``u(z, s, s) = v(z, s)``. Differentiating :math:`(t - s)u = \int_s^t v` in ``s`` along the trajectory
gives the MeanFlow identity

.. math::  u(z_s, s, t) = v(z_s, s) + (t - s)\,\tfrac{d}{ds}u(z_s, s, t),
           \qquad \tfrac{d}{ds}u = v\cdot\partial_z u + \partial_s u,

(the paper's :math:`u = v - (t - r)\,\tfrac{d}{dt}u` with its ``t = 1 - s``, ``r = 1 - t``), the total
derivative being one Jacobian-vector product of :math:`u_\theta` with tangent ``(v, 1, 0)`` in ``(z, s, t)``
(``torch.func.jvp``, which also returns :math:`u_\theta` itself). The loss regresses onto the
stop-gradient target, with the paper's adaptive weight (``p = 1``: close to a relative error):

.. math::  \Delta = u_\theta(z_s, s, t) - \mathrm{sg}\big[v + (t - s)(v\,\partial_z u_\theta + \partial_s u_\theta)\big],
           \qquad \mathcal L = \mathbb E\ \mathrm{sg}\big[(\|\Delta\|^2 + c)^{-p}\big]\,\|\Delta\|^2 .

Times: two draws from a logit-normal (the paper's best, ``lognorm(-0.4, 1.0)`` in its time, which is
mean ``+0.4`` here), ``s`` the smaller and ``t`` the larger; for a fraction ``1 - gap_fraction`` of the batch
``t = s`` (plain flow matching; the paper's best ratio of ``r != t`` is 25%).

Sampling: :math:`x = z + u_\theta(z, 0, 1)`, NFE 1; ``steps = k`` chains ``k`` average-velocity jumps over
a uniform grid (NFE ``k``). The network sees two times through the characteristic generator's
:class:`~onestep.generators.characteristic_teacher.TwoTimeNet` (``s`` as the backbone's own time, ``t`` as
sinusoidal features appended to the input, or, with ``target_time_input: blocks`` on a UNet, in every block).
Reported: ImageNet 256 FID 3.43 at 1 NFE (DiT-XL), CIFAR-10 (unconditional) about 2.9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator
from onestep.generators.characteristic_teacher import TwoTimeNet
from onestep.options import AtLeastOne, NonNegative, Positive, UnitInterval
from onestep.paths import LinearPath, time_column
from onestep.solvers import solve

TARGET_TIME_INPUTS = ("input", "blocks")
PATH = LinearPath()


class MeanFlow(OneStepGenerator):
    """Average-velocity model trained with the MeanFlow identity; ``steps`` jumps at sampling (the NFE).

    Args (besides the base optimiser/EMA options):
        gap_fraction: share of the batch with ``s < t`` (the rest ``t = s``, flow matching); paper 0.25.
        time_mean, time_std: the logit-normal of the times, in this module's time (paper: -0.4 and 1.0 in
            its reversed time, i.e. 0.4 here).
        weight_power, weight_eps: ``p`` and ``c`` of the adaptive weight ``(||Delta||^2 + c)^(-p)``; ``p = 0``
            is the plain squared error.
        steps: average-velocity jumps at sampling.
        t_features, target_time_input: how the network sees the target time (see ``TwoTimeNet``).
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        gap_fraction: Annotated[float, UnitInterval] = 0.25,
        time_mean: float = 0.4,
        time_std: Annotated[float, Positive] = 1.0,
        weight_power: Annotated[float, NonNegative] = 1.0,
        weight_eps: Annotated[float, Positive] = 1e-3,
        steps: Annotated[int, AtLeastOne] = 1,
        t_features: Annotated[int, AtLeastOne] = 16,
        target_time_input: Literal[TARGET_TIME_INPUTS] = "input",
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        self.gap_fraction, self.time_mean, self.time_std = gap_fraction, time_mean, time_std
        self.weight_power, self.weight_eps, self.steps = weight_power, weight_eps, steps
        self.net = TwoTimeNet(backbone, self.data_shape, t_features=t_features, target_time_input=target_time_input)

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.steps

    def average_velocity(self, z: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``u(z, s, t)``: the mean velocity from time ``s`` (where ``z`` is) to time ``t``."""
        return self.net(z, s, t)

    def average_velocity_and_derivative(self, z: Tensor, v: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``u(z, s, t)`` and its total derivative ``d/ds u = v . du/dz + du/ds`` (one JVP)."""
        return torch.func.jvp(self.average_velocity, (z, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))

    def identity_target(self, z: Tensor, v: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``u_theta(z, s, t)`` and the MeanFlow target ``sg[v + (t - s) d/ds u_theta]`` for velocity ``v`` at ``z``."""
        u, du_ds = self.average_velocity_and_derivative(z, v, s, t)
        return u, (v + time_column(t - s, v) * du_ds).detach()

    def draw_times(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(s, t)`` with ``s <= t``: logit-normal pairs, ``t = s`` outside a ``gap_fraction`` of the batch."""
        pair = torch.sigmoid(self.time_mean + self.time_std * torch.randn(2, n, device=device))
        s, t = pair.min(0).values, pair.max(0).values
        same = torch.rand(n, device=device) >= self.gap_fraction
        return s, torch.where(same, s, t)

    def loss(self, x1: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = torch.randn_like(x1)
        s, t = self.draw_times(len(x1), x1.device)
        z, v = PATH.interpolate(x0, x1, s), PATH.velocity_target(x0, x1, s)
        u, target = self.identity_target(z, v, s, t)
        error = (u - target).flatten(1).square().sum(1)
        weight = (error.detach() + self.weight_eps) ** -self.weight_power
        return (weight * error).mean(), {"mse": error.mean().detach() / x1[0].numel()}

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        def jump(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
            return x + time_column(t - s, x) * self.average_velocity(x, s, t)

        z = self.randn(n, generator=generator)
        return solve(jump, z, torch.linspace(0.0, 1.0, self.steps + 1, dtype=z.dtype, device=z.device))
