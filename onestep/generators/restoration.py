r"""Blind-denoising evaluation: PSNR and SSIM of restored images against the clean ones.

* ``psnr(x, y) = 10 log10(L^2 / mean((x - y)^2))`` per image, ``L`` the data range.
* ``ssim`` (Wang et al. 2004) per image: with Gaussian-window local means :math:`\mu`, variances
  :math:`\sigma^2` and covariance :math:`\sigma_{xy}` (window 11, std 1.5, "valid" positions only),

  .. math:: \mathrm{SSIM} = \mathrm{mean}\,\frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
            {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)}, \quad C_1 = (k_1 L)^2,\ C_2 = (k_2 L)^2,

  averaged over positions and channels. Images smaller than the window use a window of their size.
* :func:`evaluate_restoration` adds Gaussian noise of each level to clean images in *normalised* space
  (``[-1, 1]`` for images; the level is never passed to a method: blind), runs every method, and scores
  outputs in raw units (``denormalize``, then clamped to ``[0, 1]``; the noisy input is clamped the
  same way, which makes it the stronger "do nothing" baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB of each pair ``x[i], y[i]`` (B,)."""
    mse = (x - y).flatten(1).square().mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> Tensor:
    """Separable normalised Gaussian window ``(size,)``."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-coords.square() / (2 * sigma**2))
    return w / w.sum()


def _local_mean(x: Tensor, w: Tensor) -> Tensor:
    """Gaussian-weighted local means of every channel, valid positions only (separable conv)."""
    c = x.shape[1]
    x = F.conv2d(x, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity of each image pair ``(B, C, H, W)`` (B,), Gaussian window."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: need two image batches (B, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window_size, x.shape[-1], x.shape[-2])
    w = gaussian_window(size, sigma, dtype=torch.float64, device=x.device)
    x, y = x.double(), y.double()  # variances are differences of means: keep them exact
    mu_x, mu_y = _local_mean(x, w), _local_mean(y, w)
    var_x = _local_mean(x * x, w) - mu_x**2
    var_y = _local_mean(y * y, w) - mu_y**2
    cov = _local_mean(x * y, w) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1).float()


def add_gaussian_noise(x: Tensor, sigma: float, seed: int = 0) -> Tensor:
    """``x + sigma * N(0, I)`` with a seeded CPU generator (the same noise for every method)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x + sigma * noise.to(x.device, x.dtype)


def add_block_mask(x: Tensor, size: int, seed: int = 0, fill: float = -1.0) -> Tensor:
    """Each image with one ``size x size`` block set to ``fill`` (the background, -1 in normalised
    units), at a seeded position inside the central region (so it covers strokes, not the empty border)."""
    _, _, height, width = x.shape
    if not 0 < size <= min(height, width) // 2:
        raise ValueError(f"add_block_mask: size must lie in (0, {min(height, width) // 2}], got {size}")
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(height // 4, height - height // 4 - size + 1, (len(x),), generator=g)
    left = torch.randint(width // 4, width - width // 4 - size + 1, (len(x),), generator=g)
    rows, cols = torch.arange(height), torch.arange(width)
    inside = ((rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + size))[:, :, None] & \
             ((cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + size))[:, None, :]
    return x.masked_fill(inside[:, None].to(x.device), fill)


@torch.no_grad()
def evaluate_restoration(methods: Mapping[str, Callable[[Tensor], Tensor]], clean: Tensor,
                         noise_levels: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0),
                         denormalize: Callable[[Tensor], Tensor] = lambda x: (x + 1) / 2,
                         seed: int = 0, batch_size: int = 512) -> list[dict[str, float | str]]:
    """Score blind denoisers on ``clean`` (normalised images) at every noise level (normalised units).

    Returns rows ``{"method", "sigma", "psnr", "ssim"}`` (means over images), including ``noisy`` (the
    input itself) as the reference every method must beat.
    """
    if clean.dim() != 4:
        raise ValueError(f"evaluate_restoration: clean must be images (B, C, H, W), got {tuple(clean.shape)}")
    if any(s < 0 for s in noise_levels):
        raise ValueError(f"evaluate_restoration: noise levels must be >= 0, got {list(noise_levels)}")
    if "noisy" in methods:
        raise ValueError("evaluate_restoration: 'noisy' is the reserved name of the unrestored input")
    everything = {"noisy": lambda v: v, **methods}
    target = denormalize(clean).clamp(0, 1)
    rows: list[dict[str, float | str]] = []
    for level_index, sigma in enumerate(noise_levels):
        noisy = add_gaussian_noise(clean, float(sigma), seed=seed + level_index)
        for name, method in everything.items():
            out = torch.cat([method(part).to(clean.device) for part in noisy.split(batch_size)])
            out = denormalize(out).clamp(0, 1)
            rows.append({"method": name, "sigma": float(sigma), "psnr": psnr(out, target).mean().item(),
                         "ssim": ssim(out, target).mean().item()})
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, float | str]]:
    """``python -m onestep.generators.restoration --ckpt run/lmppm.ckpt --dataset mnist``: PSNR/SSIM of
    LMPPM, its kernel-only flow and the DAE projection at each noise level, on the test split, as JSON lines."""
    import argparse
    import json

    from onestep.data import OneStepDataModule
    from onestep.generators.lmppm import LMPPM

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--steps", type=int, default=None, help="K for restoration (default: the model's)")
    parser.add_argument("--alpha", type=float, default=None, help="kernel step (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = LMPPM.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    dm = OneStepDataModule(args.dataset, n_test=args.n, seed=args.seed)
    dm.setup()
    methods = {mode: (lambda v, mode=mode: model.restore(v, steps=args.steps, alpha=args.alpha, mode=mode))
               for mode in ("lmppm", "kernel_only", "dae")}
    rows = evaluate_restoration(methods, dm.test_data, args.levels, dm.denormalize, seed=args.seed)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
