r"""OT-NFM one-step quality against its options: endpoint weighting ``p_t1`` and the backbone.

One-step sampling uses only ``phi(z, 1)``; ``p_t1`` (spec §1.5) sets that fraction of the training times
to exactly ``t = 1``. This script trains :class:`onestep.generators.OTNFM` from
``configs/otnfm`` (for the dataset) plus a variant's overrides and scores exact W2 (raw units) between
``--n-samples`` one-step samples (seeded noise) and the first ``--n-samples`` test points, the protocol of
``benchmarks/reference_torchcfm.py`` (whose floor and torchcfm numbers it can be read against).

Run (2-core shared CPU VM, one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/otnfm_onestep.py --datasets 8gaussians moons2d \
        --variants p0 p25 --seeds 0 1

Results are merged into ``benchmarks/results/otnfm_onestep.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_torchcfm import REPO, data_reference_floor, locked_results, quiet, record_cell  # noqa: E402

from onestep.config_layers import load_method_config  # noqa: E402
from onestep.data import OneStepDataModule  # noqa: E402
from onestep.generators import OTNFM  # noqa: E402
from onestep.metrics import wasserstein2  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "otnfm_onestep.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "config": {},
    "p0": {"p_t1": 0.0},
    "p25": {"p_t1": 0.25},
    "p50": {"p_t1": 0.5},
    "independent": {"coupling": "independent", "p_t1": 0.0},
    # the spec's stribor-style invertible ResNet flow (the default backbone for vectors)
    "resnet_flow": {"backbone": {"name": "resnet_flow"}, "p_t1": 0.0},
    "resnet_flow_p25": {"backbone": {"name": "resnet_flow"}, "p_t1": 0.25},
}


def init_args(dataset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    config = load_method_config(REPO / "configs" / "otnfm", dataset)
    return {**config["model"]["init_args"], **overrides}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "moons2d"])
    parser.add_argument("--variants", nargs="+", default=["p0", "p25"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/otnfm_onestep.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    with locked_results(args.out) as results:
        results["protocol"] = {
            "data": "OneStepDataModule(dataset, seed=0) train split; W2 of n_samples one-step samples against "
                    "the first n_samples test points; floor = W2(first n_samples val points, same test points)",
            "steps": args.steps, "batch": args.batch, "n_samples": args.n_samples, "nfe": 1,
            "metric": "exact W2 (onestep.metrics.wasserstein2), raw units", "sample_seed": "1000 + seed"}
        if command not in results["commands"]:
            results["commands"].append(command)
    for dataset in args.datasets:
        dm, ref, floor = data_reference_floor(dataset, args.batch, args.n_samples)
        for variant in args.variants:
            for seed in args.seeds:
                start = time.perf_counter()
                L.seed_everything(seed, verbose=False)
                options = init_args(dataset, VARIANTS[variant])
                model = OTNFM(data_shape=dm.data_shape, **options)
                L.Trainer(max_steps=args.steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                          enable_model_summary=False, accelerator="cpu", devices=1).fit(
                    model, datamodule=OneStepDataModule(dataset, batch_size=args.batch, seed=0))
                samples = dm.denormalize(model.sample(args.n_samples, generator=torch.Generator().manual_seed(1000 + seed)))
                cell = {"dataset": dataset, "variant": variant, "seed": seed,
                        "w2": float(wasserstein2(samples, ref, max_samples=None)),
                        "seconds": round(time.perf_counter() - start, 1), "init_args": options}
                record_cell(args.out, cell, floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
