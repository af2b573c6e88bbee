"""The GPU check's parts, each in its own process with its own time limit (run it through gpu_check.sh).

Parts, in order (``--cpu``: the same on the CPU at smoke sizes):

1. ``train``: every method folder ``configs/<method>`` on mnist for ``--steps`` steps through ``onestep
   benchmark`` (one suite, one seed) with ``--trainer.precision bf16-mixed``; steps/s per method from the
   cells' own training clocks (first steps, compilation and data loading included), plus each cell's final
   FD in the LeNet-MNIST space (a smoke number at this budget, not a result).
2. ``sampling``: ``benchmarks/sampling_speed.py --datasets mnist``: each method's samples/s at its default
   NFE against flow matching at 100 Euler steps on the same backbone, timed in alternation in one process.
3. ``ddp``: ``onestep fit --trainer.strategy ddp --trainer.devices -1`` (every visible GPU) on flow matching.
4. ``metrics``: ``benchmarks/metric_cost.py`` on 10,000 MNIST samples (the whole evaluation protocol).
5. ``overhead``: ``benchmarks/train_step_cost.py --against_bare`` on the device: a ``onestep fit`` step of
   flow matching on 8gaussians (MLP 3x256, batch 256) against a bare PyTorch loop and a minimal Lightning loop.
6. ``fid``: Inception FID of the trained flow-matching cell, only where torchvision, torch-fidelity and an
   Inception weights file (``$ONESTEP_INCEPTION_WEIGHTS``) are present; otherwise skipped with the reason.

Writes ``<out>/gpu_check.json`` (atomically, after every part) and ``<out>/gpu_check.md``. The parts'
time limits add up to 570 s on a GPU (a device call may run 600 s); ``--cpu`` multiplies them by 6.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
#: every method folder with an image default: the seeds, the reference and the one-step families
METHODS = tuple(sorted(p.parent.name for p in (REPO / "configs").glob("*/image.yaml")))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#: the CPU smoke check is not held to the 8-minute goal: its parts get this many times the GPU time limits
CPU_LIMIT_FACTOR = 6


def run_part(cmd: list[str], limit_s: int, log: Path) -> dict[str, Any]:
    """Run one part; its output goes to ``log``; returns status, seconds and the last lines on failure."""
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=limit_s, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record: dict[str, Any] = {"status": "ok" if code == 0 else f"failed ({code})",
                              "seconds": round(time.perf_counter() - start, 1), "command": " ".join(cmd)}
    if code != 0:
        record["tail"] = log.read_text()[-2000:]
    return record


def suite_yaml(steps: int, cpu: bool) -> dict[str, Any]:
    methods = []
    for name in METHODS:
        entry: dict[str, Any] = {"name": name, "config": str(REPO / "configs" / name)}
        if name == "characteristic":  # the teacher stage counts in steps: half of the budget
            entry["overrides"] = {"model.init_args.teacher_steps": max(1, steps // 2)}
        methods.append(entry)
    trainer = {"trainer.accelerator": "cpu"} if cpu else {"trainer.accelerator": "gpu", "trainer.devices": 1,
                                                          "trainer.precision": "bf16-mixed"}
    return {"name": "gpu_check", "description": f"every method on MNIST, {steps} steps, GPU check",
            "methods": methods, "datasets": ["mnist"], "seeds": [0], "budget": {"max_steps": steps},
            "overrides": trainer, "data": {"batch_size": 16 if cpu else 128},
            "eval": {"n_samples": 128 if cpu else 5000, "every_n_steps": None, "final_samples": 128 if cpu else 2048}}


def train_rows(results: Path) -> list[dict[str, Any]]:
    """One row per cell: its latest record (a rerun into the same folder appends, it never duplicates rows)."""
    from onestep.benchmark.records import latest_by_cell, read_records

    rows = []
    for rec in latest_by_cell(read_records(results)).values() if results.exists() else []:
        used = rec.get("budget", {}).get("used", {})
        final = rec.get("final") or rec.get("metrics") or {}
        fd = {k: v for k, v in final.items() if k.startswith("fd")} if isinstance(final, dict) else {}
        rows.append({"method": rec.get("method"), "status": rec.get("status"), "steps": used.get("steps"),
                     "train_seconds": used.get("seconds"),
                     "steps_per_s": (used["steps"] / used["seconds"]) if used.get("seconds") else None, **fd})
    return rows


def fid_part(out: Path, cpu: bool, limit_s: int) -> dict[str, Any]:
    weights = os.environ.get("ONESTEP_INCEPTION_WEIGHTS", "")
    missing = [m for m in ("torchvision", "torch_fidelity") if importlib.util.find_spec(m) is None]
    if missing or not weights or not Path(weights).is_file():
        why = f"missing {', '.join(missing)}" if missing else "no Inception weights file ($ONESTEP_INCEPTION_WEIGHTS)"
        return {"status": f"skipped: {why}"}
    ckpts = sorted((out / "train" / "runs").glob("flow_matching-mnist-s0/**/last.ckpt"))
    if not ckpts:
        return {"status": "skipped: the train part left no flow-matching checkpoint"}
    cmd = ["onestep", "evaluate", "--ckpt_path", str(ckpts[-1]), "--eval.feature_space", "inception",
           "--eval.feature_weights_path", weights, "--eval.n_samples", "1000" if cpu else "10000"]
    return run_part(cmd, limit_s, out / "fid.log")


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {report['date']}", "", f"Device: {env['device']}; torch {env['torch']}; "
             f"precision {report['precision']}; {report['steps']} steps per method.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {p.get('status')} | {p.get('seconds', '')} |" for name, p in report["parts"].items()]
    rows = report["parts"].get("train", {}).get("rows", [])
    if rows:
        keys = sorted({k for r in rows for k in r} - {"method", "status"})
        lines += ["", "| method | status | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for r in rows:
            cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            lines.append(f"| {r['method']} | {r['status']} | " + " | ".join(cells) + " |")
    speed = report["parts"].get("sampling", {}).get("rows", [])
    if speed:
        lines += ["", "| method | NFE | samples/s | FM-100 samples/s | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r.get('nfe')} | {r.get('samples_per_s', 0):,.0f} | "
                  f"{r.get('fm100_samples_per_s', 0):,.0f} | {r.get('ratio_vs_fm100', 0):.1f}x |"
                  for r in speed if "error" not in r]
    overhead = report["parts"].get("overhead", {}).get("result")
    if overhead:
        ms = overhead["ms_per_step"]
        lines += ["", f"Per-step cost, flow matching on 8gaussians (MLP 3x256, batch 256, {overhead['steps']} steps): "
                  f"onestep {ms['onestep']:.2f} ms, minimal Lightning {ms['lightning']:.2f} ms, bare loop "
                  f"{ms['bare']:.2f} ms; onestep / bare {overhead['onestep_over_bare']:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu_check")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: error: no CUDA device is visible; run with --cpu for the smoke check")
    steps = args.steps or (4 if cpu else 300)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cpu else "cuda"
    scale = CPU_LIMIT_FACTOR if cpu else 1
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "steps": steps, "precision": "32" if cpu else "bf16-mixed",
        "environment": {"device": "cpu" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
                        "gpus": 0 if cpu else torch.cuda.device_count(), "python": sys.version.split()[0]},
        "parts": {}}

    def save() -> None:
        write_atomic(out / "gpu_check.json", json.dumps(report, indent=1, default=str))
        write_atomic(out / "gpu_check.md", markdown(report))

    suite = out / "gpu_check_suite.yaml"
    write_atomic(suite, yaml.safe_dump(suite_yaml(steps, cpu), sort_keys=False))
    part = run_part(["onestep", "benchmark", "--suite", str(suite), "--out", str(out / "train"), "--no-report"],
                    270 * scale, out / "train.log")
    report["parts"]["train"] = {**part, "rows": train_rows(out / "train" / "results.jsonl")}
    save()

    # on the CPU the smoke sizes keep nine methods' FM-100 comparisons (a UNet-32, 100 calls each) within the
    # limit: at 16 images and 10 set-up steps per method the part ran past 480 s on the 2-core VM
    n = "4" if cpu else "1024"
    part = run_part([sys.executable, "benchmarks/sampling_speed.py", "--datasets", "mnist", "--device", device,
                     "--n", n, "--repeats", "1" if cpu else "5", "--train_steps", "2" if cpu else "10",
                     "--out", str(out / "sampling_speed.json")],
                    80 * scale, out / "sampling.log")
    speed_file = out / "sampling_speed.json"
    report["parts"]["sampling"] = {**part, "rows": json.loads(speed_file.read_text())["rows"]
                                   if speed_file.exists() else []}
    save()

    ddp = ["onestep", "fit", "--config", "configs/flow_matching", "--data.dataset", "mnist",
           "--trainer.strategy", "ddp",
           "--trainer.max_steps", str(steps), "--eval.every_n_steps", "null",
           "--eval.n_samples", "128" if cpu else "2000", "--data.batch_size", "16" if cpu else "128",
           "--out_dir", str(out / "ddp"), "--run_name", "ddp", "--trainer.enable_progress_bar", "false"]
    ddp += (["--trainer.accelerator", "cpu", "--trainer.devices", "1"] if cpu else
            ["--trainer.accelerator", "gpu", "--trainer.devices", "-1", "--trainer.precision", "bf16-mixed"])
    report["parts"]["ddp"] = run_part(ddp, 60 * scale, out / "ddp.log")
    save()

    sizes = ["256"] if cpu else ["10000"]
    part = run_part([sys.executable, "benchmarks/metric_cost.py", "--datasets", "mnist", "--sizes", *sizes,
                     "--device", device, "--out", str(out / "metric_cost.json")], 60 * scale, out / "metrics.log")
    report["parts"]["metrics"] = part
    save()

    overhead_file = out / "train_step_overhead.json"
    part = run_part([sys.executable, "benchmarks/train_step_cost.py", "--against_bare", "--device", device,
                     "--threads", "1", "--steps", "300" if cpu else "2000", "--repeats", "1",
                     "--out", str(overhead_file)], 50 * scale, out / "overhead.log")
    report["parts"]["overhead"] = {**part, **({"result": {k: v for k, v in json.loads(overhead_file.read_text()).items()
                                                          if k in ("ms_per_step", "onestep_over_bare",
                                                                   "lightning_over_bare", "steps")}}
                                              if overhead_file.exists() else {})}
    save()

    report["parts"]["fid"] = fid_part(out, cpu, 50 * scale)
    save()
    print((out / "gpu_check.md").read_text())
    failed = [name for name, p in report["parts"].items() if str(p.get("status", "")).startswith("failed")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
