"""Result tables: mean ± standard deviation over seeds per method and dataset, best value marked.

Statistics: for a method with values ``v_1..v_k`` over its finished seeds, the table shows the mean and,
for ``k >= 2``, the sample standard deviation (``ddof = 1``). The best *mean* of each column with a
direction (lower or higher is better) is marked in bold among the methods; the data-floor row is never
marked (its ± is the spread over the disjoint train chunks it averages). No best is marked in a column
whose values are saturated (:func:`saturated`): every method within 2 % of the others, or of the data's floor,
e.g. the off-manifold fraction on 8gaussians (0.99 for every method and for the data itself). Ratios to the
floor are per cell (``W2 / floor`` of the cell's own data and protocol), then averaged.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from onestep.callbacks.visuals import headline_fd

#: (key, label, direction): "min" lower is better, "max" higher is better, None not ranked
BASE_COLUMNS: list[tuple[str, str, str | None]] = [
    ("w2", "W2", "min"), ("w2_ratio", "W2 / floor", "min"), ("sw2", "SW2", "min"),
    ("offmanifold", "off-manifold", "min"), ("manifold_dist_mean", "dist. to manifold", "min"),
    ("precision", "precision", "max"), ("recall", "recall", "max"), ("density", "density", None),
    ("coverage", "coverage", "max"), ("nfe", "NFE", "min"), ("samples_per_s", "samples/s", "max"),
    ("train_seconds", "train s", None), ("steps", "steps", None),
]
DIRECTION_NOTE = ("Lower is better for W2, SW2, FD, off-manifold fraction, distance to the manifold and NFE; "
                  "higher is better for precision, recall, coverage and samples/s (density is unranked: values "
                  "above 1 mean samples crowd dense regions). Bold: best mean among methods.")


#: relative tolerance under which a column's values are "all the same" (see :func:`saturated`)
SATURATION_RTOL = 0.02


def saturated(means: list[float], floor: float | None = None, rtol: float = SATURATION_RTOL) -> bool:
    """Whether marking a best value in a column would be meaningless.

    Rule (either suffices): (a) every method's mean lies within ``rtol`` (relative to the largest magnitude)
    of every other one, so no method is distinguishably best; or (b) the column has a data floor and every
    method's mean lies within ``rtol`` of it, so all methods sit at what real data itself scores (a metric
    saturated at its floor, e.g. off-manifold 0.99 on 8gaussians for every method and for the data)."""
    def close(a: float, b: float) -> bool:
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-15

    if len(means) >= 2 and close(min(means), max(means)):
        return True
    return floor is not None and math.isfinite(floor) and bool(means) and all(close(m, floor) for m in means)


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The headline quality metric: FD in the most semantic feature space present (:func:`headline_fd`; pixel
    FD on 2,000 MNIST samples sits at its own sampling floor for a model 13x the floor in the LeNet space),
    else W2."""
    return headline_fd(metrics) or ("w2" if "w2" in metrics else None)


def cell_values(record: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, float]:
    """Every number a table can show for one finished cell (metrics, floor ratios, cost)."""
    values = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
    values.pop("nfe", None)
    if record.get("nfe") is not None:
        values["nfe"] = float(record["nfe"])
    used = (record.get("budget") or {}).get("used") or {}
    if used.get("seconds") is not None:
        values["train_seconds"] = float(used["seconds"])
    if used.get("steps") is not None:
        values["steps"] = float(used["steps"])
    floor_metrics = (floor or {}).get("metrics") or {}
    for key in ["w2", *[k for k in values if k.startswith("fd_")]]:
        if values.get(key) is not None and floor_metrics.get(key):
            values[f"{key}_ratio"] = values[key] / floor_metrics[key]
    return values


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == int(value) and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.3g}"


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def text(self) -> str:
        if not self.values:
            return "–"
        return fmt(self.mean) + (f" ± {fmt(self.std)}" if self.std is not None else "")


@dataclass
class Table:
    """A rendered-agnostic table: header labels, rows of (text, bold) cells, and notes."""

    columns: list[str]
    rows: list[list[tuple[str, bool]]]
    notes: list[str] = field(default_factory=list)
    italic_rows: set[int] = field(default_factory=set)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for i, row in enumerate(self.rows):
            cells = [f"**{t}**" if bold else (f"*{t}*" if i in self.italic_rows and t not in ("", "–") else t)
                     for t, bold in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + [""] + [f"{n}" for n in self.notes])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(f"<td>{'<b>' if b else ''}{html.escape(t)}{'</b>' if b else ''}</td>" for t, b in row)
            body.append(f"<tr{' class=floor' if i in self.italic_rows else ''}>{cells}</tr>")
        notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in self.notes)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}"


def _columns_for(values_by_method: dict[str, list[dict[str, float]]]) -> list[tuple[str, str, str | None]]:
    present = {k for rows in values_by_method.values() for v in rows for k in v}
    columns = [c for c in BASE_COLUMNS[:3] if c[0] in present]
    for key in sorted(k for k in present if k.startswith("fd_") and not k.endswith("_ratio")):
        columns.append((key, f"FD ({key[3:]})", "min"))
        if f"{key}_ratio" in present:
            columns.append((f"{key}_ratio", "FD / floor", "min"))
    return columns + [c for c in BASE_COLUMNS[3:] if c[0] in present]


