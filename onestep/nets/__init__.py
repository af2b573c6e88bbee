"""Networks (backbones) and the :func:`build_backbone` factory used by every generator.

``build_backbone(spec, in_shape, out_shape=None, time_conditioned=True)`` returns a module with
``forward(x, t=None)`` mapping ``(B, *in_shape) -> (B, *out_shape)``.  The module also carries the
attributes ``in_shape``, ``out_shape``, ``time_conditioned`` and ``backbone_name``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

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

# name -> (class, constructor arguments fixed by the shapes, i.e. not accepted in the spec)
BACKBONES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "mlp": (MLP, ("in_dim", "out_dim", "out_shape")),
    "unet": (UNet, ("in_channels", "out_channels")),
    "resnet_flow": (ResNetFlow, ("dim",)),
    "conv_decoder": (ConvDecoder, ("latent_dim", "out_shape")),
    "conv_encoder": (ConvEncoder, ("in_shape", "latent_dim")),
}


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
    cls, fixed = BACKBONES[key]
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

    def fail(problem: str, fix: str) -> ValueError:
        return _shape_error(name, in_shape, out_shape, problem, fix)

    def construct(cls, *args, **kw) -> nn.Module:
        try:
            return cls(*args, **kw)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. hidden=[-3] or hidden="abc"
            raise ValueError(f"build_backbone: backbone {name!r} with options {kwargs} could not be built: {err}. "
                             "Fix the backbone options (widths and counts are positive integers)") from err

    if name == "mlp":
        if not time_conditioned:
            if kwargs.get("time_dim", 0):
                raise ValueError("build_backbone: backbone 'mlp' with time_conditioned=False cannot take time_dim > 0; drop time_dim")
            kwargs["time_dim"] = 0
        net = construct(MLP, math.prod(in_shape), math.prod(out_shape), out_shape=out_shape, **kwargs)
    elif name == "unet":
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise fail("the UNet needs image shapes (C, H, W)", "use {'name': 'mlp'} for vectors, or give shapes like (1, 28, 28)")
        if in_shape[1:] != out_shape[1:]:
            raise fail("the UNet keeps H and W", "use the same spatial size, or conv_encoder/conv_decoder")
        if not time_conditioned:
            if kwargs.get("time_dim", 0):
                raise ValueError("build_backbone: backbone 'unet' with time_conditioned=False cannot take time_dim > 0; drop time_dim")
            kwargs["time_dim"] = 0
        check_unet_shape(in_shape[1], in_shape[2], kwargs.get("channel_mult", (1, 2, 2)), where=f"build_backbone: backbone 'unet' on {in_shape}")
        net = construct(UNet, in_shape[0], out_shape[0], **kwargs)
    elif name == "resnet_flow":
        if len(in_shape) != 1 or out_shape != in_shape:
            raise fail("the ResNet flow maps vectors (d,) to the same shape", "use {'name': 'mlp'}, or a FlowMap around a unet for images")
        if not time_conditioned:
            raise fail("a neural flow phi(x0, t) always takes time", "use time_conditioned=True or {'name': 'mlp'}")
        net = construct(ResNetFlow, in_shape[0], **kwargs)
    elif name == "conv_decoder":
        if len(in_shape) not in (1, 3) or len(out_shape) != 3:
            raise fail("conv_decoder maps a vector (d,) or a latent tensor (c, h, w) to an image (C, H, W)",
                       "give in_shape=(d,) or (c, h, w) and out_shape=(C, H, W), or use {'name': 'mlp'}")
        net = (construct(ConvDecoder, in_shape[0], out_shape, **kwargs) if len(in_shape) == 1
               else construct(SpatialConvDecoder, in_shape, out_shape, **kwargs))
    else:  # conv_encoder
        if len(in_shape) != 3 or len(out_shape) not in (1, 3):
            raise fail("conv_encoder maps an image (C, H, W) to a vector (d,) or a latent tensor (c, h, w)",
                       "give in_shape=(C, H, W) and out_shape=(d,) or (c, h, w), or use {'name': 'mlp'}")
        net = (construct(ConvEncoder, in_shape, out_shape[0], **kwargs) if len(out_shape) == 1
               else construct(SpatialConvEncoder, in_shape, out_shape, **kwargs))

    net.backbone_name = name
    net.in_shape, net.out_shape = in_shape, out_shape
    net.time_conditioned = name == "resnet_flow" or (name in ("mlp", "unet") and time_conditioned)
    return net
