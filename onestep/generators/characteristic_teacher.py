r"""Teacher pieces and the two-time student network of the characteristic generator.

Time runs as in the paper: ``t = 0`` is the Gaussian, ``t = 1`` the data. The teacher is a
:class:`~onestep.generators.FlowMatching` model on a path of :mod:`onestep.paths` (``linear`` or
``follmer``; the interpolant of the paper), whose network outputs ``F`` in velocity units
(:math:`v = \kappa_t F`); the student's map uses the same path's data prediction
:math:`d = c_t x + \alpha_t F` and exponential-integrator step (see :mod:`onestep.paths`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from onestep.generators.flow_matching import FlowMatching
from onestep.nets import SinusoidalTimeEmbedding, as_batch_time, build_backbone
from onestep.nets.unet import ResBlock, UNet
from onestep.paths import PATHS, AffinePath

INTERPOLANTS = PATHS
SOLVERS = ("euler", "exp")


def teacher_output_net(teacher: Any) -> nn.Module | None:
    """The backbone whose output is ``F`` (velocity units) of a FlowMatching teacher, else ``None``."""
    return teacher.net if isinstance(teacher, FlowMatching) else None


def teacher_path_name(teacher: Any) -> str:
    """The path a teacher was trained on: a FlowMatching's ``path``, else its ``interpolant`` (default linear)."""
    return teacher.path.name if isinstance(teacher, FlowMatching) else getattr(teacher, "interpolant", "linear")


def make_teacher(data_shape: Sequence[int], backbone: Mapping[str, Any] | None, path: str,
                 steps: int) -> FlowMatching:
    """A fresh FlowMatching teacher on ``path`` (independent coupling: the paper's velocity matching)."""
    return FlowMatching(data_shape=data_shape, backbone=backbone, coupling="independent", sampler="euler",
                        steps=steps, path=path)


def rename_legacy_teacher_keys(weights: dict[str, Any]) -> None:
    """Checkpoints written before the Föllmer teacher's network became the FlowMatching net itself kept
    it inside a wrapper (``teacher.net.inner.*``); rename those keys in place to ``teacher.net.*``."""
    for key in [k for k in weights if k.startswith("teacher.net.inner.")]:
        weights["teacher.net." + key[len("teacher.net.inner."):]] = weights.pop(key)


def rename_legacy_target_time_keys(weights: dict[str, Any], student_net: nn.Module) -> None:
    """Checkpoints written before the per-block target time moved into the UNet (``second_time``) kept its
    layers beside the UNet: ``student.t_embed.*`` (now ``student.net.second_time_embed.*``) and
    ``student.t_films.<i>.*``, one per FiLM-conditioned residual block in module order (now
    ``student.net.<that block>.film_s.*``). Rename those keys in place; the tensors are unchanged."""
    blocks = [name for name, m in student_net.named_modules() if isinstance(m, ResBlock) and m.film is not None]
    for key in [k for k in weights if k.startswith(("student.t_embed.", "student.t_films."))]:
        if key.startswith("student.t_embed."):
            weights["student.net.second_time_embed." + key[len("student.t_embed."):]] = weights.pop(key)
            continue
        index, rest = key[len("student.t_films."):].split(".", 1)
        if int(index) >= len(blocks):
            raise ValueError(f"checkpoint key {key!r}: the student UNet has only {len(blocks)} residual blocks")
        weights[f"student.net.{blocks[int(index)]}.film_s.{rest}"] = weights.pop(key)


