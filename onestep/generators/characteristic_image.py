r"""The characteristic generator's image loss, as in the authors' code (a CTM-style distillation).

Paper time (``t = 0`` noise, ``t = 1`` data); grid :math:`t_0 < \dots < t_{N-1}` linear on
``[t_min, t_max]`` (the code: N = 20 on [0.001, 0.999]); :math:`g_\theta` the student map,
:math:`g_{\theta^-}` the same map with the student's EMA weights (the target network).

1. **Denoising term** (local consistency, keeps :math:`\partial_t g(s, t, x)|_{t=s}` equal to the
   velocity): :math:`t \sim U[0, t_{max}]`, :math:`x_t = \alpha_t z + \beta_t x_1`,
   :math:`L_{DSM} = E\,\|D_\theta(x_t, t, t) - x_1\|^2 / \alpha_t^2` (the code's weight; in network-output
   units this is the plain velocity regression).
2. **Trajectory term**: one teacher step count :math:`n \in \{1..N-1\}` per batch with
   :math:`P(n) \propto n`; per sample :math:`i \sim U\{0..N-n-1\}`, :math:`j = i + n`,
   :math:`k \sim U\{j..N-1\}` and times :math:`t = t_i < u = t_j \le s = t_k`. Student path
   :math:`\hat x = g_{\theta^-}(s, 1, g_\theta(t, s, x_t))` (gradients flow through the EMA net's input);
   target, without gradient, :math:`\tilde x = g_{\theta^-}(s, 1, g_\theta(u, s, \Phi^n(x_t)))` with
   :math:`\Phi^n` ``n`` teacher steps along the grid. :math:`L_{traj} = \mathrm{dist}(\hat x, \tilde x)`,
   L2 (mean squared error) by default or LPIPS from a weights file.
3. **Adaptive weight** (Esser et al. 2021, as CTM):
   :math:`\lambda = \mathrm{clamp}(\|\nabla_W L_{traj}\| / (\|\nabla_W L_{DSM}\| + 10^{-4}), 0, 10^4)`,
   detached, ``W`` the student's output layer; the loss is :math:`L_{traj} + w\,\lambda L_{DSM}` with
   ``w = dsm_weight`` (1 in the code), or :math:`L_{traj} + w L_{DSM}` without the adaptive weight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.generators.characteristic_teacher import CharacteristicModel, last_weight
from onestep.solvers import solve

Distance = Callable[[Tensor, Tensor], Tensor]


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over samples and coordinates."""
    return (a - b).square().mean()


class LPIPSDistance:
    """LPIPS (VGG) from the ``lpips`` package with every weight read from a local file.

    The file must hold the full ``lpips.LPIPS(net="vgg")`` state dict (backbone and linear heads), e.g.
    written on a machine with internet by ``torch.save(lpips.LPIPS(net="vgg").state_dict(), path)``;
    nothing is downloaded. Inputs are in [-1, 1]; grey images are repeated to 3 channels and, as in the
    authors' code, resized to 224 x 224. The authors used piq's LPIPS with average pooling: numbers from
    this network are close to but not identical with theirs.
    """

    def __init__(self, weights_path: str, resize: int = 224) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"lpips_weights={weights_path!r}: no such file (a torch.save of "
                                    "lpips.LPIPS(net='vgg').state_dict()); leave lpips_weights unset for L2")
        try:
            import lpips  # noqa: PLC0415 - optional dependency, imported only when asked for
        except Exception as err:  # noqa: BLE001 - lpips also fails when torchvision does not import
            raise ImportError(f"lpips_weights={weights_path!r} needs the 'lpips' package (and torchvision), "
                              f"which failed to import: {err}; install them or leave lpips_weights unset for L2"
                              ) from err
        net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"lpips_weights={weights_path!r}: not an LPIPS-VGG state dict ({err})") from err
        self.net: nn.Module = net.eval().requires_grad_(False)
        self.resize = resize

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        self.net.to(a.device)
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if self.resize and a.shape[-1] != self.resize:
            a = F.interpolate(a, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return self.net(a, b).mean()


def make_distance(lpips_weights: str | None) -> tuple[str, Distance]:
    """``("l2", l2_distance)`` by default, ``("lpips", LPIPSDistance(path))`` when a weights file is given."""
    if lpips_weights is None:
        return "l2", l2_distance
    return "lpips", LPIPSDistance(lpips_weights)


def draw_teacher_steps(n_grid: int) -> int:
    """One teacher step count ``n`` in ``{1, ..., n_grid - 1}`` with ``P(n)`` proportional to ``n``."""
    weights = torch.arange(1, n_grid, dtype=torch.float64)
    return int(torch.multinomial(weights, 1).item()) + 1


def adaptive_weight(main: Tensor, other: Tensor, weight: nn.Parameter) -> Tensor:
    """``clamp(|grad_W main| / (|grad_W other| + 1e-4), 0, 1e4)``, detached (gradients of the output layer)."""
    grads = []
    for loss in (main, other):
        (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros((), device=weight.device) if grad is None else grad.norm())
    return (grads[0] / (grads[1] + 1e-4)).clamp(0.0, 1e4).detach()


def image_loss(gen: CharacteristicModel, x1: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of the module docstring for one batch ``x1`` of normalised data."""
    path, grid = gen.interpolant, gen.grid_times(include_end=False).to(x1)
    n_grid, batch = len(grid), len(x1)

    # 1. denoising term at a uniform time
    t_dsm = torch.rand(batch, device=x1.device) * gen.t_max
    z = torch.randn_like(x1)
    x_dsm = path.interpolate(z, x1, t_dsm)
    out = gen.student(x_dsm, t_dsm, t_dsm)
    # (D - x1) / alpha in output units: D = c x + alpha F, so the residual is F - target exactly
    dsm = (out - path.output_target(z, x1, t_dsm.view(-1, *([1] * (x1.dim() - 1))))).square().mean()

    # 2. trajectory term
    n = draw_teacher_steps(n_grid)
    i = torch.randint(0, n_grid - n, (batch,), device=x1.device)
    j = i + n
    k = j + (torch.rand(batch, device=x1.device) * (n_grid - j)).long().clamp_max(n_grid - 1 - j)
    t, u, s = grid[i], grid[j], grid[k]
    x_t = path.interpolate(torch.randn_like(x1), x1, t)
    x_hat = gen.map_ema(gen.map(x_t, t, s), s, torch.ones_like(s))
    with torch.no_grad():
        x_u = solve(gen.teacher_step, x_t, [grid[i + step] for step in range(n + 1)])  # n teacher steps
        x_tilde = gen.map_ema(gen.map(x_u, u, s), s, torch.ones_like(s))
    traj = gen.distance(x_hat, x_tilde)

    # 3. weighting
    if gen.adaptive_weight:
        lam = adaptive_weight(traj, dsm, last_weight(gen.student.net))
        loss = traj + gen.dsm_weight * lam * dsm
    else:
        lam = torch.ones((), device=x1.device)
        loss = traj + gen.dsm_weight * dsm
    logs = {"traj": traj.detach(), "dsm": dsm.detach(), "adaptive_weight": lam,
            "teacher_steps": torch.tensor(float(n), device=x1.device)}
    return loss, logs
