"""The README's results table from a finished suite: W2 mean ± std over seeds and its ratio to the data floor.

    python benchmarks/readme_table.py results/toy [--metric w2] [--methods flow_matching gan imle]

One row per dataset: the floor (mean over disjoint train chunks, as in the report), then every method's
``mean ± std (ratio to the floor)``; bold marks the best mean of the row. Cells that did not finish are shown
as ``n/k seeds``. ``--methods`` keeps those columns (in the suite's order), e.g. to split a wide suite into two
tables; bold is then the best of the columns shown. Run ``onestep report <dir>`` first so that ``floors.json`` exists (it is computed otherwise).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from onestep.benchmark.floor import floor_for, load_floors
from onestep.benchmark.records import latest_by_cell, read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--metric", default="w2")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods' columns")
    args = parser.parse_args()
    latest = latest_by_cell(read_records(args.out_dir / "results.jsonl"))
    suite = yaml.safe_load((args.out_dir / "suite.yaml").read_text())  # the suite's order of methods and sets
    methods = [m["name"] for m in suite["methods"] if any(m["name"] == k[0] for k in latest)
               and (args.methods is None or m["name"] in args.methods)]
    datasets = [d for d in suite["datasets"] if any(d == k[1] for k in latest)]
    seeds = sorted({s for _, _, s in latest})
    cache = load_floors(args.out_dir)
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


if __name__ == "__main__":
    main()
