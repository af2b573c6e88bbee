"""LMPPM generation on toy sets: W2 against the data floor for the kernel step size and bandwidth annealing.

Deterministic mean shift seeks modes (spec #11). One model per dataset is trained with its config
(``configs/lmppm`` for the dataset, ``--steps`` optimiser steps, the stage switch at the config's fraction);
since sampling options need no retraining, every ``(alpha, anneal_h)`` pair is then scored on the same
checkpoint: W2 (exact, POT) of ``--n`` samples against the first ``--n`` test points, over the floor
W2(first ``--n`` train points, the same test points).

    python benchmarks/lmppm_generation_sweep.py [--datasets moons2d 8gaussians rings2d] [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from onestep.config_layers import load_method_config  # noqa: E402
from onestep.data import OneStepDataModule  # noqa: E402
from onestep.generators.lmppm import LMPPM  # noqa: E402
from onestep.metrics.wasserstein import wasserstein2  # noqa: E402

ALPHAS = (0.2, 0.1, 0.05, 0.02, 0.0)
ANNEALS = (1.0, 3.0, 10.0)


def sweep(dataset: str, steps: int, n: int, overrides: dict) -> dict:
    config = load_method_config(REPO / "configs" / "lmppm", dataset)
    options = {**config["model"]["init_args"], **overrides}
    dm = OneStepDataModule(dataset, batch_size=config["data"].get("batch_size", 256), seed=0)
    dm.setup()
    torch.manual_seed(0)
    model = LMPPM(data_shape=dm.data_shape, **options)
    start = time.time()
    L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
              num_sanity_val_steps=0).fit(model, datamodule=dm)
    train_s = time.time() - start
    reference = dm.denormalize(dm.test_data[:n])
    floor = wasserstein2(dm.denormalize(dm.train_data[:n]), reference, max_samples=None).item()
    cells = []
    for alpha in ALPHAS:
        for anneal in ANNEALS if alpha > 0 else (1.0,):
            model.alpha, model.anneal_h = alpha, anneal
            samples = dm.denormalize(model.sample(n, torch.Generator().manual_seed(1)))
            w2 = wasserstein2(samples, reference, max_samples=None).item()
            cells.append({"alpha": alpha, "anneal_h": anneal, "w2": round(w2, 4), "ratio": round(w2 / floor, 3)})
            print(dataset, cells[-1], flush=True)
    return {"dataset": dataset, "steps": steps, "overrides": overrides, "floor": round(floor, 4),
            "train_seconds": round(train_s, 1), "cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["moons2d", "8gaussians", "rings2d"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--distance_inputs", default=None, help="override the config's (ablation)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lmppm_generation_sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {"distance_inputs": args.distance_inputs} if args.distance_inputs else {}
    out = {"command": "python benchmarks/lmppm_generation_sweep.py " + " ".join(sys.argv[1:]),
           "machine": "2-core shared CPU VM, loaded; one thread", "rows": []}
    for dataset in args.datasets:  # written after each dataset: a stopped run keeps what it measured
        out["rows"].append(sweep(dataset, args.steps, args.n, overrides))
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
