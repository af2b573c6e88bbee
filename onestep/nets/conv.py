"""Convolutional decoders (vector or tensor latent -> image) and encoders (image -> vector or tensor latent),
without time conditioning."""

from __future__ import annotations

import math
from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

__all__ = ["ConvDecoder", "ConvEncoder", "SpatialConvDecoder", "SpatialConvEncoder"]


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


def _check_image_shape(shape: Sequence[int], who: str, arg: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who}: {arg} must be an image shape (C, H, W), got {shape}; e.g. (1, 28, 28)")
    return shape  # type: ignore[return-value]


class ConvDecoder(nn.Module):
    """``(B, latent_dim) -> (B, C, H, W)``: linear map to a small feature map, then upsample + conv.

    The number of 2x upsamplings is the largest ``k <= 3`` with ``H, W`` divisible by ``2**k`` and the seed
    map at least 4 pixels wide (28x28: 7 -> 14 -> 28; 32x32: 4 -> 8 -> 16 -> 32).  The output is
    unconstrained (no final tanh).  ``t`` is accepted and ignored.
    """

    def __init__(self, latent_dim: int, out_shape: Sequence[int] = (1, 28, 28), base_channels: int = 32):
        super().__init__()
        channels, height, width = _check_image_shape(out_shape, "ConvDecoder", "out_shape")
        self.latent_dim, self.out_shape = int(latent_dim), (channels, height, width)
        n_up = 0
        while n_up < 3 and height % 2 ** (n_up + 1) == 0 and width % 2 ** (n_up + 1) == 0 \
                and min(height, width) // 2 ** (n_up + 1) >= 4:
            n_up += 1
        self.seed_shape = (base_channels * 2**n_up, height // 2**n_up, width // 2**n_up)
        self.project = nn.Linear(self.latent_dim, math.prod(self.seed_shape))
        layers: list[nn.Module] = [nn.SiLU()]
        ch = self.seed_shape[0]
        for _ in range(n_up):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(ch, ch // 2)]
            ch //= 2
        layers.append(nn.Conv2d(ch, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, t=None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ConvDecoder: expected z of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        c, h, w = self.seed_shape
        return self.body(rearrange(self.project(z), "b (c h w) -> b c h w", c=c, h=h, w=w))


class ConvEncoder(nn.Module):
    """``(B, C, H, W) -> (B, latent_dim)``: conv, stride-2 convs down to <= 8 pixels (at most 3), linear.

    Channels double at each downsampling (28x28: 28 -> 14 -> 7; 32x32: 32 -> 16 -> 8).  ``t`` is ignored.
    """

    def __init__(self, in_shape: Sequence[int], latent_dim: int, base_channels: int = 32):
        super().__init__()
        channels, height, width = _check_image_shape(in_shape, "ConvEncoder", "in_shape")
        self.in_shape, self.latent_dim = (channels, height, width), int(latent_dim)
        layers: list[nn.Module] = [_conv_block(channels, base_channels)]
        ch, n_down = base_channels, 0
        while n_down < 3 and min(height, width) > 8:
            layers.append(_conv_block(ch, 2 * ch, stride=2))
            ch, height, width, n_down = 2 * ch, (height + 1) // 2, (width + 1) // 2, n_down + 1
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch * height * width, self.latent_dim)

    def forward(self, x: Tensor, t=None) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"ConvEncoder: expected images of shape (B, *{self.in_shape}), got {tuple(x.shape)}")
        return self.head(rearrange(self.body(x), "b c h w -> b (c h w)"))


def _levels_between(size: int, latent_size: int, who: str) -> int:
    """Fewest 2x steps ``k`` with ``latent_size * 2**k >= size`` (the image is zero-padded up to that)."""
    k = 0
    while latent_size * 2**k < size:
        k += 1
    if k == 0 and latent_size != size:
        raise ValueError(f"{who}: the latent's spatial size {latent_size} exceeds the image's {size}; "
                         "choose a latent no larger than the image, e.g. (4, 8, 8) for 28x28")
    return k


class SpatialConvEncoder(nn.Module):
    """``(B, C, H, W) -> (B, c, h, w)``: an LDM-style tensor latent (spec mppm.md §5: 4x8x8 for MNIST).

    The image is zero-padded to ``(h 2^k, w 2^k)`` (28 -> 32 for an 8x8 latent), then a conv block and ``k``
    stride-2 conv blocks doubling the channels (32-64-128 at ``k = 2``), and a 1x1 conv to ``c`` channels.
    """

    def __init__(self, in_shape: Sequence[int], latent_shape: Sequence[int], base_channels: int = 32):
        super().__init__()
        channels, height, width = _check_image_shape(in_shape, "SpatialConvEncoder", "in_shape")
        lc, lh, lw = _check_image_shape(latent_shape, "SpatialConvEncoder", "latent_shape")
        k = _levels_between(height, lh, "SpatialConvEncoder")
        if _levels_between(width, lw, "SpatialConvEncoder") != k:
            raise ValueError(f"SpatialConvEncoder: image {height}x{width} and latent {lh}x{lw} need the same "
                             "number of 2x steps in both directions; keep the aspect ratio")
        self.in_shape, self.latent_shape = (channels, height, width), (lc, lh, lw)
        pad_h, pad_w = lh * 2**k - height, lw * 2**k - width
        self.pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        layers: list[nn.Module] = [_conv_block(channels, base_channels)]
        ch = base_channels
        for _ in range(k):
            layers.append(_conv_block(ch, 2 * ch, stride=2))
            ch *= 2
        layers.append(nn.Conv2d(ch, lc, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, t=None) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"SpatialConvEncoder: expected images of shape (B, *{self.in_shape}), got {tuple(x.shape)}")
        return self.body(nn.functional.pad(x, self.pad))


class SpatialConvDecoder(nn.Module):
    """``(B, c, h, w) -> (B, C, H, W)``: the mirror of :class:`SpatialConvEncoder` (conv to ``base 2^k``
    channels, ``k`` times upsample + conv block halving them, a final conv), cropped to ``H x W``."""

    def __init__(self, latent_shape: Sequence[int], out_shape: Sequence[int] = (1, 28, 28), base_channels: int = 32):
        super().__init__()
        lc, lh, lw = _check_image_shape(latent_shape, "SpatialConvDecoder", "latent_shape")
        channels, height, width = _check_image_shape(out_shape, "SpatialConvDecoder", "out_shape")
        k = _levels_between(height, lh, "SpatialConvDecoder")
        if _levels_between(width, lw, "SpatialConvDecoder") != k:
            raise ValueError(f"SpatialConvDecoder: latent {lh}x{lw} and image {height}x{width} need the same "
                             "number of 2x steps in both directions; keep the aspect ratio")
        self.latent_shape, self.out_shape = (lc, lh, lw), (channels, height, width)
        self.crop = ((lh * 2**k - height) // 2, (lw * 2**k - width) // 2)
        ch = base_channels * 2**k
        layers: list[nn.Module] = [nn.Conv2d(lc, ch, 3, padding=1), nn.SiLU()]
        for _ in range(k):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(ch, ch // 2)]
            ch //= 2
        layers.append(nn.Conv2d(ch, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor, t=None) -> Tensor:
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"SpatialConvDecoder: expected z of shape (B, *{self.latent_shape}), got {tuple(z.shape)}")
        top, left = self.crop
        _, height, width = self.out_shape
        return self.body(z)[..., top:top + height, left:left + width]
