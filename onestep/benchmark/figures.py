"""Report figures (matplotlib ``Figure`` + Agg canvas: headless, no global pyplot state).

* qualitative grid: datasets (rows) x [data, methods...] (columns), each cell's saved final samples
  (``final_samples.pt``, raw units) over the reference data; vectors of dimension > 2 are projected on the
  reference's first two principal axes; images are tiled;
* image rows (image datasets): a row of real images, then one row per method;
* headline metric against NFE (one point per method, mean ± std over seeds; lines for ``nfe_sweep``);
* headline metric against training time (one point per cell);
* sampling speed (samples/s of the protocol's timed draw, mean over seeds, log scale);
* sensitivity (only for grid-expanded methods): the metric against each swept option.
The data floor is drawn as a dashed line wherever the metric has one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.callbacks.visuals import make_grid, principal_axes
from onestep.files import atomic_savefig

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def _figure(n_panels: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.3)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=90)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _color(methods: list[str], method: str) -> str:
    return COLORS[methods.index(method) % len(COLORS)] if method in methods else "black"


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def qualitative_grid(samples: dict[tuple[str, str], torch.Tensor], references: dict[str, torch.Tensor],
                     datasets: list[str], methods: list[str], path: Path, max_points: int = 2000,
                     n_images: int = 36) -> Path:
    from matplotlib.figure import Figure

    columns = ["data", *methods]
    fig = Figure(figsize=(2.3 * len(columns), 2.3 * len(datasets)), dpi=80)
    for r, dataset in enumerate(datasets):
        ref = references.get(dataset)
        axes_2d = None
        if ref is not None and ref.dim() == 2 and ref.shape[1] > 2:
            ref_np = ref.double().numpy()
            axes_2d, center = principal_axes(ref_np), ref_np.mean(0, keepdims=True)
        for c, column in enumerate(columns):
            ax = fig.add_subplot(len(datasets), len(columns), r * len(columns) + c + 1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize=9)
            if c == 0:
                ax.set_ylabel(dataset + (" (PCA)" if axes_2d is not None else ""), fontsize=9)
            x = ref if column == "data" else samples.get((dataset, column))
            if x is None:
                ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            if x.dim() == 4:
                ax.imshow(make_grid(x[:n_images], nrow=int(math.sqrt(n_images)))[..., 0] if x.shape[1] == 1 else
                          make_grid(x[:n_images], nrow=int(math.sqrt(n_images))), cmap="gray", vmin=0, vmax=1)
                continue
            def project(t):
                t = t[:max_points].double().numpy().reshape(len(t[:max_points]), -1)
                return (t - center) @ axes_2d if axes_2d is not None else t[:, :2]
            style = {"s": 1.5, "linewidths": 0, "alpha": 0.6}
            if ref is not None:
                p = project(ref)
                ax.scatter(p[:, 0], p[:, 1], color="#c8c8c8" if column != "data" else "#333333", **style)
                lo, hi = p.min(0), p.max(0)
                pad = 0.15 * (hi - lo)
                ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0]), ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            if column != "data":
                p = project(x)
                ax.scatter(p[:, 0], p[:, 1], color=_color(methods, column), **style)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def image_rows(samples: dict[tuple[str, str], torch.Tensor], reference: torch.Tensor, dataset: str,
               methods: list[str], path: Path, per_row: int = 12) -> Path:
    """One image dataset: a row of real images, then one row per method (its first ``per_row`` final
    samples, raw units in [0, 1]); a method without samples gets an empty row saying so."""
    from matplotlib.figure import Figure

    rows = [("data", reference), *[(m, samples.get((dataset, m))) for m in methods]]
    fig = Figure(figsize=(0.62 * per_row + 1.6, 0.7 * len(rows) + 0.3), dpi=100)
    for r, (label, x) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, r + 1)
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        if x is None or x.dim() != 4:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            continue
        strip = make_grid(x[:per_row], nrow=per_row)
        ax.imshow(strip[..., 0] if x.shape[1] == 1 else strip, cmap="gray", vmin=0, vmax=1, aspect="equal")
    fig.subplots_adjust(left=0.17, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    return atomic_savefig(fig, path)


def plain_log_axis(axis) -> None:
    """Ticks of a log axis as plain numbers (0.05, 2, 100), not 10^k. Decades are labelled; between them
    2 and 5 are labelled when the axis spans at most two decades (and 3, 4, 6, 8 too under one decade), so
    that a narrow range still shows readable values."""
    import math as _math

    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _pos) -> str:
        lo, hi = sorted(abs(v) for v in axis.get_view_interval())
        decades = _math.log10(hi / lo) if lo > 0 and hi > 0 else _math.inf
        mantissa = round(value / 10 ** _math.floor(_math.log10(value) + 1e-9), 3) if value > 0 else 0
        wanted = {2.0, 5.0} if decades <= 2 else set()
        wanted |= {3.0, 4.0, 6.0, 8.0} if decades <= 1 else set()
        return f"{value:g}" if mantissa in wanted else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def legend_outside(ax) -> None:
    """The legend to the right of the panel, so that it never covers the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _floor_line(ax, floor_value: float | None) -> None:
    if floor_value:
        ax.axhline(floor_value, color="black", linestyle="--", linewidth=1, label="data floor")


