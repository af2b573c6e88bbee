"""Where LMPPM's toy-set error comes from: its generation pipeline taken apart on trained checkpoints.

LMPPM generates by drawing ``z0 ~ N(mean, diag(std^2))`` of the bank of training codes, running K steps of
projection (learned distance D) and kernel mean shift, and decoding once. In the toy suite it is 2.3-4.7x
the data floor on the 2-D sets while the other methods are within 1.5x. This script scores, on the suite's
own checkpoints (no training), W2 of 2,000 samples against the first 2,000 test points for each stage:

- ``bank_decoded``: G(z_i) for 2,000 bank codes, the autoencoder's reconstruction (what the decoder can do);
- ``kde_decoded``: G(z_i + h eps), the bank's kernel density at its own bandwidth h, decoded;
- ``kde_start``: the same start, then the K-step flow (projection + mean shift), decoded;
- ``gaussian_decoded``: G(z0), the Gaussian start decoded without a flow;
- ``projection_only``: the Gaussian start, K projection steps (alpha 0), decoded;
- ``lmppm``: the shipped sampler (Gaussian start, K projection + mean-shift steps); it must reproduce the
  suite's recorded W2 (a warning says when it does not: another checkpoint or protocol).

If ``lmppm`` sits near ``projection_only`` and far above ``kde_*`` and ``bank_decoded``, the error is the
start distribution: projecting a Gaussian onto the code manifold puts mass where the projection sends it,
not where the data has it, and K mean-shift steps at alpha 0.1 cannot redistribute it.

    python benchmarks/lmppm_start.py --runs DIR [--datasets 8gaussians moons2d rings2d] [--seeds 0 1 2]

``DIR`` is a ``onestep benchmark`` output folder of the toy suite (its ``runs/lmppm-<set>-s<seed>``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from onestep.benchmark.records import machine_info, read_records  # noqa: E402
from onestep.checkpoints import load_checkpoint, read_identity  # noqa: E402
from onestep.evaluate import load_datamodule, load_model, run_config  # noqa: E402
from onestep.metrics.wasserstein import wasserstein2  # noqa: E402
from onestep.modules import eval_mode  # noqa: E402

VARIANTS = ("bank_decoded", "kde_decoded", "kde_start", "gaussian_decoded", "projection_only", "lmppm")


@torch.no_grad()
def variant_samples(model, variant: str, n: int, seed: int) -> torch.Tensor:
    """``n`` samples (normalised space) of one stage of the pipeline, EMA weights, fixed noise."""
    if variant == "lmppm":
        return model.sample_chunked(n, chunk_size=n, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model), model.ema_weights():
        model._ensure_bank()
        bank, h = model.bank, float(model.bank_bandwidth)
        picks = torch.randint(len(bank), (n,), generator=gen)
        noise = torch.randn(n, bank.shape[1], generator=gen)
        if variant == "bank_decoded":
            z = bank[picks]
        elif variant in ("kde_decoded", "kde_start"):
            z = bank[picks] + h * noise
        else:
            z = model.bank_mean + model.bank_std * noise
        if variant == "kde_start":
            z = model.flow(z, model.steps, model.alpha, anneal_h=model.anneal_h)
        elif variant == "projection_only":
            z = model.flow(z, model.steps, 0.0)
        return model.decode(z)


def score(run_dir: Path, n: int) -> dict[str, float]:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    identity, checkpoint = read_identity(ckpt), load_checkpoint(ckpt)
    config = run_config(ckpt)
    model = load_model(identity, checkpoint, config, "cpu")
    dm = load_datamodule(identity, config, None)
    reference = dm.denormalize(dm.test_data[:n])
    out = {}
    for variant in VARIANTS:
        samples = dm.denormalize(variant_samples(model, variant, n, seed=0))
        out[variant] = wasserstein2(samples, reference, max_samples=n, seed=0).item()
    out["floor"] = wasserstein2(dm.denormalize(dm.train_data[:n]), reference, max_samples=n, seed=0).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="a onestep benchmark output folder of the toy suite")
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "moons2d", "rings2d"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lmppm_start.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    suite_w2 = {(r["dataset"], r["seed"]): r["metrics"]["w2"] for r in read_records(runs / "results.jsonl")
                if r.get("method") == "lmppm" and r.get("status") == "ok"}
    rows = []
    for dataset in args.datasets:
        cells = []
        for seed in args.seeds:
            versions = sorted((runs / "runs" / f"lmppm-{dataset}-s{seed}").glob("version_*"))
            if not versions:
                raise SystemExit(f"lmppm_start: no run of lmppm-{dataset}-s{seed} under {runs / 'runs'}")
            cell = {"seed": seed, **score(versions[-1], args.n), "suite_w2": suite_w2.get((dataset, seed))}
            if cell["suite_w2"] is not None and abs(cell["lmppm"] - cell["suite_w2"]) > 1e-3 * cell["suite_w2"]:
                print(f"lmppm_start: warning: lmppm-{dataset}-s{seed}: the shipped sampler gives W2 "
                      f"{cell['lmppm']:.4f} here but {cell['suite_w2']:.4f} in the suite's record; the checkpoint or "
                      "the protocol differs from the suite's, so the stages below are not the suite's", flush=True)
            cells.append(cell)
            print(dataset, {k: round(v, 4) if isinstance(v, float) else v for k, v in cell.items()}, flush=True)
        floor = statistics.mean(c["floor"] for c in cells)
        mean = {v: statistics.mean(c[v] for c in cells) for v in VARIANTS}
        rows.append({"dataset": dataset, "floor": floor, "mean_w2": mean,
                     "ratio": {v: mean[v] / floor for v in VARIANTS}, "cells": cells})
    payload = {"command": "python benchmarks/lmppm_start.py " + " ".join(sys.argv[1:]), "n": args.n,
               "protocol": f"exact W2, {args.n} samples (seed 0) vs the first {args.n} test points, raw units; "
                           "floor: the first train points vs the same", "machine": machine_info(), "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"{'dataset':<12}" + "".join(f"{v:>18}" for v in VARIANTS))
    for row in rows:
        print(f"{row['dataset']:<12}" + "".join(f"{row['ratio'][v]:>17.2f}x" for v in VARIANTS))


if __name__ == "__main__":
    main()
