"""``onestep report <dir>``: ``report.md`` and a self-contained ``report.html`` from ``results.jsonl``.

The report reads only what the runner saved (records, ``final_samples.pt``, ``suite.yaml``,
``run_info.json``): nothing is retrained. Per dataset it shows a table of every method (mean ± std over
seeds, best mean in bold), the data's own sampling floor (:mod:`onestep.benchmark.floor`) beneath, and the
failed or missing cells; above them an overview of the headline metric as a ratio to the floor; then the
figures (:mod:`onestep.benchmark.figures`). The HTML embeds the figures as base64 PNG, so it is one file.
With ``--wandb`` the tables and figures also go to a W&B summary run in the suite's group.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shlex
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from onestep.benchmark import figures as figs
from onestep.benchmark.floor import floor_for, floor_key, load_floors
from onestep.benchmark.records import RESULTS_FILE, describe_machine_short, latest_by_cell, read_records
from onestep.benchmark.suite import import_suite_modules
from onestep.benchmark.tables import (
    DIRECTION_NOTE,
    Table,
    cell_values,
    dataset_table,
    overview_table,
    primary_metric,
    reference_table,
)
from onestep.files import atomic_write_text

CSS = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:0.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
       "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}"
       "tr.floor td{font-style:italic;color:#555;background:#fafafa}.note{font-size:12px;color:#555}"
       "img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:12px}")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _ordered(preferred: list, seen: list) -> list:
    return [x for x in preferred if x in seen] + [x for x in seen if x not in preferred]


def collect(out_dir: Path, with_floor: bool = True) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what the W&B summary logs)."""
    suite = _load_yaml(out_dir / "suite.yaml")
    import_suite_modules(suite.get("imports"))  # a user's datasets, for the floors and reference figures
    latest = list(latest_by_cell(read_records(out_dir / RESULTS_FILE)).values())
    if not latest:
        raise FileNotFoundError(f"{out_dir / RESULTS_FILE} has no finished cells; run onestep benchmark first")
    methods = _ordered([m["name"] for m in suite.get("methods", [])], list(dict.fromkeys(r["method"] for r in latest)))
    datasets = _ordered(list(suite.get("datasets", [])), list(dict.fromkeys(r["dataset"] for r in latest)))
    seeds = suite.get("seeds") or sorted({r["seed"] for r in latest})
    ok = [r for r in latest if r.get("status") == "ok"]
    floor_cache = load_floors(out_dir)
    floors: dict[str, dict[str, Any]] = {}
    for r in ok:
        floor = None
        if with_floor and r.get("data_config") is not None:
            key = floor_key(r["data_config"], r["protocol"])
            try:
                floor = floors[key] = floor_for(out_dir, r["data_config"], r["protocol"], floor_cache)
            except Exception as err:  # noqa: BLE001 - a report without a floor beats no report
                warnings.warn(f"data floor of {r['dataset']} could not be computed: {err}")
        r["_floor_key"] = floor_key(r["data_config"], r["protocol"]) if floor else None
        r["_values"] = cell_values(r, floor)
    tables, failures, skipped = {}, {}, {}
    for d in datasets:
        # metric groups the protocol left out for this data, with the reason (e.g. a file of points: no support)
        skipped[d] = sorted({f"{group} metrics: {why}" for r in latest if r["dataset"] == d
                             for group, why in ((r.get("protocol") or {}).get("skipped_metrics") or {}).items()})
        rows = [r for r in ok if r["dataset"] == d]
        keys = list(dict.fromkeys(r["_floor_key"] for r in rows if r["_floor_key"]))
        labels = [("data floor" if len(keys) == 1 else f"data floor ({_floor_label(floors[k])})", floors[k])
                  for k in keys]
        tables[d] = dataset_table(rows, [m for m in methods if any(r["method"] == m for r in rows)], len(seeds),
                                  labels)
        present = {(r["method"], r["seed"]) for r in latest if r["dataset"] == d}
        failures[d] = [f"{r['method']} seed {r['seed']}: {r.get('error', 'failed').splitlines()[0][:300]}"
                       for r in latest if r["dataset"] == d and r.get("status") != "ok"]
        failures[d] += [f"{m} seed {s}: not run yet" for m in methods for s in seeds if (m, s) not in present
                        and any(x["method"] == m for x in latest)]
    values = defaultdict(list)
    for r in ok:
        values[(r["method"], r["dataset"])].append(r["_values"])
    finished = [m for m in methods if any(r["method"] == m for r in ok)]
    reference = suite.get("reference") or ("flow_matching" if "flow_matching" in finished else None)
    return {"suite": suite, "records": latest, "ok": ok, "methods": methods, "datasets": datasets, "seeds": seeds,
            "floors": floors, "tables": tables, "failures": failures, "skipped": skipped,
            "overview": overview_table(values, finished, datasets), "reference": reference,
            "against_reference": reference_table(values, finished, datasets, reference) if reference else None,
            "run_info": json.loads((out_dir / "run_info.json").read_text()) if (out_dir / "run_info.json").is_file()
            else {}}


