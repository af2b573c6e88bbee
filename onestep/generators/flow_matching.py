r"""Multi-step flow matching: the yardstick the one-step methods are measured against.

Linear path from noise ``x0 ~ N(0, I)`` at ``t = 0`` to data ``x1`` at ``t = 1``:

.. math::  x_t = (1 - t)\,x_0 + t\,x_1, \qquad u_t = x_1 - x_0,
           \qquad \mathcal{L}(\theta) = \mathbb{E}_{t, (x_0, x_1) \sim \pi} \|v_\theta(x_t, t) - u_t\|^2 .

With ``coupling="independent"`` this is (I-)CFM / rectified flow; with ``coupling="minibatch"`` the pairs
come from the exact OT assignment within each batch (OT-CFM, Tong et al. 2023), solved one batch ahead on
a background thread unless ``prefetch_pairing=False`` (see :class:`~onestep.generators.coupling.PairingPipeline`). Sampling integrates
``dx/dt = v(x, t)`` from 0 to 1 with ``steps`` Euler (NFE = steps) or Heun (NFE = 2 * steps) steps.
The module also serves as the characteristic generator's teacher through :meth:`velocity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.coupling import PrefetchedPairing
from onestep.nets import build_backbone
from onestep.options import AtLeastOne, NonNegative

SAMPLERS = ("euler", "heun")
FM_COUPLINGS = ("independent", "minibatch")


class FlowMatching(PrefetchedPairing, OneStepGenerator):
    """Conditional flow matching with an Euler or Heun sampler at ``steps`` steps."""

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        coupling: Literal[FM_COUPLINGS] = "minibatch",
        sampler: Literal[SAMPLERS] = "euler",
        steps: Annotated[int, AtLeastOne] = 100,
        sigma: Annotated[float, NonNegative] = 0.0,
        prefetch_pairing: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        self.coupling, self.sampler, self.steps, self.sigma = coupling, sampler, steps, sigma
        self.net = build_backbone(backbone, self.data_shape)
        self.prefetch_pairing = prefetch_pairing

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.steps * (2 if self.sampler == "heun" else 1)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The learned velocity ``v(x, t)``; ``t`` a scalar or a ``(B,)`` tensor."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))
        return self.net(x, t)

    def loss(self, x1: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = self.minibatch_noise(x1, idx) if self.coupling == "minibatch" else torch.randn_like(x1)
        t = torch.rand(len(x1), device=x1.device)
        tb = t.view(-1, *([1] * (x1.dim() - 1)))
        xt = (1 - tb) * x0 + tb * x1
        if self.sigma > 0:
            xt = xt + self.sigma * torch.randn_like(xt)
        loss = (self.velocity(xt, t) - (x1 - x0)).square().mean()
        return loss, {"pair_cost": (x1 - x0).flatten(1).square().sum(1).mean().detach()}

    def integrate(self, x: Tensor, t0: float = 0.0, t1: float = 1.0, steps: int | None = None,
                  sampler: str | None = None) -> Tensor:
        """Solve ``dx/dt = v(x, t)`` from ``t0`` to ``t1`` with fixed steps (the teacher's ODE step)."""
        steps, sampler = steps or self.steps, sampler or self.sampler
        times = torch.linspace(t0, t1, steps + 1, device=x.device)
        for a, b in zip(times[:-1], times[1:]):
            v = self.velocity(x, a)
            if sampler == "heun":
                x_euler = x + (b - a) * v
                x = x + (b - a) * 0.5 * (v + self.velocity(x_euler, b))
            else:
                x = x + (b - a) * v
        return x

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.integrate(self.randn(n, generator=generator))
