"""MAGT configuration measurements: train one config (with overrides) on one toy set and score it.

Protocol (the issue's): train ``steps`` optimiser steps on onestep's training split (n_train 20,000,
seed 0); W2 between 2,000 samples (EMA weights) and the first 2,000 test points, in raw units; the
data floor is W2 between the first 2,000 validation and 2,000 test points; the off-manifold fraction
(distance to the noiseless support > 0.1) and the mean distance on 10,000 samples. One thread.

    .venv/bin/python benchmarks/magt_recipe.py --config configs/magt --dataset 8gaussians --steps 4000 \\
        --set standardize=none --set sigma=0.5 [--data batch_size=1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import import_object  # noqa: E402
from onestep.config_layers import load_method_config  # noqa: E402
from onestep.data import OneStepDataModule  # noqa: E402
from onestep.metrics import wasserstein2  # noqa: E402

N_W2, N_OFF = 2000, 10_000


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items or [])}


def train(config: str | Path, steps: int, model_overrides: dict[str, Any] | None = None,
          data_overrides: dict[str, Any] | None = None, seed: int = 0, patch=None, dataset: str | None = None):
    """``(model, datamodule, seconds)``: the config's model trained ``steps`` steps on its dataset (CPU).

    ``config``: a method folder (with ``dataset``: its kind's default plus the dataset's layer) or one full
    config file. ``patch(datamodule)`` may swap the datamodule's manifold before set-up (a set not in the
    registry)."""
    if Path(config).is_dir():
        cfg = load_method_config(config, dataset)
    else:
        cfg = yaml.safe_load(Path(config).read_text())
    data_args = {**cfg["data"], **(data_overrides or {})}
    L.seed_everything(seed, verbose=False)
    dm = OneStepDataModule(**data_args, seed=seed)
    if patch is not None:
        patch(dm)
    init_args = {**(cfg["model"].get("init_args") or {}), **(model_overrides or {})}
    init_args.pop("eval_projection_points", None)  # evaluation-only; not needed here
    model = import_object(cfg["model"]["class_path"])(data_shape=dm.data_shape, **init_args)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return model.eval(), dm, time.perf_counter() - start


@torch.no_grad()
def score(model, dm: OneStepDataModule) -> dict[str, float]:
    """W2 (2,000 vs the first 2,000 test points), the val-test floor, off-manifold share and distance."""
    test = dm.reference("test", N_W2)
    samples = dm.denormalize(model.sample_chunked(N_OFF, generator=torch.Generator().manual_seed(123)))
    floor = float(wasserstein2(dm.reference("val", N_W2), test, max_samples=None))
    w2 = float(wasserstein2(samples[:N_W2], test, max_samples=None))
    out = {"w2": w2, "floor": floor, "ratio": w2 / floor}
    if dm.manifold is not None:
        dist, dist_data = dm.manifold.distance(samples), dm.manifold.distance(dm.reference("test", N_OFF))
        out.update(off_frac=float((dist > 0.1).float().mean()), mean_dist=float(dist.mean()),
                   off_frac_data=float((dist_data > 0.1).float().mean()), mean_dist_data=float(dist_data.mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a method folder (with --dataset) or a config file")
    parser.add_argument("--dataset", default=None, help="the dataset of a method folder")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", help="model init_args override key=value (YAML value)")
    parser.add_argument("--data", action="append", help="data override key=value (YAML value)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_over, data_over = parse_assignments(args.set), parse_assignments(args.data)
    if Path(args.config).is_dir() and not args.dataset:
        parser.error("--config is a method folder: give --dataset too")
    model, dm, seconds = train(args.config, args.steps, model_over, data_over, args.seed, dataset=args.dataset)
    row = {"tag": args.tag, "config": args.config, "dataset": args.dataset, "steps": args.steps, "seed": args.seed, "set": model_over,
           "data": data_over, "train_seconds": round(seconds, 1), **score(model, dm)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
