r"""Probability paths between noise and data: what a flow-matching, consistency or MeanFlow loss needs.

Time runs from noise (``t = 0``) to data (``t = 1``). An affine path joins a noise sample
:math:`x_0 \sim N(0, I)` to a data point :math:`x_1`:

.. math::  x_t = \alpha_t x_0 + \beta_t x_1, \qquad
           \dot x_t = \frac{d x_t}{dt} = \dot\alpha_t x_0 + \dot\beta_t x_1 ,

* ``linear``:  :math:`\alpha_t = 1 - t,\ \beta_t = t`, so :math:`\dot x_t = x_1 - x_0` (rectified flow,
  (OT-)CFM, OT-NFM);
* ``follmer``: :math:`\alpha_t = \sqrt{1 - t^2},\ \beta_t = t` (Föllmer flow, variance preserving; the
  characteristic generator authors' image code), :math:`\dot x_t = -\frac{t}{\alpha_t} x_0 + x_1`.

A path only describes :math:`x_t` and its conversions; integrating an ODE along it is
:mod:`onestep.solvers`' job (the split of facebookresearch/flow_matching).

**Network-output units.** A velocity network may output :math:`F` with :math:`v = \kappa_t F`:
:math:`\kappa = 1` (linear) or :math:`\kappa = 1/\alpha_t` (Föllmer, which keeps :math:`F` bounded while
:math:`v` blows up at ``t = 1``). The regression target of :math:`F` is :math:`\dot x_t / \kappa_t`
(:meth:`AffinePath.output_target`). The data prediction (denoiser) :math:`d = E[x_1 | x_t]` is

.. math::  d = c_t\,x + \alpha_t F, \qquad c_t = 1 \text{ (linear)},\ c_t = t \text{ (Föllmer)},

(for the linear path :math:`d = x + (1 - t)v` holds for any coupling, since
:math:`x_1 = x_t + (1 - t)(x_1 - x_0)` pointwise). A first-order exponential-integrator (DDIM) step
from ``s`` to ``t`` with data prediction ``d`` is

.. math::  x_t = r\,x_s + (\beta_t - r\beta_s)\,d, \qquad r = \alpha_t / \alpha_s ,

exact when ``d`` is the true data point (all noise on one trajectory is the same :math:`x_0`); for the
linear path it equals the Euler step :math:`x_s + (t - s)v`.
"""

from __future__ import annotations

import torch
from torch import Tensor

PATHS = ("linear", "follmer")


def time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Time as a tensor broadcastable against ``x`` (a scalar stays 0-d, ``(B,)`` becomes ``(B, 1, ...)``)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.view(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


class AffinePath:
    r"""The linear path ``x_t = (1 - t) x0 + t x1``; subclasses change :math:`\alpha_t, \beta_t` (and the
    unit conventions of the module docstring). Time arguments are scalars, ``(B,)`` tensors or tensors
    already broadcastable against the data (:func:`time_column`)."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def beta(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_beta(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def c_skip(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def kappa(self, t: Tensor) -> Tensor:
        """Velocity per unit of network output: ``v = kappa(t) * F``."""
        return torch.ones_like(t)

    def train_t_max(self) -> float:
        """Largest training time (below 1 where the velocity is singular at the data end)."""
        return 1.0

    # ---------------------------------------------------------------- samples and targets
    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """The point ``x_t = alpha_t x0 + beta_t x1``."""
        t = time_column(t, x1)
        return self.alpha(t) * x0 + self.beta(t) * x1

    def velocity_target(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """The conditional velocity ``d x_t / dt = alpha'_t x0 + beta'_t x1``."""
        t = time_column(t, x1)
        return self.d_alpha(t) * x0 + self.d_beta(t) * x1

    def output_target(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Regression target of the network output ``F`` at ``x_t``: ``(d x_t / dt) / kappa_t``."""
        return x1 - x0

    # ---------------------------------------------------------------- conversions
    def velocity_from_output(self, out: Tensor, t: Tensor | float) -> Tensor:
        """``v = kappa_t F`` (the output itself on the linear path)."""
        return out

    def output_from_velocity(self, v: Tensor, t: Tensor | float) -> Tensor:
        """``F = v / kappa_t`` (the velocity itself on the linear path)."""
        return v

    def denoise_output(self, x: Tensor, out: Tensor, t: Tensor | float) -> Tensor:
        """Data prediction ``d = c_t x + alpha_t F`` from the network output ``F``."""
        t = time_column(t, x)
        return self.c_skip(t) * x + self.alpha(t) * out

    def denoise_velocity(self, x: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
        """Data prediction from a velocity (``F = v / kappa``)."""
        t = time_column(t, x)
        return self.c_skip(t) * x + (self.alpha(t) / self.kappa(t)) * v

    def exp_step(self, x: Tensor, d: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """Exponential-integrator step ``s -> t`` with data prediction ``d``; exactly ``x`` when ``s == t``."""
        s, t = time_column(s, x), time_column(t, x)
        # r = alpha_t / alpha_s is exactly 1.0 for s == t, so the data coefficient beta_t - r beta_s is
        # exactly 0 and the step returns x bit for bit (the identity g(t, t, x) = x is hard-wired)
        r = self.alpha(t) / self.alpha(s)
        return r * x + (self.beta(t) - r * self.beta(s)) * d


LinearPath = AffinePath


class FollmerPath(AffinePath):
    """Föllmer flow ``x_t = sqrt(1 - t^2) x0 + t x1``."""

    name = "follmer"

    def alpha(self, t: Tensor) -> Tensor:
        return (1.0 - t * t).clamp_min(0.0).sqrt()

    def d_alpha(self, t: Tensor) -> Tensor:
        return -t / self.alpha(t)

    def c_skip(self, t: Tensor) -> Tensor:
        return t

    def kappa(self, t: Tensor) -> Tensor:
        # t is clamped below 1 so that a stray evaluation at t = 1 stays finite (v is singular there)
        return 1.0 / self.alpha(t.clamp_max(1.0 - 1e-6))

    def output_target(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        # (alpha' x0 + x1) * alpha = -t x0 + alpha x1: bounded, unlike the velocity itself
        return self.alpha(t) * x1 - t * x0

    def velocity_from_output(self, out: Tensor, t: Tensor | float) -> Tensor:
        return self.kappa(time_column(t, out)) * out

    def output_from_velocity(self, v: Tensor, t: Tensor | float) -> Tensor:
        return v / self.kappa(time_column(t, v))

    def train_t_max(self) -> float:
        return 1.0 - 1e-5


def make_path(name: str) -> AffinePath:
    """The path called ``name`` (one of :data:`PATHS`)."""
    if name == "linear":
        return LinearPath()
    if name == "follmer":
        return FollmerPath()
    raise ValueError(f"path must be one of {PATHS}, got {name!r}")