def _floor_label(floor: dict[str, Any]) -> str:
    cfg = floor.get("data_config") or {}
    return ", ".join(f"{k}={cfg[k]}" for k in ("n_train", "noise_std", "seed") if cfg.get(k) is not None)


def make_figures(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    """Draw the figures into ``<out>/figures``; returns {name: path}."""
    from onestep.data import OneStepDataModule

    fig_dir = out_dir / "figures"
    groups: dict[str, dict[str, list]] = {d: defaultdict(list) for d in data["datasets"]}
    for r in data["ok"]:
        groups[r["dataset"]][r["method"]].append(r)
    groups = {d: dict(g) for d, g in groups.items() if g}
    if not groups:
        return {}
    metric_of = {d: primary_metric(next(iter(g.values()))[0]["metrics"]) or "w2" for d, g in groups.items()}
    floor_value = {}
    for d, g in groups.items():
        keys = [r["_floor_key"] for rs in g.values() for r in rs if r.get("_floor_key")]
        floor_value[d] = (data["floors"][keys[0]]["metrics"].get(metric_of[d]) if keys else None)
    samples, references = {}, {}
    for d, g in groups.items():
        for method, records in g.items():
            for r in sorted(records, key=lambda r: r["seed"]):
                path = out_dir / (r.get("final_samples") or {}).get("path", "")
                if path.is_file():
                    samples[(d, method)] = torch.load(path, map_location="cpu", weights_only=True)
                    break
        first = next(iter(g.values()))[0]
        try:
            dm = OneStepDataModule(**first["data_config"])
            n = 36 if dm.is_image else 2000
            references[d] = dm.reference(first["protocol"].get("reference_split") or "test", n).float()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"reference data of {d} unavailable for the qualitative grid: {err}")
    methods = [m for m in data["methods"] if any(m in g for g in groups.values())]
    out = {
        "qualitative": figs.qualitative_grid(samples, references, list(groups), methods, fig_dir / "qualitative.png"),
        "metric_vs_nfe": figs.metric_vs_nfe(groups, metric_of, floor_value, methods, fig_dir / "metric_vs_nfe.png"),
        "metric_vs_time": figs.metric_vs_time(groups, metric_of, floor_value, methods,
                                              fig_dir / "metric_vs_time.png"),
        "sampling_speed": figs.sampling_speed(groups, methods, fig_dir / "sampling_speed.png"),
    }
    for d, ref in references.items():
        if ref.dim() == 4:
            out[f"samples_{d}"] = figs.image_rows(samples, ref, d, methods, fig_dir / f"samples_{d}.png")
    sens = figs.sensitivity(groups, metric_of, floor_value, fig_dir / "sensitivity.png")
    if sens is not None:
        out["sensitivity"] = sens
    return out


