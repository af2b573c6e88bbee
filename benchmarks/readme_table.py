"""The README's results table from a finished suite: W2 mean ± std over seeds and its ratio to the data floor.

    python benchmarks/readme_table.py results/toy [--metric w2] [--methods flow_matching gan imle]
    python benchmarks/readme_table.py results/mnist_cpu --images
    python benchmarks/readme_table.py results/mnist_cpu_tuning --against results/mnist_cpu_first

One row per dataset: the floor (mean over disjoint train chunks, as in the report), then every method's
``mean ± std (ratio to the floor)``; bold marks the best mean of the row. Cells that did not finish are shown
as ``n/k seeds``. ``--methods`` keeps those columns (in the suite's order), e.g. to split a wide suite into two
tables; bold is then the best of the columns shown. Run ``onestep report <dir>`` first so that ``floors.json`` exists (it is computed otherwise).

``--images`` (one seed, image datasets): one row per method, the floor last; per dataset the headline FD (the
LeNet space; ratio to the floor), the pixel FD, precision / recall in the LeNet space and the steps the
budget allowed; then NFE and the images/s of the timed draw (first dataset).

``--against BASE`` (a suite of grid variants of BASE's cells, or methods named ``<BASE's method>[label]``, same
budget and protocol): the settings tried.
Per variant cell, BASE's cell of the same method, dataset and seed, then the variant; the headline metric,
its ratio to the floor, the pixel FD, precision / recall and the steps the budget allowed; bold marks the
best headline value of each group.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from onestep.benchmark.floor import floor_for, load_floors
from onestep.benchmark.records import latest_by_cell, read_records
from onestep.benchmark.tables import primary_metric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--metric", default="w2")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods' columns")
    parser.add_argument("--images", action="store_true", help="image datasets: one row per method")
    parser.add_argument("--against", type=Path, default=None, help="the suite whose cells the variants change")
    args = parser.parse_args()
    latest = latest_by_cell(read_records(args.out_dir / "results.jsonl"))
    if args.against is not None:
        return settings_table(latest, args.against)
    suite = yaml.safe_load((args.out_dir / "suite.yaml").read_text())  # the suite's order of methods and sets
    methods = [m["name"] for m in suite["methods"] if any(m["name"] == k[0] for k in latest)
               and (args.methods is None or m["name"] in args.methods)]
    datasets = [d for d in suite["datasets"] if any(d == k[1] for k in latest)]
    seeds = sorted({s for _, _, s in latest})
    cache = load_floors(args.out_dir)
    if args.images:
        return image_table(args.out_dir, latest, methods, datasets, cache)
    print("| dataset | floor | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 2) + "|")
    for dataset in datasets:
        records = {m: [r for (rm, rd, _), r in latest.items() if rm == m and rd == dataset and r["status"] == "ok"]
                   for m in methods}
        some = next(r for rs in records.values() for r in rs)
        floor = floor_for(args.out_dir, some["data_config"], some["protocol"], cache)["metrics"][args.metric]
        means = {m: statistics.fmean(r["metrics"][args.metric] for r in rs) for m, rs in records.items() if rs}
        best = min(means.values())
        cells = []
        for m in methods:
            values = [r["metrics"][args.metric] for r in records[m]]
            if not values:
                cells.append("not run")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            text = f"{means[m]:.3f} ± {spread:.3f} ({means[m] / floor:.2f}x)"
            if len(values) < len(seeds):
                text += f" {len(values)}/{len(seeds)} seeds"
            cells.append(f"**{text}**" if means[m] == best else text)
        print(f"| {dataset} | {floor:.3f} | " + " | ".join(cells) + " |")


def image_table(out_dir: Path, latest: dict, methods: list[str], datasets: list[str], cache: dict) -> None:
    first = {d: next(r for (_, rd, _), r in latest.items() if rd == d and r["status"] == "ok") for d in datasets}
    headline = {d: primary_metric(first[d]["metrics"]) for d in datasets}
    floors = {d: floor_for(out_dir, first[d]["data_config"], first[d]["protocol"], cache)["metrics"] for d in datasets}
    header = ["method", "NFE"]
    for d in datasets:
        header += [f"{d} FD ({headline[d][3:]})", f"{d} FD (pixels)", f"{d} precision / recall", f"{d} steps"]
    print("| " + " | ".join([*header, "images/s"]) + " |")
    print("|---" * (len(header) + 1) + "|")
    best = {d: min(r["metrics"][headline[d]] for (m, rd, _), r in latest.items() if rd == d and r["status"] == "ok"
                   and m in methods) for d in datasets}
    for m in methods:
        rows = {d: next((r for (rm, rd, _), r in latest.items() if rm == m and rd == d and r["status"] == "ok"), None)
                for d in datasets}
        some = next((r for r in rows.values() if r), None)
        cells = [m, f"{some['nfe']:g}" if some and some.get("nfe") is not None else ""]
        for d in datasets:
            r = rows[d]
            if r is None:
                cells += ["not run", "", "", ""]
                continue
            metrics, key = r["metrics"], headline[d]
            fd = f"{metrics[key]:.1f} ({metrics[key] / floors[d][key]:.1f}x)"
            cells += [f"**{fd}**" if metrics[key] == best[d] else fd, f"{metrics['fd_pixels']:.2f}",
                      f"{metrics['precision']:.2f} / {metrics['recall']:.2f}", f"{r['budget']['used']['steps']:,}"]
        speed = rows[datasets[0]]["metrics"].get("samples_per_s") if rows[datasets[0]] else None
        print("| " + " | ".join([*cells, f"{speed:,.1f}" if speed else ""]) + " |")
    floor_cells = ["*data floor*", ""]
    for d in datasets:
        f = floors[d]
        floor_cells += [f"*{f[headline[d]]:.1f}*", f"*{f['fd_pixels']:.2f}*",
                        f"*{f['precision']:.2f} / {f['recall']:.2f}*", ""]
    print("| " + " | ".join([*floor_cells, ""]) + " |")


def base_of(record: dict) -> str:
    """The method a variant changes: its grid's base, or ``x`` for a method named ``x[label]``."""
    if record.get("base_method") and record["base_method"] != record["method"]:
        return record["base_method"]
    return record["method"].split("[", 1)[0]


