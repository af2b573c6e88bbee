"""Convolutional decoder (vector -> image) and encoder (image -> vector), without time conditioning."""

from __future__ import annotations

import math
from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn

__all__ = ["ConvDecoder", "ConvEncoder"]


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