FIGURE_CAPTIONS = {
    "qualitative": "Samples (colour) against the reference data (grey), first finished seed of each cell.",
    "metric_vs_nfe": "Headline metric against network evaluations per sample (mean ± std over seeds; lines: "
                     "the same model re-evaluated at other step counts). Dashed: data floor.",
    "metric_vs_time": "Headline metric against training time, one point per cell. Dashed: data floor.",
    "sampling_speed": "Sampling throughput of the protocol's timed draw (samples per second, mean over seeds).",
    "sensitivity": "Sensitivity of grid-expanded methods to each swept option (mean ± std over seeds).",
}


def figure_caption(name: str) -> str:
    if name.startswith("samples_"):
        return (f"{name[len('samples_'):]}: a row of real test images, then one row per method (its first "
                "final samples, first finished seed).")
    return FIGURE_CAPTIONS.get(name, "")


def _header(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines: suite, commands, dates, machines, versions, protocol, budget."""
    suite, info = data["suite"], data["run_info"]
    invocations = info.get("invocations") or []
    machines = sorted({describe_machine_short(r["machine"]) for r in data["records"] if r.get("machine")})
    versions = sorted({json.dumps(r["versions"], sort_keys=True) for r in data["records"] if r.get("versions")})
    lines = [("suite", f"{suite.get('name', '?')}" + (f": {suite['description']}" if suite.get("description") else ""))]
    for inv in invocations[-3:]:
        lines.append(("command", f"{shlex.join(str(a) for a in inv.get('argv', []))}  (started {inv.get('started_at')}, "
                                 f"cwd {inv.get('cwd')})"))
    reused = [r for r in data["records"] if r.get("reused_from")]
    if reused:  # onestep benchmark --reuse: the cell ran in another suite's invocation (same specification)
        lines.append(("reused cells", "; ".join(
            f"{r['run_name']} = {r['reused_from'].get('run_name')} of {r['reused_from'].get('dir')}" for r in reused)))
    lines.append(("report written", time.strftime("%Y-%m-%d %H:%M:%S %z")))
    lines += [("machine", m) for m in machines]
    lines += [("versions", ", ".join(f"{k} {v}" for k, v in json.loads(v).items() if v)) for v in versions]
    lines.append(("protocol", ", ".join(f"{k}={v}" for k, v in (suite.get("eval") or {}).items())))
    lines.append(("budget", ", ".join(f"{k}={v}" for k, v in (suite.get("budget") or {}).items() if v is not None)
                  + " (training time excludes evaluation)"))
    lines.append(("seeds", ", ".join(str(s) for s in data["seeds"])))
    for m in suite.get("methods") or []:
        spec = m.get("config") or m.get("class_path")
        extra = {**(m.get("overrides") or {}), **(m.get("init_args") or {})}
        lines.append(("method", f"{m['name']}: {spec}" + (f" {json.dumps(extra)}" if extra else "")))
    return lines


def _markdown(data: dict[str, Any], figures: dict[str, Path], out_dir: Path) -> str:
    parts = [f"# Benchmark report: {data['suite'].get('name', out_dir.name)}", ""]
    parts += [f"- **{label}**: {text}" for label, text in _header(data)] + [""]
    if data["overview"] is not None:
        parts += ["## Overview: headline metric / data floor", "", data["overview"].markdown(), ""]
    if data["against_reference"] is not None:
        parts += [f"## Against the reference: metric / {data['reference']}'s", "",
                  data["against_reference"].markdown(), ""]
    for d in data["datasets"]:
        parts += [f"## {d}", "", data["tables"][d].markdown(), ""]
        parts += [f"Not computed: {note}", ""] if (note := "; ".join(data["skipped"][d])) else []
        if data["failures"][d]:
            parts += ["Failed or missing cells:", ""] + [f"- {f}" for f in data["failures"][d]] + [""]
    parts += [DIRECTION_NOTE, "", "## Figures", ""]
    for name, path in figures.items():
        parts += [f"### {name.replace('_', ' ')}", "", figure_caption(name), "",
                  f"![{name}]({os.path.relpath(path, out_dir)})", ""]
    return "\n".join(parts)


def _html(data: dict[str, Any], figures: dict[str, Path], out_dir: Path) -> str:
    title = f"Benchmark report: {data['suite'].get('name', out_dir.name)}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li><b>{html.escape(label)}</b>: {html.escape(text)}</li>" for label, text in _header(data)]
    parts.append("</ul>")
    if data["overview"] is not None:
        parts += ["<h2>Overview: headline metric / data floor</h2>", data["overview"].html()]
    if data["against_reference"] is not None:
        parts += [f"<h2>Against the reference: metric / {html.escape(data['reference'])}'s</h2>",
                  data["against_reference"].html()]
    for d in data["datasets"]:
        parts += [f"<h2>{html.escape(d)}</h2>", data["tables"][d].html()]
        parts += [f"<p class=note>Not computed: {html.escape(note)}</p>"] if (note := "; ".join(data["skipped"][d])) \
            else []
        if data["failures"][d]:
            parts.append("<p>Failed or missing cells:</p><ul>" + "".join(
                f"<li>{html.escape(f)}</li>" for f in data["failures"][d]) + "</ul>")
    parts += [f"<p class=note>{html.escape(DIRECTION_NOTE)}</p>", "<h2>Figures</h2>"]
    for name, path in figures.items():
        encoded = base64.b64encode(Path(path).read_bytes()).decode()
        parts += [f"<h3>{html.escape(name.replace('_', ' '))}</h3><p class=note>"
                  f"{html.escape(figure_caption(name))}</p>",
                  f"<img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, wandb: dict[str, Any] | None = None,
                 with_floor: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``figures/``; returns their paths (and the data)."""
    out_dir = Path(out_dir)
    data = collect(out_dir, with_floor=with_floor)
    figures = make_figures(out_dir, data)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, _markdown(data, figures, out_dir))
    atomic_write_text(page, _html(data, figures, out_dir))
    if wandb:
        log_summary_to_wandb(data, figures, project=wandb.get("project", "onestep"), out_dir=out_dir)
    return {"md": md, "html": page, "figures": figures, "data": data}


