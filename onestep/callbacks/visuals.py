"""Pictures of samples: scatter plots against the data (vectors) and image grids, written atomically.

matplotlib is used through ``Figure`` + the Agg canvas directly (no pyplot, no global backend change),
so this works headless and inside any process. Files are written to a temporary name and moved into
place with ``os.replace``, so a reader never sees a half-written PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from onestep.files import atomic_savefig


def headline_fd(keys) -> str | None:
    """The FD key of the most semantic feature space among ``keys`` (Inception, then a LeNet or a user's own
    space, pixels last), else None. Ranked by name, not by key order: records are stored with sorted keys,
    which put ``fd_pixels`` after ``fd_lenet-mnist``."""
    fds = [k for k in keys if k.startswith("fd_")]
    return min(fds, key=lambda k: (0 if k == "fd_inception" else 2 if k == "fd_pixels" else 1, k)) if fds else None


def headline_metrics(metrics: dict[str, float]) -> list[tuple[str, float]]:
    """The metrics a title or a progress line shows: FD in the most semantic feature space (else W2), then
    precision and recall for FD (off-manifold fraction for W2 on a manifold). Keys with or without ``eval/``."""
    plain = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    fd = headline_fd(plain)
    keys = [fd, "precision", "recall"] if fd else ["w2", "offmanifold"]
    return [(k, float(plain[k])) for k in keys if plain.get(k) is not None]


def run_title(method: str, dataset: str | None, step: int, metrics: dict[str, float] | None = None) -> str:
    """``"FlowMatching on 8gaussians, step 300: w2 0.0123, offmanifold 0.04"``."""
    title = f"{method}{f' on {dataset}' if dataset else ''}, step {step}"
    shown = headline_metrics(metrics or {})
    return title + (": " + ", ".join(f"{k} {v:.4g}" for k, v in shown) if shown else "")


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1).numpy()


def principal_axes(data: np.ndarray, n_axes: int = 2) -> np.ndarray:
    """Top ``n_axes`` principal directions (columns) of ``data``, from an SVD of the centred data."""
    _, _, vt = np.linalg.svd(data - data.mean(0, keepdims=True), full_matrices=False)
    return vt[:n_axes].T


def save_scatter(samples: Tensor, data: Tensor, path: str | os.PathLike, title: str | None = None,
                 max_points: int = 4096) -> Path:
    """Samples (orange) against data (blue): histogram for D=1, scatter for D=2, 3-D axes for D=3,
    and the projection on the data's first two principal axes for D>3."""
    from matplotlib.figure import Figure

    s, d = _numpy(samples[:max_points]), _numpy(data[:max_points])
    dim = s.shape[1]
    fig = Figure(figsize=(5, 5), dpi=100)
    style = {"s": 3, "alpha": 0.5, "linewidths": 0}
    if dim == 1:
        ax = fig.add_subplot()
        bins = np.histogram_bin_edges(np.concatenate([s[:, 0], d[:, 0]]), bins=60)
        ax.hist(d[:, 0], bins=bins, alpha=0.5, label="data", density=True)
        ax.hist(s[:, 0], bins=bins, alpha=0.5, label="samples", density=True)
    elif dim == 3:
        import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3-D projection)

        ax = fig.add_subplot(projection="3d")
        ax.scatter(d[:, 0], d[:, 1], d[:, 2], label="data", **style)
        ax.scatter(s[:, 0], s[:, 1], s[:, 2], label="samples", **style)
    else:
        if dim > 3:
            axes = principal_axes(d)
            mean = d.mean(0, keepdims=True)
            s, d = (s - mean) @ axes, (d - mean) @ axes
            title = f"{title or ''} (first two principal axes of the data)".strip()
        ax = fig.add_subplot()
        ax.scatter(d[:, 0], d[:, 1], label="data", **style)
        ax.scatter(s[:, 0], s[:, 1], label="samples", **style)
        ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> ``(rows*(H+p)+p, nrow*(W+p)+p, C)`` float array, white padding."""
    x = images.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.ones((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[i].transpose(1, 2, 0)
    return grid


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, title: str | None = None,
                    real: Tensor | None = None) -> Path:
    """Save ``(N, C, H, W)`` images in [0, 1] (C = 1 or 3) as one PNG grid, ``nrow`` images per row.

    With ``real`` (images of the data, same shape per image), its first ``nrow`` images make the top row,
    set apart by a grey band (and named in the title), so samples can be judged against real images."""
    from matplotlib.figure import Figure

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid expects (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    grid = make_grid(images, nrow)
    if real is not None and len(real) > 0:
        if real.shape[1:] != images.shape[1:]:
            raise ValueError(f"save_image_grid: real images have shape {tuple(real.shape[1:])}, samples "
                             f"{tuple(images.shape[1:])}")
        top = make_grid(real[:min(nrow, len(images))], nrow)
        if top.shape[1] < grid.shape[1]:  # fewer real images than columns: pad with white
            top = np.pad(top, ((0, 0), (0, grid.shape[1] - top.shape[1]), (0, 0)), constant_values=1.0)
        band = np.full((max(2, images.shape[2] // 7), grid.shape[1], grid.shape[2]), 0.5, dtype=np.float32)
        grid = np.concatenate([top[:, :grid.shape[1]], band, grid])
        title = (f"{title}\n" if title else "") + "top row: data; below it: samples"
    scale = max(1, 512 // max(grid.shape[:2]))  # small grids are upscaled with nearest-neighbour
    height, width = grid.shape[0] * scale, grid.shape[1] * scale
    title_px = 15 * (title.count("\n") + 1) + 10 if title else 0
    fig = Figure(figsize=(width / 100, (height + title_px) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + title_px)))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, y=0.995)
    return atomic_savefig(fig, path)
