"""A small time-conditioned UNet for images (DDPM / torchcfm style, kept lean for CPU tests).

``second_time=True`` makes it a two-time network ``F(x, t, s)`` as the characteristic generator's student
in the authors' code (spec ``characteristic.md`` section 3.1): ``s`` gets its own embedding MLP on a
sinusoidal embedding, and every residual block a second FiLM layer whose (scale, shift) is *added* to the
``t`` FiLM output before it modulates the GroupNorm output:

.. math::  h \leftarrow \mathrm{GN}(h)\,(1 + a_t + a_s) + (b_t + b_s), \qquad
           (a_t, b_t) = A(e_t), \quad (a_s, b_s) = A_s(e_s).

The last layer of each :math:`A_s` starts at zero, so an untrained two-time net equals the one-time net of
the same seed (the ``s`` layers are created after all others: the other weights draw the same numbers).
Only :math:`A_s` is zeroed, not the ``s`` embedding's last layer: with both at zero neither would ever get
a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .time import SinusoidalTimeEmbedding, as_batch_time

__all__ = ["UNet", "ResBlock", "SelfAttention", "check_unet_shape"]


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def check_unet_shape(height: int, width: int, channel_mult: Sequence[int], where: str = "UNet") -> None:
    """Raise ``ValueError`` unless ``H`` and ``W`` are divisible by ``2 ** (len(channel_mult) - 1)``."""
    factor = 2 ** (len(channel_mult) - 1)
    if height % factor == 0 and width % factor == 0:
        return
    levels = 1
    while height % 2**levels == 0 and width % 2**levels == 0 and levels < 8:
        levels += 1
    suggestion = tuple(list(channel_mult)[:levels]) or (1,)
    raise ValueError(
        f"{where}: image of size {height}x{width} is not divisible by 2**(len(channel_mult)-1) = {factor} "
        f"(channel_mult={tuple(channel_mult)} downsamples {len(channel_mult) - 1} times); use a channel_mult "
        f"with at most {levels} entries, e.g. channel_mult={suggestion}, or pad the images"
    )


class ResBlock(nn.Module):
    """``GN -> SiLU -> conv -> FiLM(emb) -> GN -> SiLU -> dropout -> conv`` plus a (1x1) skip.

    FiLM: ``h <- GN(h) * (1 + scale(emb)) + shift(emb)``; without ``time_dim`` the block is unconditioned.
    :meth:`add_second_time` gives it a second FiLM on ``emb_s`` whose output is added to the first one's.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0, groups: int = 8):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch)) if time_dim > 0 else None
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.film_s: nn.Module | None = None

    def add_second_time(self, time_dim: int) -> None:
        """Create the zero-initialised second FiLM ``SiLU -> Linear(time_dim, 2 out_ch)`` (``film_s``)."""
        if self.film is None:
            raise ValueError("ResBlock: a second time needs a time-conditioned block (time_dim > 0)")
        self.film_s = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, self.film[-1].out_features))
        nn.init.zeros_(self.film_s[-1].weight)
        nn.init.zeros_(self.film_s[-1].bias)

    def forward(self, x: Tensor, emb: Tensor | None, emb_s: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            params = self.film(emb)
            if self.film_s is not None:
                if emb_s is None:
                    raise ValueError("ResBlock: this block has a second-time FiLM; pass emb_s")
                params = params + self.film_s(emb_s)
            scale, shift = rearrange(params, "b (two c) -> two b c 1 1", two=2)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention: channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=height, w=width)
        return x + self.proj(out)


