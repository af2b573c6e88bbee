"""MAGT training time per step against the number of anchors K (rings2d, batch 256).

Times full optimiser steps (forward of the K anchors, the B x K weights, backward, AdamW, EMA) through a
Lightning ``Trainer`` with nothing written to disk, after ``--warmup`` untimed steps, and fits
``time = a + b K`` by least squares. Prints a table and writes JSON with the machine description.

    .venv/bin/python benchmarks/magt_k_scaling.py [--ks 128 512 2048] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from onestep.data import OneStepDataModule
from onestep.generators.magt import MAGT
from onestep.metrics import describe_machine

RESULTS = Path(__file__).resolve().parent / "results" / "magt_k_scaling.json"


class StepTimer(Callback):
    """Wall-clock time of every training batch (forward, backward, optimiser step, EMA update)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def time_per_step(k: int, steps: int, warmup: int, batch_size: int, hidden: list[int]) -> dict:
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("rings2d", batch_size=batch_size, n_train=20000, seed=0)
    model = MAGT(data_shape=dm.data_shape, latent_dim=2, sigma=0.2, n_anchors=k,
                 backbone={"name": "mlp", "hidden": hidden})
    timer = StepTimer()
    trainer = L.Trainer(max_steps=warmup + steps, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[timer],
                        accelerator="auto", devices=1)
    trainer.fit(model, datamodule=dm)
    timed = timer.times[warmup:]
    return {"K": k, "steps": len(timed), "median_ms": 1e3 * statistics.median(timed),
            "mean_ms": 1e3 * statistics.fmean(timed), "p90_ms": 1e3 * sorted(timed)[int(0.9 * len(timed))]}


def linear_fit(ks: list[int], ms: list[float]) -> dict:
    """Least squares ``ms = a + b K`` and the largest relative deviation of a point from the line."""
    n, mean_k, mean_t = len(ks), statistics.fmean(ks), statistics.fmean(ms)
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ms)) / sum((k - mean_k) ** 2 for k in ks)
    intercept = mean_t - slope * mean_k
    deviation = max(abs(t - (intercept + slope * k)) / t for k, t in zip(ks, ms)) if n > 2 else 0.0
    return {"intercept_ms": intercept, "ms_per_anchor": slope, "max_relative_deviation": deviation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text saved with the result (e.g. machine load)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [time_per_step(k, args.steps, args.warmup, args.batch_size, args.hidden) for k in args.ks]
    fit = linear_fit([r["K"] for r in rows], [r["median_ms"] for r in rows])
    print(f"{'K':>6} {'median ms/step':>15} {'mean':>8} {'p90':>8} {'ms/step/K':>10}")
    for r in rows:
        print(f"{r['K']:>6} {r['median_ms']:>15.2f} {r['mean_ms']:>8.2f} {r['p90_ms']:>8.2f} "
              f"{r['median_ms'] / r['K']:>10.4f}")
    print(f"fit: {fit['intercept_ms']:.2f} ms + {fit['ms_per_anchor'] * 1e3:.2f} us x K; "
          f"largest relative deviation from the line {100 * fit['max_relative_deviation']:.1f}%")
    result = {"benchmark": "magt_k_scaling", "dataset": "rings2d", "batch_size": args.batch_size,
              "hidden": args.hidden, "latent_dim": 2, "rows": rows, "linear_fit": fit,
              "machine": describe_machine("cuda" if torch.cuda.is_available() else "cpu"),
              "note": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
