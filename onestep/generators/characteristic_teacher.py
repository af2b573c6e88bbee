r"""Interpolants, teacher steps and the two-time student network of the characteristic generator.

Time runs as in the paper: ``t = 0`` is the Gaussian, ``t = 1`` the data. An interpolant is

.. math::  x_t = \alpha_t z + \beta_t x_1, \qquad z \sim N(0, I),

* ``linear``:  :math:`\alpha_t = 1 - t,\ \beta_t = t` (rectified flow; what ``FlowMatching`` trains);
* ``follmer``: :math:`\alpha_t = \sqrt{1 - t^2},\ \beta_t = t` (Föllmer flow, variance preserving; the
  authors' image code).

Every network here outputs ``F`` in *velocity units*: the velocity is :math:`v = \kappa_t F` with
:math:`\kappa = 1` (linear) or :math:`\kappa = 1/\alpha_t` (Föllmer, which keeps ``F`` bounded while
:math:`v` blows up at ``t = 1``). The data prediction (denoiser) :math:`d = E[x_1 | x_t]` follows from
:math:`x_1 = x_t + \ldots` exactly as

.. math::  d = c_t\,x + \alpha_t F, \qquad c_t = 1 \text{ (linear)},\ c_t = t \text{ (Föllmer)},

(for the linear path :math:`d = x + (1 - t)v` holds for any coupling, since
:math:`x_1 = x_t + (1 - t)(x_1 - x_0)` pointwise). A first-order exponential-integrator (DDIM) step from
``s`` to ``t`` with data prediction ``d`` is

.. math::  x_t = r\,x_s + (\beta_t - r\beta_s)\,d, \qquad r = \alpha_t / \alpha_s ,

which for the linear path equals the Euler step :math:`x_s + (t - s)v`. The characteristic map uses the
same formula with a learned ``d`` (see :mod:`onestep.generators.characteristic`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onestep.generators.flow_matching import FlowMatching
from onestep.nets import SinusoidalTimeEmbedding, as_batch_time, build_backbone
from onestep.nets.unet import ResBlock

INTERPOLANTS = ("linear", "follmer")
SOLVERS = ("euler", "exp")


def time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Time as a tensor broadcastable against ``x`` (a scalar stays 0-d, ``(B,)`` becomes ``(B, 1, ...)``)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.view(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


class Interpolant:
    """``x_t = alpha(t) z + beta(t) x1`` with the velocity-unit conventions of the module docstring."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def beta(self, t: Tensor) -> Tensor:
        return t

    def c_skip(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def kappa(self, t: Tensor) -> Tensor:
        """Velocity per unit of network output: ``v = kappa(t) * F``."""
        return torch.ones_like(t)

    def output_target(self, z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Regression target of ``F`` at ``x_t``: the conditional velocity ``alpha' z + beta' x1`` over kappa."""
        return x1 - z

    def train_t_max(self) -> float:
        return 1.0

    # ---------------------------------------------------------------- derived formulas
    def interpolate(self, z: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        t = time_column(t, x1)
        return self.alpha(t) * z + self.beta(t) * x1

    def denoise_output(self, x: Tensor, out: Tensor, t: Tensor | float) -> Tensor:
        """Data prediction ``d = c(t) x + alpha(t) F`` from the network output ``F``."""
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


class FollmerInterpolant(Interpolant):
    """Föllmer flow ``x_t = sqrt(1 - t^2) z + t x1``."""

    name = "follmer"

    def alpha(self, t: Tensor) -> Tensor:
        return (1.0 - t * t).clamp_min(0.0).sqrt()

    def c_skip(self, t: Tensor) -> Tensor:
        return t

    def kappa(self, t: Tensor) -> Tensor:
        # t is clamped below 1 so that a stray evaluation at t = 1 stays finite (v is singular there)
        return 1.0 / self.alpha(t.clamp_max(1.0 - 1e-6))

    def output_target(self, z: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        # (alpha' z + x1) * alpha = -t z + alpha x1: bounded, unlike the velocity itself
        return self.alpha(t) * x1 - t * z

    def train_t_max(self) -> float:
        return 1.0 - 1e-5


def make_interpolant(name: str) -> Interpolant:
    if name == "linear":
        return Interpolant()
    if name == "follmer":
        return FollmerInterpolant()
    raise ValueError(f"interpolant must be one of {INTERPOLANTS}, got {name!r}")


class ScaledVelocityNet(nn.Module):
    """Wraps a backbone ``F(x, t)`` so that ``forward`` returns the velocity ``kappa(t) * F`` (Föllmer teacher)."""

    def __init__(self, inner: nn.Module, interpolant: Interpolant) -> None:
        super().__init__()
        self.inner, self.interpolant = inner, interpolant

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.interpolant.kappa(time_column(t, x)) * self.inner(x, t)


def teacher_output_net(teacher: Any) -> nn.Module | None:
    """The backbone whose output is ``F`` (velocity units) of a FlowMatching teacher, else ``None``."""
    net = getattr(teacher, "net", None) if isinstance(teacher, FlowMatching) else None
    return net.inner if isinstance(net, ScaledVelocityNet) else net


def make_teacher(data_shape: Sequence[int], backbone: Mapping[str, Any] | None, interpolant: Interpolant,
                 steps: int) -> FlowMatching:
    """A fresh FlowMatching teacher (independent coupling: the paper's velocity matching)."""
    teacher = FlowMatching(data_shape=data_shape, backbone=backbone, coupling="independent", sampler="euler",
                           steps=steps)
    if interpolant.name != "linear":
        teacher.net = ScaledVelocityNet(teacher.net, interpolant)
    return teacher


def load_teacher_checkpoint(path: str, data_shape: Sequence[int]) -> FlowMatching:
    """A frozen FlowMatching teacher with the EMA weights of the Lightning checkpoint at ``path``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` (naming the path) when it is
    not a readable FlowMatching checkpoint with EMA weights for data of shape ``data_shape``.
    """
    where = f"teacher_ckpt={str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file; train the teacher first, e.g. "
                                "`onestep fit --config configs/flow_matching/<dataset>.yaml`, and pass its .ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means "not a checkpoint"
        raise ValueError(f"{where}: could not be read as a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{where}: not a Lightning checkpoint (needs 'state_dict' and 'hyper_parameters')")
    hparams = dict(ckpt["hyper_parameters"])
    class_path = str(hparams.get("_class_path", "FlowMatching"))
    if class_path.rsplit(".", 1)[-1] != "FlowMatching":
        raise ValueError(f"{where}: the teacher must be a FlowMatching checkpoint, this one is {class_path}")
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        teacher = FlowMatching(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: its hyperparameters do not describe a FlowMatching model ({err})") from err
    if tuple(teacher.data_shape) != tuple(data_shape):
        raise ValueError(f"{where}: the teacher was trained on data of shape {list(teacher.data_shape)}, "
                         f"this run's data has shape {list(data_shape)}")
    if "ema" not in ckpt:
        raise ValueError(f"{where}: has no EMA weights (checkpoint['ema']); save it with a OneStepGenerator")
    state = dict(ckpt["state_dict"])
    state.update(ckpt["ema"])  # the teacher is the averaged model, as in the authors' code
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where}: weights do not fit the backbone {teacher.backbone_spec} "
                         f"({str(err).splitlines()[0]})") from err
    return teacher


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class TwoTimeNet(nn.Module):
    r"""``F(x, s, t)``: a backbone run at start time ``s`` on ``x`` that also sees the target time ``t``.

    ``target_time_input`` says where ``t`` enters:

    * ``input``: sinusoidal features of ``t`` are appended to the input (extra coordinates for vectors,
      extra constant channels for images), so any ``mlp`` or ``unet`` backbone takes two times unchanged;
      for an MLP this is how it sees ``s`` too, for a UNet ``t`` then reaches only the input convolution;
    * ``blocks`` (UNet only, the authors' code): ``t`` gets its own embedding MLP, and every residual
      block a FiLM layer of its own whose (scale, shift) is added to the block's ``s`` FiLM output.

    :meth:`init_from` copies a teacher backbone ``F(x, s)`` and zeroes the weights that read ``t`` (the
    input columns, or the last layer of each per-block ``t`` FiLM), so the student starts *exactly* at the
    teacher (``F(x, s, t) = F_teacher(x, s)``; spec #9).
    """

    def __init__(self, spec: Mapping[str, Any] | None, data_shape: Sequence[int], t_features: int = 16,
                 target_time_input: str = "input") -> None:
        super().__init__()
        self.data_shape, self.t_features = tuple(data_shape), int(t_features)
        self.target_time_input = target_time_input
        name = (spec or {}).get("name") if isinstance(spec, Mapping) else spec
        name = None if name is None else str(name).lower().replace("-", "_")
        if name is not None and name not in ("mlp", "unet"):
            raise ValueError(f"backbone {name!r} cannot serve the characteristic map, whose input carries the "
                             "target time as extra features; use 'mlp' (vectors or images) or 'unet' (images)")
        if len(self.data_shape) not in (1, 3):
            raise ValueError(f"the characteristic map needs vectors (d,) or images (C, H, W), got {self.data_shape}")
        if target_time_input == "blocks":
            if len(self.data_shape) != 3 or name not in (None, "unet"):
                raise ValueError("target_time_input='blocks' needs the 'unet' backbone on images (C, H, W); "
                                 f"got backbone {name or 'mlp'!r} on data of shape {list(self.data_shape)}: "
                                 "use target_time_input='input'")
            self.net = build_backbone(spec, self.data_shape, self.data_shape)
            self._add_block_films()
            return
        if len(self.data_shape) == 1:
            in_shape: tuple[int, ...] = (self.data_shape[0] + self.t_features,)
        else:
            in_shape = (self.data_shape[0] + self.t_features, *self.data_shape[1:])
        self.t_embed = SinusoidalTimeEmbedding(self.t_features)
        self.net = build_backbone(spec, in_shape, self.data_shape)

    def _add_block_films(self) -> None:
        """The ``blocks`` layers: a ``t`` embedding MLP and, per FiLM-conditioned block, a zero-initialised
        ``SiLU -> Linear`` whose output is added (by a forward hook) to that block's ``s`` FiLM output."""
        films = [m.film for m in self.net.modules() if isinstance(m, ResBlock) and m.film is not None]
        if not films:
            raise ValueError("target_time_input='blocks' needs a time-conditioned UNet (time_dim > 0)")
        dim = films[0][-1].in_features
        self.t_embed = nn.Sequential(SinusoidalTimeEmbedding(self.t_features), nn.Linear(self.t_features, dim),
                                     nn.SiLU(), nn.Linear(dim, dim))
        self.t_films = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(dim, f[-1].out_features)) for f in films)
        self._zero_target_weights()
        self._target_emb: Tensor | None = None
        for film, extra in zip(films, self.t_films):
            film.register_forward_hook(functools.partial(self._add_target_film, extra))

    def _add_target_film(self, extra: nn.Module, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._target_emb is None:
            raise RuntimeError("TwoTimeNet: the UNet ran without a target time; call the TwoTimeNet, not its .net")
        return output + extra(self._target_emb)

    @torch.no_grad()
    def _zero_target_weights(self) -> None:
        for film in getattr(self, "t_films", []):
            nn.init.zeros_(film[-1].weight)
            nn.init.zeros_(film[-1].bias)

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        t_batch = as_batch_time(t, len(x), like=x)
        if self.target_time_input == "blocks":
            self._target_emb = self.t_embed(t_batch).to(x.dtype)
            try:
                return self.net(x, as_batch_time(s, len(x), like=x))
            finally:
                self._target_emb = None
        feats = self.t_embed(t_batch).to(x.dtype)
        if x.dim() == 4:
            feats = feats[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return self.net(torch.cat([x, feats], dim=1), as_batch_time(s, len(x), like=x))

    def _widened(self, student: Tensor, teacher: Tensor) -> int | None:
        """Where the ``t`` features enter a first-layer weight that is wider than the teacher's, else None."""
        if student.shape == teacher.shape or student.dim() < 2 or student.dim() != teacher.dim():
            return None
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            return None
        # a Linear layer reads the flattened input, a convolution reads channels
        n_data = math.prod(self.data_shape) if student.dim() == 2 else self.data_shape[0]
        n_extra = self.t_features * (math.prod(self.data_shape[1:]) if student.dim() == 2 else 1)
        return n_data if student.shape[1] - teacher.shape[1] == n_extra else None

    def check_compatible(self, teacher_net: nn.Module) -> None:
        """Raise ``ValueError`` unless :meth:`init_from` can copy ``teacher_net``."""
        mine, theirs = self.net.state_dict(), teacher_net.state_dict()
        problem = None
        if set(mine) != set(theirs):
            problem = f"different layers ({sorted(set(mine) ^ set(theirs))[:4]} ...)"
        else:
            odd = [k for k in mine if mine[k].shape != theirs[k].shape and self._widened(mine[k], theirs[k]) is None]
            widened = [k for k in mine if mine[k].shape != theirs[k].shape]
            if odd or len(widened) != (0 if self.target_time_input == "blocks" else 1):
                problem = f"layer shapes differ ({(odd or widened)[:4]})"
        if problem:
            raise ValueError("cannot initialise the student from the teacher: their backbones differ, "
                             f"{problem}; use the same backbone spec for both or set init_student_from_teacher=False")

    @torch.no_grad()
    def init_from(self, teacher_net: nn.Module) -> None:
        """Copy the teacher's weights; the columns reading the target-time features start at zero."""
        self.check_compatible(teacher_net)
        theirs = teacher_net.state_dict()
        for key, value in self.net.state_dict().items():
            src = theirs[key].to(value)
            at = self._widened(value, src)
            if at is None:
                value.copy_(src)
            else:
                width = value.shape[1] - src.shape[1]
                value.zero_()
                value[:, :at] = src[:, :at]
                value[:, at + width:] = src[:, at:]
        self._zero_target_weights()


def stage_schedule(start: int, end: int | None, warmup: int, cosine: bool):
    """Learning-rate factor of a network that trains only in steps ``[start, end)``: linear warm-up over
    ``warmup`` steps from the stage start, then constant or cosine decay to 0 at ``end``; 0 outside."""
    def factor(step: int) -> float:
        if step < start or (end is not None and step >= end):
            return 0.0
        local = step - start
        warm = min(1.0, (local + 1) / warmup) if warmup > 0 else 1.0
        if cosine and end:
            progress = min(1.0, max(0.0, (local - warmup) / max(1, end - start - warmup)))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm
    return factor


def last_weight(module: nn.Module) -> nn.Parameter:
    """The last registered weight matrix or kernel: the output layer, where the adaptive weight is measured."""
    weights = [p for p in module.parameters() if p.dim() >= 2]
    if not weights:
        raise ValueError("the student network has no weight matrix for the adaptive loss weight")
    return weights[-1]