def log_summary_to_wandb(data: dict[str, Any], figures: dict[str, Path], project: str, out_dir: Path) -> None:
    """One W&B run (job_type ``summary``, in the suite's group) holding every table and figure."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError("the W&B summary needs wandb: pip install wandb (or pip install 'onestep[wandb]')") from err
    from onestep.callbacks.loggers import wandb_key_configured

    suite = data["suite"].get("name", out_dir.name)
    mode = os.environ.get("WANDB_MODE", "").lower()
    offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_key_configured())
    run = wandb.init(project=project, group=suite, name=f"{suite}-summary", job_type="summary",
                     dir=str(out_dir), mode="offline" if offline else "online",
                     config={"suite": data["suite"]}, tags=[suite, "summary"])
    tables: dict[str, Table] = dict(data["tables"])
    if data["overview"] is not None:
        tables["overview"] = data["overview"]
    if data["against_reference"] is not None:
        tables["against_reference"] = data["against_reference"]
    for name, table in tables.items():
        run.log({f"tables/{name}": wandb.Table(columns=table.columns, data=[[t for t, _ in row] for row in table.rows])})
    for name, path in figures.items():
        run.log({f"figures/{name}": wandb.Image(str(path), caption=figure_caption(name))})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onestep report", description="Tables and figures of a benchmark "
                                     "directory (results.jsonl written by onestep benchmark).")
    parser.add_argument("out", help="benchmark output directory")
    parser.add_argument("--no-floor", action="store_true", help="skip the data sampling floor")
    parser.add_argument("--wandb", action="store_true", help="also log tables and figures to a W&B summary run")
    parser.add_argument("--wandb_project", default="onestep")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        paths = write_report(args.out, wandb={"project": args.wandb_project} if args.wandb else None,
                             with_floor=not args.no_floor)
    except (FileNotFoundError, ImportError) as err:
        print(f"onestep report: error: {err}", file=sys.stderr)
        return 2
    print(f"onestep report: {paths['md']} and {paths['html']} ({len(paths['figures'])} figures)")
    return 0
