r"""Fixed-step ODE solvers for ``dx/dt = v(x, t)`` on a given time grid.

A *velocity* is any callable ``v(x, t)``; ``t`` is passed as a tensor of ``x``'s dtype, a 0-d tensor when
the grid holds scalars or a ``(B,)`` tensor when every sample has its own times. With step
:math:`h = t - s`:

* Euler (order 1): :math:`x_t = x_s + h\,v(x_s, s)`; the global error on a fixed interval is
  :math:`O(h)`, so doubling the steps halves it.
* Heun (order 2, explicit trapezoid): :math:`\tilde x = x_s + h\,v(x_s, s)`,
  :math:`x_t = x_s + \tfrac h2\,(v(x_s, s) + v(\tilde x, t))`; error :math:`O(h^2)`, a quarter per doubling.
* Exponential integrator (first order, DDIM): with a path's data prediction
  :math:`d = d(x_s, v(x_s, s), s)`, :math:`x_t = r x_s + (\beta_t - r\beta_s) d`, :math:`r = \alpha_t/\alpha_s`
  (:meth:`onestep.paths.AffinePath.exp_step`). It integrates the linear part of the probability-flow ODE
  exactly, so it is exact whenever ``d`` is (a point mass), and it lands on ``d`` at ``t = 1``.

A step function has the signature ``step(x, s, t) -> x_t``; :func:`solve` and :func:`trajectory` run one
over a grid. The arithmetic of each step is fixed (the generators' results depend on it bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from onestep.paths import AffinePath, time_column

Velocity = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[Tensor, Any, Any], Tensor]

FIXED_STEP_METHODS = ("euler", "heun")


def _time(t: Any, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device)


def euler_step(velocity: Velocity, x: Tensor, s: Any, t: Any) -> Tensor:
    """``x + (t - s) v(x, s)``."""
    s, t = _time(s, x), _time(t, x)
    return x + time_column(t - s, x) * velocity(x, s)


def heun_step(velocity: Velocity, x: Tensor, s: Any, t: Any) -> Tensor:
    """``x + (t - s)/2 (v(x, s) + v(x_euler, t))`` with ``x_euler`` the Euler step."""
    s, t = _time(s, x), _time(t, x)
    h = time_column(t - s, x)
    v = velocity(x, s)
    x_euler = x + h * v
    return x + h * 0.5 * (v + velocity(x_euler, t))


def exponential_step(path: AffinePath, velocity: Velocity, x: Tensor, s: Any, t: Any) -> Tensor:
    """The exponential-integrator step of ``path`` with the data prediction of ``v(x, s)``."""
    s_tensor = _time(s, x)
    v = velocity(x, s_tensor)
    return path.exp_step(x, path.denoise_velocity(x, v, s), s, t)


def fixed_step(method: str, velocity: Velocity) -> Step:
    """``step(x, s, t)`` of ``method`` (``euler`` or ``heun``) for ``velocity``."""
    if method == "euler":
        return lambda x, s, t: euler_step(velocity, x, s, t)
    if method == "heun":
        return lambda x, s, t: heun_step(velocity, x, s, t)
    raise ValueError(f"method must be one of {FIXED_STEP_METHODS}, got {method!r}")


def _pairs(times: Sequence[Any] | Tensor) -> Iterable[tuple[Any, Any]]:
    return zip(times[:-1], times[1:])


def solve(step: Step, x: Tensor, times: Sequence[Any] | Tensor) -> Tensor:
    """``x`` carried over the grid ``times`` (``len(times) - 1`` steps); the state at the last time."""
    for s, t in _pairs(times):
        x = step(x, s, t)
    return x


def trajectory(step: Step, x: Tensor, times: Sequence[Any] | Tensor) -> list[Tensor]:
    """The states at every time of ``times``, starting with ``x`` itself."""
    states = [x]
    for s, t in _pairs(times):
        states.append(step(states[-1], s, t))
    return states