class UNet(nn.Module):
    """Time-conditioned UNet ``(B, C, H, W), t -> (B, C_out, H, W)``.

    Level ``i`` has ``base_channels * channel_mult[i]`` channels and ``num_res_blocks`` ResBlocks; levels are
    joined by stride-2 convolutions (down) and nearest-neighbour upsampling + conv (up), with skip
    connections concatenated on the way up.  ``H`` and ``W`` must be divisible by
    ``2 ** (len(channel_mult) - 1)`` (28 -> 14 -> 7 for MNIST with three levels).  The final conv is
    zero-initialised, so an untrained network outputs exactly 0.  ``attention=True`` adds
    self-attention in the middle (lowest-resolution) block.  ``time_dim=0`` gives an unconditioned net.
    ``second_time=True``: a second time ``s`` in every block (module docstring), on a sinusoidal embedding
    of width ``second_time_features`` (default ``base_channels``, the first time's).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        time_dim: int = 128,
        dropout: float = 0.0,
        attention: bool = False,
        attention_heads: int = 4,
        norm_groups: int = 8,
        second_time: bool = False,
        second_time_features: int | None = None,
    ):
        super().__init__()
        if not channel_mult or num_res_blocks < 1:
            raise ValueError("UNet: channel_mult must be non-empty and num_res_blocks >= 1")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.time_dim = int(time_dim)
        if self.time_dim > 0:
            self.time_embed = nn.Sequential(
                SinusoidalTimeEmbedding(base_channels),
                nn.Linear(base_channels, self.time_dim),
                nn.SiLU(),
                nn.Linear(self.time_dim, self.time_dim),
            )
        else:
            self.time_embed = None

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, self.time_dim, dropout, norm_groups)

        self.input_conv = nn.Conv2d(self.in_channels, base_channels, 3, padding=1)
        ch, skip_channels = base_channels, [base_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(self.channel_mult):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.append(block(ch, base_channels * mult))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(self.channel_mult) - 1:
                stage.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
            self.down.append(stage)

        mid = [block(ch, ch)]
        if attention:
            mid.append(SelfAttention(ch, attention_heads, norm_groups))
        mid.append(block(ch, ch))
        self.mid = nn.ModuleList(mid)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.append(block(ch + skip_channels.pop(), base_channels * mult))
                ch = base_channels * mult
            if level > 0:
                stage.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
            self.up.append(stage)

        self.output = nn.Sequential(_group_norm(ch, norm_groups), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)
        self.second_time = bool(second_time)
        if self.second_time:
            self._add_second_time(int(second_time_features or base_channels))

    def _add_second_time(self, features: int) -> None:
        """The ``s`` embedding MLP and a zero-initialised second FiLM in every block, created last so the
        other layers draw the same random numbers as without them."""
        if self.time_dim <= 0:
            raise ValueError("UNet: second_time=True needs a time-conditioned UNet (time_dim > 0)")
        self.second_time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(features),
            nn.Linear(features, self.time_dim),
            nn.SiLU(),
            nn.Linear(self.time_dim, self.time_dim),
        )
        for block in self.modules():
            if isinstance(block, ResBlock):
                block.add_second_time(self.time_dim)
        # keep the output conv the last registered layer: "the last weight" is the output layer (adaptive loss
        # weights read it) with or without the second time
        self._modules["output"] = self._modules.pop("output")

    @staticmethod
    def is_second_time_key(name: str) -> bool:
        """Whether a parameter or state-dict key (relative to the UNet) belongs to the second-time layers."""
        return name.startswith("second_time_embed.") or ".film_s." in name

    @torch.no_grad()
    def zero_second_time_films(self) -> None:
        """Zero the last layer of every block's second FiLM: the net then ignores ``s``."""
        for block in self.modules():
            if isinstance(block, ResBlock) and block.film_s is not None:
                nn.init.zeros_(block.film_s[-1].weight)
                nn.init.zeros_(block.film_s[-1].bias)

    def forward(self, x: Tensor, t=None, s=None) -> Tensor:
        """``x (B, C, H, W)``, time ``t`` and, with ``second_time=True`` only, the second time ``s``."""
        if x.ndim != 4:
            raise ValueError(f"UNet: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        check_unet_shape(x.shape[-2], x.shape[-1], self.channel_mult)
        emb = emb_s = None
        if self.time_embed is not None:
            if t is None:
                raise ValueError("UNet: this network is time-conditioned (time_dim > 0); pass t")
            emb = self.time_embed(as_batch_time(t, x.shape[0], like=x))
        if self.second_time:
            if s is None:
                raise ValueError("UNet: this network was built with second_time=True; pass the second time s")
            emb_s = self.second_time_embed(as_batch_time(s, x.shape[0], like=x)).to(x.dtype)
        elif s is not None:
            raise ValueError("UNet: got a second time s, but the network was built without second_time=True")

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, emb, emb_s) if isinstance(layer, ResBlock) else layer(h)
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb, emb_s) if isinstance(layer, ResBlock) else layer(h, emb)
        for stage in self.up:
            for layer in stage:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb, emb_s) if isinstance(layer, ResBlock) else layer(h)
        return self.output(h)
