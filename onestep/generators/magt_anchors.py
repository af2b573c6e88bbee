r"""MAGT's anchor estimate of the smoothed model's posterior mean: self-normalised importance weights over K
anchors ``g_k = g(u_k)``, ``u_k ~ q``, of a noisy point ``x~ = x + sigma eps``:

.. math::  w_k \propto \exp\big(-\|x~ - g_k\|^2 / (2\sigma^2)\big)\,\pi(u_k) / q(u_k), \qquad
           \hat m(x~) = \textstyle\sum_k w_k g_k, \qquad \widehat{\nabla \log p_\sigma}(x~) = (\hat m - x~) / \sigma^2,

computed in float32 with autocast off (their logits are differences of large numbers under mixed
precision); :func:`effective_sample_size` says how many anchors carry the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor


def anchor_logits(x_tilde: Tensor, images: Tensor, sigma: float) -> Tensor:
    """``l_k(x~) = -||x~ - g_k||^2 / (2 sigma^2) + ||x~||^2 / (2 sigma^2)`` for images ``(K, D)`` (shared) or
    ``(B, K, D)`` (per point): ``(B, K)``, float32 with autocast off.

    The ``||x~||^2`` term is the same for every k and cancels in the softmax, so it is left out: the logits
    are ``(2 <x~, g_k> - ||g_k||^2) / (2 sigma^2)``, free of large cancelling sums. Mixed precision would
    round them (their spread is ``||x~ - g||^2 / (2 sigma^2)``) before the log-sum-exp, hence float32.
    """
    with torch.autocast(device_type=x_tilde.device.type, enabled=False):
        x_tilde, images = x_tilde.float(), images.float()
        inner = x_tilde @ images.T if images.ndim == 2 else torch.einsum("bd,bkd->bk", x_tilde, images)
        sq_norm = images.pow(2).sum(-1)
        return (2 * inner - (sq_norm[None] if images.ndim == 2 else sq_norm)) / (2 * sigma**2)


def snis_weights(x_tilde: Tensor, images: Tensor, sigma: float, log_correction: Tensor | None = None) -> Tensor:
    """Self-normalised weights ``w (B, K)``: ``softmax_k(l_k + log pi(u_k) - log q(u_k))`` in float32."""
    logits = anchor_logits(x_tilde, images, sigma)
    with torch.autocast(device_type=x_tilde.device.type, enabled=False):
        if log_correction is not None:
            logits = logits + log_correction.float()
        return torch.softmax(logits, dim=-1)


def weighted_mean(weights: Tensor, images: Tensor) -> Tensor:
    """``m^ = sum_k w_k g_k``: ``(B, D)`` from ``w (B, K)`` and images ``(K, D)`` or ``(B, K, D)``, in float32."""
    with torch.autocast(device_type=weights.device.type, enabled=False):
        images = images.float()
        return weights @ images if images.ndim == 2 else torch.einsum("bk,bkd->bd", weights, images)


def anchor_score(x_tilde: Tensor, images: Tensor, sigma: float) -> Tensor:
    """Anchor estimate of the smoothed model score, ``(m^(x~) - x~) / sigma^2`` (prior proposal)."""
    return (weighted_mean(snis_weights(x_tilde, images, sigma), images) - x_tilde.float()) / sigma**2


def effective_sample_size(weights: Tensor) -> Tensor:
    """``1 / sum_k w_k^2`` per row: between 1 (one anchor carries all weight) and K (uniform)."""
    return 1.0 / weights.pow(2).sum(-1)
