r"""onestep's flow-matching reference against torchcfm's OT-CFM: same data, budget, network and W2 protocol.

Both sides train on the data module's *training split* (``OneStepDataModule(dataset, seed=0)``, 20,000
points), for ``--steps`` optimiser steps at batch ``--batch``, with an MLP of three hidden layers of 256
SiLU units, and are scored by exact W2 (:func:`onestep.metrics.wasserstein2`, raw units) between
``--n-samples`` generated points (100 Euler steps from seeded N(0, I) noise) and the first
``--n-samples`` points of the test split. The data floor is the same W2 between the first
``--n-samples`` points of the validation split and the same test points.

* ``torchcfm``: torchcfm's ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)`` (exact OT plan of
  the batch, pairs *re-sampled* from the plan), ``v(x, t) = MLP([x, t])`` with the raw time concatenated,
  ``torch.optim.Adam(lr=1e-3)``, no EMA, no clipping: the recipe of torchcfm's 2-D examples.
* ``onestep`` variants: :class:`onestep.generators.FlowMatching` built from
  ``configs/flow_matching`` for the dataset (plus the variant's overrides) and trained by a Lightning
  ``Trainer`` exactly as ``onestep fit`` trains it (EMA, clipping, pairing prefetch, AdamW, schedule).

torchcfm is an optional, benchmark-only dependency (``pip install --no-deps torchcfm``; it needs POT,
which onestep already requires); the package and the tests never import it.

Run (2-core shared CPU VM, one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_torchcfm.py --datasets moons2d 8gaussians \
        --seeds 0 1 2 --variants torchcfm config ...

Results are merged into ``benchmarks/results/reference_torchcfm.json`` (one entry per dataset, variant
and seed; rerunning a cell overwrites it), with the protocol and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from onestep.config_layers import load_method_config  # noqa: E402
from onestep.data import OneStepDataModule  # noqa: E402
from onestep.generators import FlowMatching  # noqa: E402
from onestep.metrics import wasserstein2  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "reference_torchcfm.json"
HIDDEN = [256, 256, 256]
SHIPPED = {"time_embedding": "sinusoidal", "time_dim": 64}  # the MLP's time input before this benchmark

# onestep variants: overrides of the config's init_args (``backbone`` keys are merged into the config's)
VARIANTS: dict[str, dict[str, Any]] = {
    "config": {},                                  # the config as shipped now
    "before": {"backbone": SHIPPED, "ema_decay": 0.999, "grad_clip": 1.0},  # the config before this fix
    "before_no_ema": {"backbone": SHIPPED, "ema_decay": 0.0, "grad_clip": 1.0},
    "before_no_clip": {"backbone": SHIPPED, "ema_decay": 0.999, "grad_clip": 0.0},
    "before_no_prefetch": {"backbone": SHIPPED, "ema_decay": 0.999, "grad_clip": 1.0, "prefetch_pairing": False},
    "raw_t": {"backbone": {"time_embedding": "raw"}, "ema_decay": 0.999, "grad_clip": 1.0},
    "raw_t_no_ema": {"backbone": {"time_embedding": "raw"}, "ema_decay": 0.0, "grad_clip": 1.0},
    "raw_t_no_ema_no_clip": {"backbone": {"time_embedding": "raw"}, "ema_decay": 0.0, "grad_clip": 0.0},
    "raw_t_ema99": {"backbone": {"time_embedding": "raw"}, "ema_decay": 0.99, "grad_clip": 1.0},
    "sin8_no_ema_no_clip": {"backbone": {"time_embedding": "sinusoidal", "time_dim": 8}, "ema_decay": 0.0,
                            "grad_clip": 0.0},
    "sin64_s1_no_ema": {"backbone": {"time_embedding": "sinusoidal", "time_dim": 64, "time_scale": 1.0},
                        "ema_decay": 0.0, "grad_clip": 1.0},
    "sin64_no_ema_no_clip": {"backbone": SHIPPED, "ema_decay": 0.0, "grad_clip": 0.0},
}


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def config_of(dataset: str) -> dict[str, Any]:
    return load_method_config(REPO / "configs" / "flow_matching", dataset)


def euler(velocity, z: torch.Tensor, steps: int) -> torch.Tensor:
    """``dx/dt = v(x, t)`` from 0 to 1 with ``steps`` Euler steps (the same grid as FlowMatching)."""
    times = torch.linspace(0.0, 1.0, steps + 1)
    x = z
    for a, b in zip(times[:-1], times[1:]):
        x = x + (b - a) * velocity(x, a)
    return x


# ---------------------------------------------------------------------- torchcfm's OT-CFM
def train_torchcfm(train: torch.Tensor, seed: int, steps: int, batch: int, lr: float) -> nn.Module:
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm draws the pairs from the plan with np.random.choice
    dim = train.shape[1]
    widths = [dim + 1, *HIDDEN]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    net = nn.Sequential(*layers, nn.Linear(widths[-1], dim))
    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(train), generator=order), 0
    for _ in range(steps):
        if pos + batch > len(train):  # a fresh shuffle per epoch, incomplete batches dropped
            perm, pos = torch.randperm(len(train), generator=order), 0
        x1 = train[perm[pos:pos + batch]]
        pos += batch
        x0 = torch.randn_like(x1)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = net(torch.cat([xt, t[:, None]], dim=-1))
        loss = (vt - ut).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def sample_torchcfm(net: nn.Module, n: int, sample_seed: int, nfe: int) -> torch.Tensor:
    z = torch.randn(n, net[-1].out_features, generator=torch.Generator().manual_seed(sample_seed))
    with torch.no_grad():
        return euler(lambda x, t: net(torch.cat([x, t.expand(len(x), 1)], dim=-1)), z, nfe)


# ---------------------------------------------------------------------- onestep's FlowMatching
def onestep_init_args(dataset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    args = dict(config_of(dataset)["model"]["init_args"])
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if key == "backbone" else value
    args["backbone"] = {**args["backbone"], "hidden": HIDDEN}
    return args


def train_onestep(dataset: str, seed: int, steps: int, batch: int, overrides: dict[str, Any]) -> FlowMatching:
    L.seed_everything(seed, verbose=False)
    dm = OneStepDataModule(dataset, batch_size=batch, seed=0)
    model = FlowMatching(data_shape=dm.data_shape, **onestep_init_args(dataset, overrides))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return model


# ---------------------------------------------------------------------- driver
def run_cell(dataset: str, variant: str, seed: int, args: argparse.Namespace, dm: OneStepDataModule,
             ref: torch.Tensor) -> dict[str, Any]:
    start = time.perf_counter()
    if variant == "torchcfm":
        net = train_torchcfm(dm.train_data, seed, args.steps, args.batch, args.lr)
        samples = sample_torchcfm(net, args.n_samples, 1000 + seed, args.nfe)
    else:
        model = train_onestep(dataset, seed, args.steps, args.batch, VARIANTS[variant])
        model.steps = args.nfe
        samples = dm.denormalize(model.sample(args.n_samples, generator=torch.Generator().manual_seed(1000 + seed)))
    w2 = float(wasserstein2(samples, ref, max_samples=None))
    record = {"dataset": dataset, "variant": variant, "seed": seed, "w2": w2,
              "seconds": round(time.perf_counter() - start, 1)}
    if variant != "torchcfm":
        record["init_args"] = onestep_init_args(dataset, VARIANTS[variant])
    return record


@contextlib.contextmanager
def locked_results(path: Path):
    """Read-modify-write of the results file under an exclusive lock (several runs may share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        results.setdefault("cells", [])
        results.setdefault("floors", {})
        results.setdefault("commands", [])
        yield results
        path.write_text(json.dumps(results, indent=1) + "\n")


def summarise(cells: list[dict[str, Any]], floors: dict[str, float]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for cell in cells:
        table.setdefault(cell["dataset"], {}).setdefault(cell["variant"], []).append(cell["w2"])
    out: dict[str, Any] = {}
    for dataset, variants in table.items():
        ref = variants.get("torchcfm")
        ref_mean = statistics.fmean(ref) if ref else None
        out[dataset] = {"floor": floors.get(dataset)}
        for variant, w2s in sorted(variants.items()):
            entry = {"n": len(w2s), "mean": statistics.fmean(w2s),
                     "std": statistics.stdev(w2s) if len(w2s) > 1 else 0.0}
            if ref_mean:
                entry["ratio_to_torchcfm"] = entry["mean"] / ref_mean
            out[dataset][variant] = entry
    return out


def data_reference_floor(dataset: str, batch: int, n_samples: int):
    """The data module (onestep's own splits, seed 0), the first ``n_samples`` test points (raw units) and
    the data floor: exact W2 between as many validation points and those test points."""
    dm = OneStepDataModule(dataset, batch_size=batch, seed=0)
    dm.setup()
    ref = dm.reference("test", n_samples)
    return dm, ref, float(wasserstein2(dm.reference("val", n_samples), ref, max_samples=None))



def record_cell(out: Path, cell: dict[str, Any], floor: float) -> dict[str, Any]:
    """Print ``cell``, then replace its earlier record (same dataset, variant, seed) in ``out`` under the lock."""
    print(json.dumps({k: v for k, v in cell.items() if k != "init_args"}), flush=True)
    key = (cell["dataset"], cell["variant"], cell["seed"])
    with locked_results(out) as results:
        results["floors"][cell["dataset"]] = floor
        results["cells"] = [c for c in results["cells"] if (c["dataset"], c["variant"], c["seed"]) != key]
        results["cells"].append(cell)
        results["summary"] = summarise(results["cells"], results["floors"])
    return results

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["moons2d", "8gaussians"])
    parser.add_argument("--variants", nargs="+", default=["torchcfm", "config"],
                        help=f"torchcfm and/or onestep variants: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="torchcfm's Adam learning rate")
    parser.add_argument("--nfe", type=int, default=100, help="Euler steps of both samplers")
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant != "torchcfm" and variant not in VARIANTS:
            parser.error(f"--variants: unknown variant {variant!r}; choose torchcfm or one of {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    quiet()

    protocol = {
        "data": "OneStepDataModule(dataset, seed=0): train split (20,000 points) for training; W2 against "
                "the first n_samples test points; floor = W2(first n_samples val points, same test points)",
        "steps": args.steps, "batch": args.batch, "network": f"MLP {HIDDEN} SiLU", "nfe": args.nfe,
        "sampler": "Euler", "n_samples": args.n_samples, "metric": "exact W2 (onestep.metrics.wasserstein2), raw units",
        "sample_seed": "1000 + seed", "torchcfm": "ExactOptimalTransportConditionalFlowMatcher(sigma=0), "
        f"Adam lr={args.lr}, raw t concatenated, no EMA, no clipping", "threads": args.threads,
    }
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_torchcfm.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    with locked_results(args.out) as results:
        results["protocol"] = protocol
        if command not in results["commands"]:
            results["commands"].append(command)
    for dataset in args.datasets:
        dm, ref, floor = data_reference_floor(dataset, args.batch, args.n_samples)
        for variant in args.variants:
            for seed in args.seeds:
                cell = run_cell(dataset, variant, seed, args, dm, ref)
                results = record_cell(args.out, cell, floor)
    for dataset, entry in results["summary"].items():
        for variant, stats in entry.items():
            if variant != "floor":
                ratio = stats.get("ratio_to_torchcfm")
                print(f"{dataset:12s} {variant:24s} W2 {stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n']})"
                      + (f"  x{ratio:.3f} torchcfm" if ratio else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
