r"""Characteristic generator (Ding, Duan, Jiao, Li, Yang, Zhang 2024, arXiv:2405.05512).

A two-time map :math:`g(s, t, x)` sends a point at time ``s`` of a teacher ODE trajectory (probability
flow of an interpolant, ``t = 0`` noise, ``t = 1`` data; see
:mod:`onestep.generators.characteristic_teacher`) to its point at time ``t``. It is parameterised like an
exponential-integrator step with a learned data prediction:

.. math::  g(s, t, x) = r\,x + (\beta_t - r\beta_s)\,D_\theta(x, s, t), \qquad r = \alpha_t/\alpha_s,
           \qquad D_\theta = c_s\,x + \alpha_s F_\theta(x, s, t),

so :math:`g(t, t, x) = x` exactly, and with the teacher's network in place of :math:`F_\theta` one map
step is one teacher step (an Euler step for the linear path). Sampling: :math:`x = g(t_{min}, 1, z)`
(NFE 1), or the map chained over ``sample_steps`` grid times (NFE = ``sample_steps``).

Two stages. **Teacher**: a :class:`~onestep.generators.FlowMatching` velocity, trained in stage 1 of the
same run for ``teacher_steps`` steps with FlowMatching's own loss (linear or Föllmer path; in
network-output units, which for the Föllmer path is the authors' 1/alpha^2-weighted denoiser loss) and
then frozen at its EMA weights, or loaded from a FlowMatching checkpoint (``teacher_ckpt``, EMA weights,
its ``path``), or passed as an
object with ``velocity(x, t)`` through :meth:`set_teacher`. **Student** (stage 2), by ``mode``:

* ``vector`` (the paper): Gaussian starts :math:`Z_0 \sim N(0, I)` are carried along the grid
  :math:`0 = t_0 < \dots < t_{K-1} = t_{max}` (plus ``t = 1`` when ``t_max < 1``, reached by the
  teacher's exact data prediction) by Euler or exponential-integrator teacher steps (online, no grad);
  the characteristic-fitting loss (eq. 2.11 with the diagonal hard-wired) is a mean over ordered
  pairs :math:`k < l` of :math:`\|Z_l - g(t_k, t_l, Z_k)\|^2`, estimated with ``pairs_per_trajectory``
  pairs per trajectory (``pair_sampling``: uniform, or long jumps favoured), plus ``semigroup_weight``
  times the semigroup penalty :math:`\|g(t_j, t_l, g(t_k, t_j, Z_k)) - g(t_k, t_l, Z_k)\|^2` over
  uniform triples ``k < j < l`` (gradients through both sides); see
  :mod:`onestep.generators.characteristic_vector`;
* ``image`` (the authors' code): see :mod:`onestep.generators.characteristic_image`.

Stages (:mod:`onestep.generators.staged`): stage 2 starts at the first batch with
``global_step >= teacher_steps`` (teacher := its EMA, frozen; student := teacher copy; EMA restarted); the
stage is saved in the checkpoint. Each stage leaves the other network without gradients, so under DDP
``onestep fit`` switches on DDP's unused-parameter search (``trains_in_stages``). Teacher steps, teacher
trajectories and multi-step sampling run on :mod:`onestep.solvers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from onestep import solvers
from onestep.generators.base import OneStepGenerator, _check
from onestep.generators.characteristic_image import image_loss, make_distance
from onestep.generators.characteristic_teacher import (
    INTERPOLANTS, SOLVERS, TwoTimeNet, freeze, load_teacher_checkpoint, make_teacher, rename_legacy_target_time_keys,
    rename_legacy_teacher_keys, teacher_output_net, teacher_path_name,
)
from onestep.generators.characteristic_vector import PAIR_SAMPLINGS, vector_loss
from onestep.options import AtLeastOne, Fraction, NonNegative, Positive, Range
from onestep.generators.staged import StagedTraining, stage_schedule
from onestep.paths import make_path

MODES = ("auto", "vector", "image")
DISTANCES = ("l2", "lpips")
GRID_SPACINGS = ("uniform", "data_dense")
OPTIMIZERS = ("adamw", "radam")
TARGET_TIME_INPUTS = ("input", "blocks")


class CharacteristicGenerator(StagedTraining, OneStepGenerator):
    """One-step (or few-step) characteristic map distilled from a flow-matching teacher.

    Args (besides the base optimiser/EMA options, which apply to the student):
        mode: ``vector`` (paper), ``image`` (authors' code) or ``auto`` (image for (C, H, W) data).
        interpolant: ``linear`` or ``follmer`` for a stage-1 teacher; ``None``: linear, or the teacher's own.
        teacher_steps: stage-1 steps (0: the teacher comes from ``teacher_ckpt`` or :meth:`set_teacher`).
        teacher_ckpt: path of a FlowMatching Lightning checkpoint (its EMA weights are the teacher).
        teacher_backbone, teacher_lr, teacher_warmup_steps, teacher_ema_decay: stage-1 settings
            (default: the student's backbone, ``lr``, 0 and ``ema_decay``).
        init_student_from_teacher: start the student as the teacher (target-time weights zeroed).
        grid_size: grid points on ``[t_min, t_max]`` (K of the paper's characteristics; N = 20 in the code).
        t_min, t_max: grid range; the last map always goes on to ``t = 1``.
        grid_spacing: ``uniform`` (the code) or ``data_dense``,
            :math:`t_k = t_{min} + (t_{max} - t_{min}) \sin(\pi u_k / 2)` with ``u`` uniform on [0, 1]:
            steps shrink towards the data end (spec §1.3: about half the Euler error at K = 20).
        solver: teacher step, ``euler`` (the paper) or ``exp`` (exponential integrator, the code).
        pairs_per_trajectory, semigroup_weight: vector mode (pairs per teacher trajectory, penalty weight).
        pair_sampling: vector mode pairs, ``uniform`` over ordered pairs or ``long`` (jump length
            ``P(n) ∝ n``); see :mod:`onestep.generators.characteristic_vector`.
        trajectory_batch: vector mode, teacher trajectories per step (``None``: the batch size); each gives
            ``pairs_per_trajectory`` pairs. The teacher's solve is most of a step's cost.
        optimizer: ``adamw`` or ``radam`` (the authors'; decoupled weight decay), both stages.
        target_time_input: how the student's UNet sees the target time: ``input`` (extra input channels)
            or ``blocks`` (the UNet's ``second_time``: its own embedding, and a FiLM per residual block added
            to the block's FiLM, as the authors' code). The default ``input`` was not measured against
            ``blocks`` (no budget for image runs on CPU); the MNIST configs use ``blocks``, the spec's.
        dsm_weight, adaptive_weight: image mode weight of the denoising term (times the adaptive weight).
        distance, lpips_weights: image mode trajectory distance, ``l2`` or ``lpips`` (needs ``lpips_weights``,
            a local LPIPS-VGG state dict; nothing is downloaded).
        sample_steps: maps per sample (the NFE).
        t_features: sinusoidal features of the target time fed to the student.
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        mode: Literal[MODES] = "auto",
        interpolant: Literal[INTERPOLANTS] | None = None,
        teacher_steps: Annotated[int, NonNegative] = 0,
        teacher_ckpt: str | None = None,
        teacher_backbone: Mapping[str, Any] | None = None,
        teacher_lr: Annotated[float, Positive] | None = None,
        teacher_warmup_steps: Annotated[int, NonNegative] = 0,
        teacher_ema_decay: Annotated[float, Fraction] | None = None,
        init_student_from_teacher: bool = True,
        grid_size: Annotated[int, Range(ge=2)] = 50,
        t_min: Annotated[float, Range(ge=0, le=1)] = 0.0,
        t_max: Annotated[float, Range(ge=0, le=1)] = 0.999,
        grid_spacing: Literal[GRID_SPACINGS] = "uniform",
        solver: Literal[SOLVERS] = "euler",
        pairs_per_trajectory: Annotated[int, AtLeastOne] = 4,
        semigroup_weight: Annotated[float, NonNegative] = 1.0,
        pair_sampling: Literal[PAIR_SAMPLINGS] = "long",
        trajectory_batch: Annotated[int, Range(ge=1, note="or null: the batch size")] | None = None,
        optimizer: Literal[OPTIMIZERS] = "adamw",
        target_time_input: Literal[TARGET_TIME_INPUTS] = "input",
        dsm_weight: Annotated[float, NonNegative] = 1.0,
        adaptive_weight: bool = True,
        distance: Literal[DISTANCES] = "l2",
        lpips_weights: str | None = None,
        sample_steps: Annotated[int, AtLeastOne] = 1,
        t_features: Annotated[int, AtLeastOne] = 16,
        **base: Any,
    ) -> None:
        super().__init__(data_shape=data_shape, backbone=backbone, **base)
        _check(not (teacher_ckpt and teacher_steps > 0), f"give either teacher_ckpt ({teacher_ckpt!r}) or "
               f"teacher_steps > 0 (got {teacher_steps}), not both")
        _check(t_min < t_max, f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.mode = ("image" if len(self.data_shape) == 3 else "vector") if mode == "auto" else mode
        _check((distance == "lpips") == bool(lpips_weights), f"distance={distance!r} and lpips_weights="
               f"{lpips_weights!r} disagree: LPIPS needs a weights file, L2 takes none")
        _check(distance == "l2" or (self.mode == "image" and len(self.data_shape) == 3),
               "distance='lpips' applies to image mode on (C, H, W) data only")
        self.sample_steps = sample_steps
        self.teacher_steps, self.teacher_ckpt = teacher_steps, teacher_ckpt
        self.teacher_lr = teacher_lr if teacher_lr is not None else self.lr
        self.teacher_warmup_steps = teacher_warmup_steps
        self.teacher_ema_decay = teacher_ema_decay if teacher_ema_decay is not None else self.ema_decay
        self.init_student_from_teacher = init_student_from_teacher
        self.grid_size, self.t_min, self.t_max, self.solver = grid_size, t_min, t_max, solver
        self.grid_spacing, self.pair_sampling, self.optimizer_name = grid_spacing, pair_sampling, optimizer
        self.trajectory_batch = trajectory_batch
        self.pairs_per_trajectory, self.semigroup_weight = pairs_per_trajectory, semigroup_weight
        self.dsm_weight, self.adaptive_weight = dsm_weight, adaptive_weight
        self._interpolant_option = interpolant

        teacher = None
        if teacher_ckpt:
            teacher = load_teacher_checkpoint(teacher_ckpt, self.data_shape)
        elif teacher_steps > 0:
            teacher = make_teacher(self.data_shape, teacher_backbone if teacher_backbone is not None else backbone,
                                   interpolant or "linear", steps=grid_size)
        student_spec = backbone if backbone is not None or teacher is None else teacher.backbone_spec
        self.student = TwoTimeNet(student_spec, self.data_shape, t_features, target_time_input)
        self.teacher: Any = None
        self.register_stage(1 if teacher_steps > 0 else 2)  # 1: train the teacher, 2: distil the student
        self._use_interpolant(interpolant or "linear")
        if teacher_ckpt:
            self.set_teacher(teacher)
        elif teacher is not None:
            self.teacher = teacher
            if init_student_from_teacher:
                self.student.check_compatible(teacher_output_net(teacher))
        self.distance_name, self.distance = make_distance(lpips_weights)
        self._record("distance", self.distance_name)

    # ------------------------------------------------------------------ options and teacher
    @property
    def sample_steps(self) -> int:
        return self._sample_steps

    @sample_steps.setter
    def sample_steps(self, value: int) -> None:
        _check(int(value) == value and value >= 1, f"sample_steps must be an integer >= 1, got {value}")
        self._sample_steps = int(value)

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.sample_steps

    def _use_interpolant(self, name: str) -> None:
        _check(name in INTERPOLANTS, f"teacher interpolant must be one of {INTERPOLANTS}, got {name!r}")
        _check(self._interpolant_option in (None, name), f"interpolant={self._interpolant_option!r} conflicts "
               f"with the teacher, which was trained on the {name!r} path; set interpolant to {name!r} or null")
        _check(name == "linear" or self.t_max < 1, f"the {name} velocity is singular at t = 1: set t_max < 1 "
               f"(got {self.t_max})")
        self.interpolant = make_path(name)
        self.teacher_interpolant = name
        self._record("interpolant", name)

    def _record(self, key: str, value: Any) -> None:
        """Store a resolved choice in the hyperparameters, both those checkpointed and those sent to loggers."""
        self.hparams[key] = value
        if hasattr(self, "_hparams_initial"):
            self._hparams_initial[key] = value

    def set_teacher(self, teacher: Any) -> None:
        """Use ``teacher`` (any object with ``velocity(x, t)``; optional ``interpolant`` name) as a frozen teacher."""
        _check(self.teacher_steps == 0, f"set_teacher conflicts with teacher_steps={self.teacher_steps} "
               "(this run trains its own teacher in stage 1)")
        _check(callable(getattr(teacher, "velocity", None)), "the teacher needs a method velocity(x, t)")
        self._use_interpolant(teacher_path_name(teacher))
        if isinstance(teacher, nn.Module):
            freeze(teacher)
            teacher.eval()
        if self.init_student_from_teacher:
            output_net = teacher_output_net(teacher)
            _check(output_net is not None, "init_student_from_teacher=True needs a FlowMatching teacher "
                   f"(got {type(teacher).__name__}); set init_student_from_teacher=False")
            self.student.init_from(output_net)
        self.teacher = teacher
        self.stage.fill_(2)

    def setup(self, stage: str) -> None:
        if self.teacher is None:
            raise ValueError("CharacteristicGenerator has no teacher: set teacher_steps > 0 (train it in stage 1), "
                             "teacher_ckpt (a FlowMatching checkpoint) or call set_teacher() before training")

    # ------------------------------------------------------------------ stages (onestep.generators.staged)
    @property
    def student_stage(self) -> bool:
        return int(self.stage) == 2

    def stage_starts(self) -> list[int]:
        return [self.teacher_steps]

    def stage_ema_decay(self, stage: int) -> float:
        return self.teacher_ema_decay if stage == 1 else self.ema_decay

    def begin_stage(self, stage: int) -> None:
        """Stage 1 -> 2: the teacher becomes its EMA and is frozen, the student starts (the EMA then restarts)."""
        self.load_ema_into("teacher.")
        self.restore_stage(stage)
        if self.init_student_from_teacher:
            self.student.init_from(teacher_output_net(self.teacher))

    def restore_stage(self, stage: int) -> None:
        freeze(self.teacher)
        self.teacher.eval()

    def _start_student_stage(self) -> None:
        """Switch to the student stage now (what the first batch at ``teacher_steps`` does)."""
        self.enter_stage(2)

    def train(self, mode: bool = True) -> CharacteristicGenerator:
        super().train(mode)
        stage = getattr(self, "stage", None)
        if stage is not None and int(stage) == 2 and isinstance(getattr(self, "teacher", None), nn.Module):
            self.teacher.eval()  # a frozen teacher never runs dropout
        return self

    # ------------------------------------------------------------------ maps and teacher steps
    def map(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """The characteristic map ``g(s, t, x)`` with the current weights."""
        return self._map_with(self.student(x, s, t), x, s, t)

    def map_ema(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``g(s, t, x)`` with the student's EMA weights (the target network); gradients reach ``x`` only."""
        params = {k[len("student."):]: v for k, v in self._ensure_ema().items() if k.startswith("student.")}
        return self._map_with(functional_call(self.student, params, (x, s, t)), x, s, t)

    def _map_with(self, out: Tensor, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        return self.interpolant.exp_step(x, self.interpolant.denoise_output(x, out, s), s, t)

    def teacher_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The teacher's ``v(x, t)``, asked with one time per sample."""
        return self.teacher.velocity(x, t.expand(len(x)))

    def teacher_step(self, x: Tensor, s: Tensor | float, t: Tensor | float, exact: bool = False) -> Tensor:
        """One teacher step ``s -> t``: ``solver`` (Euler or exponential integrator); ``exact`` forces the
        exponential integrator, which lands on the data prediction at ``t = 1``."""
        if self.solver == "euler" and not exact:
            return solvers.euler_step(self.teacher_velocity, x, s, t)
        return solvers.exponential_step(self.interpolant, self.teacher_velocity, x, s, t)

    @torch.no_grad()
    def teacher_trajectory(self, z: Tensor, times: Sequence[float]) -> list[Tensor]:
        """Discrete characteristics: the teacher's states at every time of ``times``, starting from ``z``."""
        return solvers.trajectory(lambda x, s, t: self.teacher_step(x, s, t, exact=t >= 1.0), z, times)

    def grid_times(self, include_end: bool = True) -> Tensor:
        """The grid on ``[t_min, t_max]`` (``grid_spacing``), then ``1`` when ``include_end`` and ``t_max < 1``."""
        grid = self._spaced(self.grid_size)
        if include_end and self.t_max < 1.0:
            grid = torch.cat([grid, torch.ones(1, dtype=torch.float64)])
        return grid.float()

    def _spaced(self, count: int) -> Tensor:
        """``count`` float64 times on ``[t_min, t_max]`` with the ``grid_spacing`` of the training grid."""
        if self.grid_spacing == "uniform":
            return torch.linspace(self.t_min, self.t_max, count, dtype=torch.float64)
        u = torch.sin(0.5 * torch.pi * torch.linspace(0.0, 1.0, count, dtype=torch.float64))
        return self.t_min + (self.t_max - self.t_min) * u

    def sample_times(self, nfe: int) -> list[float]:
        """``nfe + 1`` times from ``t_min`` to ``1``; inner times are on the training grid when it has enough points."""
        grid = self.grid_times(include_end=False).double()
        # points taken from [t_min, t_max]: all of them when t_max == 1, else all but the final t = 1
        count = nfe + 1 if self.t_max >= 1.0 else nfe
        if count == 1:
            inner = grid[:1]
        elif count <= self.grid_size:
            inner = grid[torch.linspace(0, self.grid_size - 1, count, dtype=torch.float64).round().long()]
        else:
            inner = self._spaced(count)
        times = [float(t) for t in inner.tolist()]
        if self.t_max < 1.0:
            times.append(1.0)
        return times

    # ------------------------------------------------------------------ losses
    def loss(self, x: Tensor, idx: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.student_stage:  # the teacher's own flow-matching loss (independent coupling, its path)
            loss, _ = self.teacher.loss(x, None)
            logs = {"teacher_loss": loss.detach()}
        elif self.mode == "image":
            loss, logs = image_loss(self, x)
        else:
            loss, logs = vector_loss(self, x)
        logs["stage"] = torch.tensor(2.0 if self.student_stage else 1.0, device=x.device)
        return loss, logs

    # ------------------------------------------------------------------ sampling
    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return solvers.solve(self.map, self.randn(n, generator=generator), self.sample_times(self.sample_steps))

    @torch.no_grad()
    def sample_teacher(self, n: int, nfe: int, generator: torch.Generator | None = None) -> Tensor:
        """The teacher's baseline at the same NFE: its steps over the student's sampling times."""
        _check(nfe >= 1, f"nfe must be >= 1, got {nfe}")
        times = self.sample_times(nfe)
        return self.teacher_trajectory(self.randn(n, generator=generator), times)[-1]

    # ------------------------------------------------------------------ training plumbing
    def configure_optimizers(self) -> Any:
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        groups = [{"params": list(self.student.parameters()), "lr": self.lr}]
        stages = [(self.stage_start(2), total, self.warmup_steps)]
        if self.teacher_steps > 0:
            groups.append({"params": list(self.teacher.parameters()), "lr": self.teacher_lr})
            stages.append((0, self.teacher_steps, self.teacher_warmup_steps))
        if self.optimizer_name == "radam":
            optimizer = torch.optim.RAdam(groups, betas=self.betas, weight_decay=self.weight_decay,
                                          decoupled_weight_decay=True)
        else:
            optimizer = torch.optim.AdamW(groups, betas=self.betas, weight_decay=self.weight_decay)
        cosine = self.lr_schedule == "cosine"
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [stage_schedule(*stage, cosine) for stage in stages])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["characteristic_stage"] = int(self.stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints from before the shared stage buffer and paths: the stage was only the key below, and
        # a Föllmer teacher's weights sat in a wrapper (teacher.net.inner.*); the per-block target time sat
        # beside the student's UNet (student.t_embed.*, student.t_films.*)
        state = checkpoint.get("state_dict")
        if state is not None:
            state.setdefault("stage", torch.tensor(int(checkpoint.get("characteristic_stage", int(self.stage)))))
            rename_legacy_teacher_keys(state)
            rename_legacy_target_time_keys(state, self.student.net)
        rename_legacy_teacher_keys(checkpoint.get("ema", {}))
        rename_legacy_target_time_keys(checkpoint.get("ema", {}), self.student.net)
        super().on_load_checkpoint(checkpoint)
