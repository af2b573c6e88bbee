"""Networks (backbones) and the :func:`build_backbone` factory used by every generator.

``build_backbone(spec, in_shape, out_shape=None, time_conditioned=True)`` returns a module with
``forward(x, t=None)`` mapping ``(B, *in_shape) -> (B, *out_shape)``.  The module also carries the
attributes ``in_shape``, ``out_shape``, ``time_conditioned`` and ``backbone_name``.

Backbones are a registry (:data:`BACKBONES`): a new one is one :func:`register_backbone` decorator on its
build function, which states the class (its constructor's arguments are the spec's options), the arguments
fixed by the shapes, the shapes it maps and how it takes time; name lookup, option checks, shape errors
and the time-conditioning switch are shared.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .conv import ConvDecoder, ConvEncoder, SpatialConvDecoder, SpatialConvEncoder
from .mlp import MLP, make_activation
from .resnet_flow import FlowMap, ResNetFlow, ResNetFlowBlock
from .time import (
    SinusoidalTimeEmbedding,
    TimeIdentity,
    TimeLinear,
    TimeLog,
    TimeTanh,
    as_batch_time,
    make_flow_time,
)
from .unet import UNet, check_unet_shape

__all__ = [
    "BACKBONES",
    "Backbone",
    "register_backbone",
    "build_backbone",
    "MLP",
    "UNet",
    "ResNetFlow",
    "ResNetFlowBlock",
    "FlowMap",
    "ConvDecoder",
    "ConvEncoder",
    "SpatialConvDecoder",
    "SpatialConvEncoder",
    "SinusoidalTimeEmbedding",
    "TimeIdentity",
    "TimeLinear",
    "TimeTanh",
    "TimeLog",
    "make_flow_time",
    "make_activation",
    "as_batch_time",
]



@dataclass(frozen=True)
class Backbone:
    """A registered backbone.

    ``cls``'s constructor arguments are the spec's options, except ``fixed`` (set from the shapes).
    ``shapes(in_shape, out_shape)`` returns ``(problem, fix)`` for shapes it cannot map, else None.
    ``make(in_shape, out_shape, kwargs, construct)`` builds it (``construct(cls, *args, **kw)`` turns a
    constructor error into one line naming the options). ``time``: ``optional`` (built with ``time_dim=0``
    when not time-conditioned), ``always`` (refuses ``time_conditioned=False``) or ``never`` (ignores time).
    """

    name: str
    cls: type[nn.Module]
    fixed: tuple[str, ...]
    make: Callable[..., nn.Module]
    shapes: Callable[[tuple, tuple], tuple[str, str] | None]
    time: str = "optional"

    def takes_time(self, time_conditioned: bool) -> bool:
        return self.time == "always" or (self.time == "optional" and time_conditioned)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, cls: type[nn.Module], fixed: tuple[str, ...] = (), time: str = "optional",
                      shapes: Callable[[tuple, tuple], tuple[str, str] | None] = lambda i, o: None):
    """Decorator registering ``make(in_shape, out_shape, kwargs, construct)`` as backbone ``name``."""
    def register(make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = Backbone(name, cls, tuple(fixed), make, shapes, time)
        return make
    return register


def _as_shape(shape, what: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        if isinstance(shape, str):
            raise TypeError(shape)
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"build_backbone: {what} must be a tuple of ints such as (2,) or (1, 28, 28), got {shape!r}") from err
    if not shape or min(shape) < 1:
        raise ValueError(f"build_backbone: {what} must be a non-empty tuple of positive ints, got {shape}")
    return shape


def _parse_spec(spec, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[str, dict]:
    if spec is None:
        same_image = len(in_shape) == 3 and len(out_shape) == 3 and in_shape[1:] == out_shape[1:]
        return ("unet" if same_image else "mlp"), {}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"build_backbone: spec must be a mapping {{'name': ..., **kwargs}}, a name or None, got {spec!r}")
    kwargs = dict(spec)
    # YAML reads `{name:mlp}` (no space after the colon) as the key "name:mlp" with no value
    glued = [k for k, v in kwargs.items() if isinstance(k, str) and ":" in k and v is None]
    if glued:
        fixed = ", ".join(k.replace(":", ": ", 1) for k in glued)
        raise ValueError(f"build_backbone: spec {dict(spec)} has the key(s) {glued} without values: YAML needs "
                         f"`key: value` with a space after the colon; write {{{fixed}}}")
    name = kwargs.pop("name", None)
    if name is None:
        raise ValueError(f"build_backbone: spec {dict(spec)} has no 'name'; choose one of {sorted(BACKBONES)}")
    key = str(name).lower().replace("-", "_")
    if key not in BACKBONES:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; known backbones: {sorted(BACKBONES)}")
    cls, fixed = BACKBONES[key].cls, BACKBONES[key].fixed
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *fixed)]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise ValueError(
            f"build_backbone: unexpected argument(s) {unexpected} for backbone {key!r}; accepted: {accepted} "
            f"({', '.join(fixed)} come from the shapes)"
        )
    for arg in ("hidden", "channel_mult"):  # YAML / CLI give lists
        if isinstance(kwargs.get(arg), Sequence) and not isinstance(kwargs[arg], str):
            kwargs[arg] = tuple(kwargs[arg])
    return key, kwargs


def _shape_error(name: str, in_shape, out_shape, problem: str, fix: str) -> ValueError:
    return ValueError(f"build_backbone: backbone {name!r} cannot map {in_shape} -> {out_shape}: {problem}; {fix}")


def build_backbone(spec, in_shape, out_shape=None, time_conditioned: bool = True) -> nn.Module:
    """Build a backbone ``(B, *in_shape), t -> (B, *out_shape)`` from ``spec = {"name": ..., **kwargs}``.

    Names: ``mlp`` (any shapes, flattens), ``unet`` (images, same H and W), ``resnet_flow`` (vectors, same
    shape, needs time), ``conv_decoder`` (vector or (c, h, w) latent -> image), ``conv_encoder`` (image -> vector or (c, h, w) latent).
    ``spec=None`` picks ``unet`` for image -> image and ``mlp`` otherwise.  ``out_shape=None`` means
    ``in_shape``.  ``time_conditioned=False`` builds ``mlp``/``unet`` without time input (``t`` is ignored);
    ``conv_*`` never use time.  Invalid shapes, names or arguments raise ``ValueError``.
    """
    in_shape = _as_shape(in_shape, "in_shape")
    out_shape = in_shape if out_shape is None else _as_shape(out_shape, "out_shape")
    name, kwargs = _parse_spec(spec, in_shape, out_shape)

    def construct(cls, *args, **kw) -> nn.Module:
        try:
            return cls(*args, **kw)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. hidden=[-3] or hidden="abc"
            raise ValueError(f"build_backbone: backbone {name!r} with options {kwargs} could not be built: {err}. "
                             "Fix the backbone options (widths and counts are positive integers)") from err

    entry = BACKBONES[name]
    wrong = entry.shapes(in_shape, out_shape)
    if wrong:
        raise _shape_error(name, in_shape, out_shape, *wrong)
    if not time_conditioned and entry.time == "always":
        raise _shape_error(name, in_shape, out_shape, "a neural flow phi(x0, t) always takes time",
                           "use time_conditioned=True or {'name': 'mlp'}")
    if not time_conditioned and entry.time == "optional":
        if kwargs.get("time_dim", 0):
            raise ValueError(f"build_backbone: backbone {name!r} with time_conditioned=False cannot take time_dim > 0; "
                             "drop time_dim")
        kwargs["time_dim"] = 0
    net = entry.make(in_shape, out_shape, kwargs, construct)
    net.backbone_name = name
    net.in_shape, net.out_shape = in_shape, out_shape
    net.time_conditioned = entry.takes_time(time_conditioned)
    return net


# ---------------------------------------------------------------------------------------- the backbones
@register_backbone("mlp", MLP, fixed=("in_dim", "out_dim", "out_shape"))
def _mlp(in_shape, out_shape, kwargs, construct) -> nn.Module:
    return construct(MLP, math.prod(in_shape), math.prod(out_shape), out_shape=out_shape, **kwargs)


def _unet_shapes(in_shape, out_shape):
    if len(in_shape) != 3 or len(out_shape) != 3:
        return "the UNet needs image shapes (C, H, W)", "use {'name': 'mlp'} for vectors, or give shapes like (1, 28, 28)"
    if in_shape[1:] != out_shape[1:]:
        return "the UNet keeps H and W", "use the same spatial size, or conv_encoder/conv_decoder"
    return None


@register_backbone("unet", UNet, fixed=("in_channels", "out_channels"), shapes=_unet_shapes)
def _unet(in_shape, out_shape, kwargs, construct) -> nn.Module:
    check_unet_shape(in_shape[1], in_shape[2], kwargs.get("channel_mult", (1, 2, 2)),
                     where=f"build_backbone: backbone 'unet' on {in_shape}")
    return construct(UNet, in_shape[0], out_shape[0], **kwargs)


@register_backbone("resnet_flow", ResNetFlow, fixed=("dim",), time="always", shapes=lambda i, o: None if (
        len(i) == 1 and o == i) else ("the ResNet flow maps vectors (d,) to the same shape",
                                      "use {'name': 'mlp'}, or a FlowMap around a unet for images"))
def _resnet_flow(in_shape, out_shape, kwargs, construct) -> nn.Module:
    return construct(ResNetFlow, in_shape[0], **kwargs)


@register_backbone("conv_decoder", ConvDecoder, fixed=("latent_dim", "out_shape"), time="never",
                   shapes=lambda i, o: None if len(i) in (1, 3) and len(o) == 3 else (
                       "conv_decoder maps a vector (d,) or a latent tensor (c, h, w) to an image (C, H, W)",
                       "give in_shape=(d,) or (c, h, w) and out_shape=(C, H, W), or use {'name': 'mlp'}"))
def _conv_decoder(in_shape, out_shape, kwargs, construct) -> nn.Module:
    return (construct(ConvDecoder, in_shape[0], out_shape, **kwargs) if len(in_shape) == 1
            else construct(SpatialConvDecoder, in_shape, out_shape, **kwargs))


@register_backbone("conv_encoder", ConvEncoder, fixed=("in_shape", "latent_dim"), time="never",
                   shapes=lambda i, o: None if len(i) == 3 and len(o) in (1, 3) else (
                       "conv_encoder maps an image (C, H, W) to a vector (d,) or a latent tensor (c, h, w)",
                       "give in_shape=(C, H, W) and out_shape=(d,) or (c, h, w), or use {'name': 'mlp'}"))
def _conv_encoder(in_shape, out_shape, kwargs, construct) -> nn.Module:
    return (construct(ConvEncoder, in_shape, out_shape[0], **kwargs) if len(out_shape) == 1
            else construct(SpatialConvEncoder, in_shape, out_shape, **kwargs))