def load_teacher_checkpoint(path: str, data_shape: Sequence[int]) -> FlowMatching:
    """A frozen FlowMatching teacher with the EMA weights of the Lightning checkpoint at ``path``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` (naming the path) when it is
    not a readable FlowMatching checkpoint with EMA weights for data of shape ``data_shape``.
    """
    where = f"teacher_ckpt={str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file; train the teacher first, e.g. "
                                "`onestep fit --config configs/flow_matching --data.dataset <dataset>`, and pass its .ckpt")
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

    * ``input``: sinusoidal features of ``t`` are appended to the input (extra coordinates of the flattened
      input for an ``mlp``, on vectors or images; extra constant channels for a ``unet``), so either
      backbone takes two times unchanged; for an MLP this is how it sees ``s`` too, for a UNet ``t`` then
      reaches only the input convolution;
    * ``blocks`` (UNet only, the authors' code): the UNet's ``second_time`` (:mod:`onestep.nets.unet`):
      ``t`` gets its own embedding MLP (on ``t_features`` sinusoidal features), and every residual block a
      FiLM layer of its own whose (scale, shift) is added to the block's ``s`` FiLM output.

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
            two_time = {**(dict(spec) if isinstance(spec, Mapping) else {"name": "unet"}),
                        "second_time": True, "second_time_features": self.t_features}
            self.net = build_backbone(two_time, self.data_shape, self.data_shape)
            return
        # an MLP reads the flattened input: the t features are appended once, not as constant channels
        # (on 28x28 images channels would add 16 x 784 input columns to its first layer)
        self.flat = len(self.data_shape) == 1 or name == "mlp"
        if self.flat:
            in_shape: tuple[int, ...] = (math.prod(self.data_shape) + self.t_features,)
        else:
            in_shape = (self.data_shape[0] + self.t_features, *self.data_shape[1:])
        self.t_embed = SinusoidalTimeEmbedding(self.t_features)
        self.net = build_backbone(spec, in_shape, self.data_shape)

    def _is_target_key(self, key: str) -> bool:
        """Whether a key of ``self.net`` belongs to the layers that read the target time (``blocks``)."""
        return self.target_time_input == "blocks" and UNet.is_second_time_key(key)

    def _zero_target_weights(self) -> None:
        if self.target_time_input == "blocks":
            self.net.zero_second_time_films()

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        if self.target_time_input == "blocks":  # the UNet's second time is the target time
            return self.net(x, as_batch_time(s, len(x), like=x), as_batch_time(t, len(x), like=x))
        feats = self.t_embed(as_batch_time(t, len(x), like=x)).to(x.dtype)
        if self.flat:
            x = x.flatten(1)
        else:
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
        n_extra = self.t_features
        return n_data if student.shape[1] - teacher.shape[1] == n_extra else None

    def check_compatible(self, teacher_net: nn.Module) -> None:
        """Raise ``ValueError`` unless :meth:`init_from` can copy ``teacher_net``."""
        mine = {k: v for k, v in self.net.state_dict().items() if not self._is_target_key(k)}
        theirs, problem = teacher_net.state_dict(), None
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
            if self._is_target_key(key):
                continue  # the target-time layers: the embedding keeps its init, the FiLMs are zeroed below
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


def last_weight(module: nn.Module) -> nn.Parameter:
    """The last registered weight matrix or kernel: the output layer, where the adaptive weight is measured."""
    weights = [p for p in module.parameters() if p.dim() >= 2]
    if not weights:
        raise ValueError("the student network has no weight matrix for the adaptive loss weight")
    return weights[-1]


class CharacteristicModel(Protocol):
    """What the mode losses (:mod:`~onestep.generators.characteristic_vector`,
    :mod:`~onestep.generators.characteristic_image`) use of the characteristic generator; typed here so
    that they need not import it (it imports them)."""

    interpolant: AffinePath
    student: TwoTimeNet
    t_max: float
    trajectory_batch: int | None
    pairs_per_trajectory: int
    pair_sampling: str
    semigroup_weight: float
    dsm_weight: float
    adaptive_weight: bool
    distance: Callable[[Tensor, Tensor], Tensor]

    def grid_times(self, include_end: bool = True) -> Tensor: ...

    def map(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor: ...

    def map_ema(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor: ...

    def teacher_step(self, x: Tensor, s: Tensor | float, t: Tensor | float, exact: bool = False) -> Tensor: ...

    def teacher_trajectory(self, z: Tensor, times: Sequence[float]) -> list[Tensor]: ...