def settings_table(variants: dict, base_dir: Path) -> None:
    base = latest_by_cell(read_records(base_dir / "results.jsonl"))
    cache = load_floors(base_dir)
    order = [m["name"] for m in yaml.safe_load((base_dir / "suite.yaml").read_text())["methods"]]
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[tuple, list[dict]] = {}
    for (name, dataset, seed), record in variants.items():
        method = base_of(record)
        groups.setdefault((dataset, rank.get(method, 99), method, seed), []).append(record)
    vector = all(primary_metric(r["metrics"]) == "w2" for rs in groups.values() for r in rs if r["status"] == "ok")
    third = "" if vector else " FD (pixels) |"  # W2 on vector sets: no pixel space
    print(f"| method | dataset | setting | steps | {'W2' if vector else 'headline FD'} (ratio to floor) |{third} "
          "precision / recall |")
    print("|---" * (6 if vector else 7) + "|")
    for (dataset, _, method, seed), records in sorted(groups.items()):
        original = base.get((method, dataset, seed))
        if original is None or original["status"] != "ok":
            print(f"| {method} | {dataset} | (no finished cell in {base_dir.name}) | | | |")
            continue
        key = primary_metric(original["metrics"])
        floor = floor_for(base_dir, original["data_config"], original["protocol"], cache)["metrics"][key]
        rows = [("as in " + base_dir.name, original)] + [
            (", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["variant"].items()) or r["method"], r)
            for r in sorted(records, key=lambda r: r["method"]) if r["status"] == "ok"]
        best = min(r["metrics"][key] for _, r in rows)
        for label, r in rows:
            value = r["metrics"][key]
            fd = f"{value:.3f} ({value / floor:.2f}x)" if vector else f"{value:.1f} ({value / floor:.1f}x)"
            m = r["metrics"]
            pixels = "" if vector else f" {m.get('fd_pixels', float('nan')):.2f} |"
            print(f"| {method} | {dataset} | {label} | {r['budget']['used']['steps']:,} | "
                  f"{'**' + fd + '**' if value == best else fd} |{pixels} "
                  f"{m.get('precision', float('nan')):.2f} / {m.get('recall', float('nan')):.2f} |")

if __name__ == "__main__":
    main()