def metric_vs_nfe(groups: dict[str, dict[str, list[dict[str, Any]]]], metric_of: dict[str, str],
                  floors: dict[str, float | None], methods: list[str], path: Path) -> Path:
    """``groups[dataset][method]`` lists that method's records; ``metric_of[dataset]`` the metric key."""
    datasets = list(groups)
    fig, axes = _figure(len(datasets), size=(6.4, 3.3))  # wide panels: the legend sits right of the axes
    for ax, dataset in zip(axes, datasets):
        key = metric_of[dataset]
        for method, records in groups[dataset].items():
            color = _color(methods, method)
            values = [r["metrics"][key] for r in records if r["metrics"].get(key) is not None]
            nfes = [r["nfe"] for r in records if r.get("nfe")]
            if values and nfes:
                mean, std = _mean_std(values)
                ax.errorbar([nfes[0]], [mean], yerr=[std], fmt="o", color=color, label=method, capsize=3)
            sweep = defaultdict(list)  # the model re-evaluated at other step counts, plus its default
            if values and nfes and any(r.get("nfe_sweep") for r in records):
                sweep[nfes[0]].extend(values)
            for r in records:
                for row in r.get("nfe_sweep") or []:
                    if row.get(key) is not None:
                        sweep[row["nfe"]].append(row[key])
            if sweep:
                xs = sorted(sweep)
                ax.plot(xs, [np.mean(sweep[x]) for x in xs], "-", color=color, alpha=0.7, linewidth=1.2,
                        label=f"{method} (NFE sweep)")
        _floor_line(ax, floors.get(dataset))
        ax.set_xscale("log"), ax.set_yscale("log")
        plain_log_axis(ax.xaxis), plain_log_axis(ax.yaxis)
        ax.set_title(dataset, fontsize=10), ax.set_xlabel("NFE per sample"), ax.set_ylabel(key)
        legend_outside(ax)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def metric_vs_time(groups, metric_of, floors, methods: list[str], path: Path) -> Path:
    datasets = list(groups)
    fig, axes = _figure(len(datasets), size=(5.8, 3.3))
    for ax, dataset in zip(axes, datasets):
        key = metric_of[dataset]
        for method, records in groups[dataset].items():
            pts = [((r.get("budget") or {}).get("used", {}).get("seconds"), r["metrics"].get(key)) for r in records]
            pts = [(t, v) for t, v in pts if t is not None and v is not None]
            if pts:
                ax.scatter(*zip(*pts), color=_color(methods, method), label=method, s=22)
        _floor_line(ax, floors.get(dataset))
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_title(dataset, fontsize=10), ax.set_xlabel("training time (s)"), ax.set_ylabel(key)
        legend_outside(ax)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def sampling_speed(groups, methods: list[str], path: Path) -> Path:
    datasets = list(groups)
    fig, axes = _figure(len(datasets), size=(4.2, 0.4 * max(3, len(methods)) + 1.2))
    for ax, dataset in zip(axes, datasets):
        names, speeds = [], []
        for method, records in groups[dataset].items():
            values = [r["metrics"].get("samples_per_s") for r in records if r["metrics"].get("samples_per_s")]
            if values:
                names.append(f"{method} (NFE {records[0].get('nfe')})")
                speeds.append(float(np.mean(values)))
        if speeds:
            ax.barh(range(len(speeds)), speeds, color=[_color(methods, n.split(" (")[0]) for n in names])
            ax.set_yticks(range(len(speeds)), names, fontsize=8)
            for i, v in enumerate(speeds):
                ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
        ax.set_title(dataset, fontsize=10), ax.set_xlabel("samples / s (higher is better)")
    fig.tight_layout()
    return atomic_savefig(fig, path)


def sensitivity(groups, metric_of, floors, path: Path) -> Path | None:
    """For grid-expanded methods: the metric against each swept option (other options as separate lines)."""
    panels = []
    for dataset, by_method in groups.items():
        by_base: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for records in by_method.values():
            for r in records:
                if r.get("variant"):
                    by_base[r.get("base_method") or r["method"]].append(r)
        for base, records in by_base.items():
            for option in sorted({k for r in records for k in r["variant"]}):
                swept = [r for r in records if option in r["variant"]]  # grids of one base may differ in keys
                if len({str(r["variant"][option]) for r in swept}) > 1:
                    panels.append((dataset, base, option, swept))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (dataset, base, option, records) in zip(axes, panels):
        key = metric_of[dataset]
        lines: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            others = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(r["variant"].items()) if k != option)
            if r["metrics"].get(key) is not None:
                lines[others][r["variant"][option]].append(r["metrics"][key])
        for i, (label, points) in enumerate(sorted(lines.items())):
            xs = sorted(points, key=lambda v: (isinstance(v, str), v))
            numeric = all(isinstance(x, (int, float)) for x in xs)
            pos = xs if numeric else list(range(len(xs)))
            means = [np.mean(points[x]) for x in xs]
            stds = [np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs]
            ax.errorbar(pos, means, yerr=stds, fmt="o-", capsize=3, color=COLORS[i % len(COLORS)],
                        label=label or base)
            if not numeric:
                ax.set_xticks(pos, [str(x) for x in xs])
            elif min(xs) > 0 and max(xs) / min(xs) >= 8:  # grids such as K or n span decades
                ax.set_xscale("log")
                plain_log_axis(ax.xaxis)
        _floor_line(ax, floors.get(dataset))
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_title(f"{base} on {dataset}", fontsize=10), ax.set_xlabel(option.rsplit(".", 1)[-1])
        ax.set_ylabel(key), ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_savefig(fig, path)