def dataset_table(records: list[dict[str, Any]], methods: list[str], expected_seeds: int,
                  floors: list[tuple[str, dict[str, Any]]]) -> Table:
    """The table of one dataset. ``records`` are its finished (ok) cells with ``_values`` attached,
    ``floors`` the (label, floor) rows to show beneath the methods."""
    by_method: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for r in records:
        by_method.setdefault(r["method"], []).append(r["_values"])
    columns = _columns_for(by_method)
    stats = {m: {key: Stat([v[key] for v in rows if v.get(key) is not None]) for key, _, _ in columns}
             for m, rows in by_method.items()}
    floor_of = {key: (1.0 if key.endswith("_ratio") else (floors[0][1].get("metrics") or {}).get(key))
                if floors else None for key, _, _ in columns}
    best: dict[str, float] = {}
    flat: list[str] = []
    for key, label, direction in columns:
        means = [s[key].mean for s in stats.values() if s[key].mean is not None]
        if direction and len(means) >= 2:
            if saturated(means, floor_of[key]):
                flat.append(label)
                continue
            best[key] = min(means) if direction == "min" else max(means)
    rows = []
    for method, st in stats.items():
        row = [(method, False), (f"{len(by_method[method])}/{expected_seeds}", False)]
        for key, _, _ in columns:
            mean = st[key].mean
            is_best = key in best and mean is not None and math.isclose(mean, best[key], rel_tol=1e-9, abs_tol=1e-15)
            row.append((st[key].text(), is_best))
        rows.append(row)
    italic = set()
    for label, floor in floors:
        fm = floor.get("metrics") or {}
        row = [(label, False), ("", False)]
        for key, _, _ in columns:
            value = 1.0 if key.endswith("_ratio") else fm.get(key)
            spread = None if key.endswith("_ratio") else fm.get(f"{key}_std")
            text = "" if value is None else fmt(value) + (f" ± {fmt(spread)}" if spread is not None else "")
            row.append((text, False))
        italic.add(len(rows))
        rows.append(row)
    notes = ([f"No best marked for {', '.join(flat)}: every method is within {SATURATION_RTOL:.0%} of the others "
              "or of the data floor."] if flat else [])
    return Table(["method", "seeds", *[label for _, label, _ in columns]], rows, notes=notes, italic_rows=italic)


def overview_table(values: dict[tuple[str, str], list[dict[str, float]]], methods: list[str],
                   datasets: list[str]) -> Table | None:
    """Methods x datasets: the headline metric as a ratio to the data floor (W2, or FD for images)."""
    columns, rows, any_value = ["method", *datasets], [], False
    ratio_key: dict[str, str | None] = {}
    for d in datasets:
        keys = {k for m in methods for v in values.get((m, d), []) for k in v if k.endswith("_ratio")}
        headline = primary_metric({k.removesuffix("_ratio"): None for k in keys})
        ratio_key[d] = f"{headline}_ratio" if headline else None
    best = {}
    for d in datasets:
        means = [Stat([v[ratio_key[d]] for v in values.get((m, d), []) if ratio_key[d] and v.get(ratio_key[d])]).mean
                 for m in methods]
        means = [x for x in means if x is not None]
        if len(means) >= 2 and not saturated(means, 1.0):  # ratios: the floor is 1
            best[d] = min(means)
    for m in methods:
        row = [(m, False)]
        for d in datasets:
            key = ratio_key[d]
            stat = Stat([v[key] for v in values.get((m, d), []) if key and v.get(key) is not None])
            any_value |= bool(stat.values)
            row.append((stat.text(), d in best and stat.mean is not None and math.isclose(stat.mean, best[d])))
        rows.append(row)
    if not any_value:
        return None
    notes = ["Each entry is the headline metric divided by the data's own sampling floor (1 = as close to the "
             "reference as a second real sample): " + ", ".join(f"{d}: {(ratio_key[d] or '').removesuffix('_ratio')}"
                                                                for d in datasets) + "."]
    return Table(columns, rows, notes=notes)


def reference_table(values: dict[tuple[str, str], list[dict[str, float]]], methods: list[str],
                    datasets: list[str], reference: str) -> Table | None:
    """Methods x datasets: each method's headline metric over the reference method's (mean over seeds
    each), with the NFE of both; bold where the method is no worse than the reference (ratio <= 1)."""
    def mean_of(method: str, dataset: str, key: str) -> float | None:
        return Stat([v[key] for v in values.get((method, dataset), []) if v.get(key) is not None]).mean

    keys = {}
    for d in datasets:
        present = {k for m in methods for v in values.get((m, d), []) for k in v}
        keys[d] = primary_metric({k: None for k in sorted(present) if not k.endswith("_ratio")})
    rows, any_value = [], False
    for m in methods:
        if m == reference:
            continue
        row = [(m, False)]
        for d in datasets:
            ours, theirs = (mean_of(x, d, keys[d]) if keys[d] else None for x in (m, reference))
            if ours is None or not theirs:
                row.append(("–", False))
                continue
            any_value = True
            nfe, ref_nfe = mean_of(m, d, "nfe"), mean_of(reference, d, "nfe")
            steps = f" (NFE {fmt(nfe)} vs {fmt(ref_nfe)})" if nfe is not None and ref_nfe is not None else ""
            row.append((f"{fmt(ours / theirs)}{steps}", ours <= theirs))
        rows.append(row)
    if not any_value:
        return None
    notes = [f"Each entry is the method's headline metric divided by that of the reference method {reference!r} "
             "on the same dataset, budget and protocol (means over seeds); below 1 the method is better. Bold: "
             "no worse than the reference. Metrics: " + ", ".join(f"{d}: {keys[d]}" for d in datasets) + "."]
    return Table(["method", *datasets], rows, notes=notes)
