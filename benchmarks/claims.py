"""Do the papers' claims hold here? One row per headline claim, measured under a stated protocol.

Each method's claims live in ``benchmarks/claims_<method>.py`` with ``measure(quick=False) -> rows`` (a row:
``method, claim, protocol, numbers, verdict in {holds, partly, does not hold}, note``) and write
``benchmarks/results/claims_<method>.json`` when run on their own. This script runs the methods asked for
(``--run otnfm magt ...``; each takes minutes to tens of minutes on a CPU), then gathers every
``claims_<method>.json`` into ``benchmarks/results/claims.json`` and ``claims.md`` (the README's table).

    python benchmarks/claims.py                      # gather what was measured
    python benchmarks/claims.py --run otnfm --quick  # re-measure OT-NFM on the quick budget, then gather
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, save_result

METHODS = ("otnfm", "magt", "characteristic", "lmppm")
VERDICTS = ("holds", "partly", "does not hold")


def _rows_of(method: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = RESULTS_DIR / f"claims_{method}.json"
    if not path.is_file():
        return [], {}
    record = json.loads(path.read_text())
    if isinstance(record, list):  # a bare list of rows
        record = {"rows": record}
    rows = record.get("rows") or record.get("claims") or []  # either key: each module writes its own file
    for row in rows:
        if row.get("verdict") not in VERDICTS:
            raise ValueError(f"{path}: verdict {row.get('verdict')!r} is not one of {VERDICTS}")
        row.setdefault("method", method)
    return rows, {"date": record.get("date"), "machine": record.get("machine"), "command": record.get("command")}


def _numbers(numbers: Any, digits: int = 3) -> str:
    """A compact one-cell rendering of a (nested) dict of numbers."""
    if isinstance(numbers, float):
        return f"{numbers:.{digits}g}"
    if isinstance(numbers, dict):
        return "; ".join(f"{k}: {_numbers(v, digits)}" for k, v in numbers.items())
    if isinstance(numbers, (list, tuple)):
        return "[" + ", ".join(_numbers(v, digits) for v in numbers) + "]"
    return str(numbers)


def markdown(rows: list[dict[str, Any]], sources: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | claim | our protocol | our numbers | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["method"], row["claim"], row["protocol"], _numbers(row["numbers"]),
                 f"**{row['verdict']}**" + (f" ({row['note']})" if row.get("note") else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    lines.append("")
    for method, source in sources.items():
        machine = source.get("machine") or {}
        machine = machine.get("cpu") or machine if isinstance(machine, dict) else machine
        said = [f"measured {source['date']}" if source.get("date") else "",
                f"on {machine}" if machine else "", f"`{source['command']}`" if source.get("command") else ""]
        lines.append(f"- {method}: `benchmarks/results/claims_{method}.json` " + ", ".join(w for w in said if w)
                     + (" (the machine and budget are in the protocol column)" if not machine else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="measure and gather the papers' headline claims")
    parser.add_argument("--run", nargs="*", default=[], choices=METHODS, help="re-measure these methods first")
    parser.add_argument("--quick", action="store_true", help="the short budget of each method's measure()")
    args = parser.parse_args()
    for method in args.run:
        module = importlib.import_module(f"claims_{method}")
        save_result(f"claims_{method}", {"rows": module.measure(quick=args.quick)})
    rows, sources = [], {}
    for method in METHODS:
        method_rows, source = _rows_of(method)
        rows += method_rows
        if method_rows:
            sources[method] = source
    save_result("claims", {"rows": rows, "sources": sources})
    table = RESULTS_DIR / "claims.md"
    tmp = table.with_name(f".{table.name}.{os.getpid()}.tmp")
    tmp.write_text(markdown(rows, sources))
    os.replace(tmp, table)
    print(Path(table).read_text())


if __name__ == "__main__":
    main()
