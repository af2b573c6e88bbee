r"""Multi-step flow matching: the yardstick the one-step methods are measured against.

Linear path from noise ``x0 ~ N(0, I)`` at ``t = 0`` to data ``x1`` at ``t = 1`` (``path="linear"``):

.. math::  x_t = (1 - t)\,x_0 + t\,x_1, \qquad u_t = x_1 - x_0,
           \qquad \mathcal{L}(\theta) = \mathbb{E}_{t, (x_0, x_1) \sim \pi} \|v_\theta(x_t, t) - u_t\|^2 .

``path="follmer"`` trains the Föllmer path of :mod:`onestep.paths` instead: the network outputs ``F`` with
``v = F / alpha_t`` and the loss is taken in output units, :math:`\|F_\theta(x_t, t) - \alpha_t \dot x_t\|^2`
(the 1/alpha^2-weighted denoiser loss of the characteristic generator's authors), for ``t < 1 - 1e-5``.

With ``coupling="independent"`` this is (I-)CFM / rectified flow; with ``coupling="minibatch"`` the pairs
come from the exact OT assignment within each batch (OT-CFM, Tong et al. 2023), solved one batch ahead on
a background thread unless ``prefetch_pairing=False`` (see :class:`~onestep.generators.coupling.PairingPipeline`). Sampling integrates
``dx/dt = v(x, t)`` from 0 to 1 with ``steps`` Euler (NFE = steps), Heun (NFE = 2 * steps) or
exponential-integrator steps (``exp``, NFE = steps; :mod:`onestep.solvers`: the Euler step on the linear
path, and on the Föllmer path the step that lands on the data prediction at ``t = 1``, where the velocity
is singular; Heun, which evaluates it there, is refused on that path).
The module also serves as the characteristic generator's teacher through :meth:`velocity`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.coupling import PrefetchedPairing
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative
from onestep.paths import PATHS, make_path, time_column
from onestep.solvers import exponential_step, fixed_step, solve

SAMPLERS = ("euler", "heun", "exp")
FM_COUPLINGS = ("independent", "minibatch")


class FlowMatching(PrefetchedPairing, OneStepGenerator):
    """Conditional flow matching with an Euler, Heun or exponential-integrator sampler at ``steps`` steps."""

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        coupling: Literal[FM_COUPLINGS] = "minibatch",
        sampler: Literal[SAMPLERS] = "euler",
        steps: Annotated[int, AtLeastOne] = 100,
        sigma: Annotated[float, NonNegative] = 0.0,
        prefetch_pairing: bool = True,
        path: Literal[PATHS] = "linear",
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        _check(not (path == "follmer" and sampler == "heun"), "sampler='heun' evaluates the velocity at t = 1, "
               "where the Föllmer path's velocity is singular: use sampler='exp' (or 'euler') with path='follmer'")
        self.coupling, self.sampler, self.steps, self.sigma = coupling, sampler, steps, sigma
        self.net = build_backbone(backbone, self.data_shape)
        self.prefetch_pairing = prefetch_pairing
        self.path = make_path(path)

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.steps * (2 if self.sampler == "heun" else 1)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The learned velocity ``v(x, t)``; ``t`` a scalar or a ``(B,)`` tensor."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))
        return self.path.velocity_from_output(self.net(x, t), t)

    def loss(self, x1: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = self.minibatch_noise(x1, idx) if self.coupling == "minibatch" else torch.randn_like(x1)
        t = torch.rand(len(x1), device=x1.device) * self.path.train_t_max()  # * 1.0 (linear) is exact
        xt = self.path.interpolate(x0, x1, t)
        if self.sigma > 0:
            xt = xt + self.sigma * torch.randn_like(xt)
        # in network-output units (the velocity itself on the linear path). F is recovered from the velocity
        # kappa F: that is not F bit for bit, but it is the characteristic teacher's loss as first written
        # (results reproduce exactly); on the linear path it is the velocity untouched
        out = self.path.output_from_velocity(self.velocity(xt, t), t)
        loss = (out - self.path.output_target(x0, x1, time_column(t, x1))).square().mean()
        return loss, {"pair_cost": (x1 - x0).flatten(1).square().sum(1).mean().detach()}

    def integrate(self, x: Tensor, t0: float = 0.0, t1: float = 1.0, steps: int | None = None,
                  sampler: str | None = None) -> Tensor:
        """Solve ``dx/dt = v(x, t)`` from ``t0`` to ``t1`` with fixed steps (the teacher's ODE step)."""
        steps, sampler = steps or self.steps, sampler or self.sampler
        if sampler == "exp":
            step = functools.partial(exponential_step, self.path, self.velocity)
        else:
            _check(not (self.path.name == "follmer" and sampler == "heun" and t1 >= 1.0),
                   "Heun's last stage evaluates the Föllmer velocity at t = 1, where it is singular: use sampler='exp'")
            step = fixed_step(sampler, self.velocity)
        return solve(step, x, torch.linspace(t0, t1, steps + 1, device=x.device))

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.integrate(self.randn(n, generator=generator))
