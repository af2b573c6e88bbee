r"""MAGT's headline claims, measured: concentration near the support when D >> d, and the intrinsic density.

Claims (abstract of arXiv:2602.19600; see ``shared/specs/magt.md``):

(a) *Concentration.* On a manifold of dimension d in R^D with D >> d, MAGT's one-step samples lie nearer
    the support than a multi-step reference: the off-manifold share (distance to the noiseless support
    > 0.1) and the mean distance of 10,000 samples, MAGT (1 NFE) against flow matching with minibatch OT
    at 100 Euler steps, both trained the same number of steps at batch 256 with the configs in
    ``configs/magt`` and ``configs/flow_matching`` (sphere64, helix64, and the helix in R^256).
    Also MAGT's W2 against the data floor (targets: <= 1.2x the floor, off-manifold share within 2x the
    data's own).
(b) *Intrinsic likelihood.* A trained model's intrinsic log-density (area formula, raw units) at its own
    samples ranks them like the true density: a von Mises density (kappa 2) on a circle of radius 2
    embedded in R^16 (noise 0.02 per axis); Spearman rank correlation between the model's log p^M(g(z))
    and the true arc-length log-density at the sample's angle, over 2,000 samples; also the mean
    absolute error of the log-density.

W2 is measured as in ``benchmarks/magt_recipe.py`` (2,000 samples vs the first 2,000 test points, floor
val vs test). ``quick`` trains fewer steps (stated in each protocol). One thread, CPU.

    .venv/bin/python benchmarks/claims_magt.py [--quick]     # writes benchmarks/results/claims_magt.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

from concurrent.futures import ProcessPoolExecutor

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.magt_recipe import score, train  # noqa: E402
from onestep.data.manifolds import EmbeddedManifold, Helix3D, Manifold  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "claims_magt.json"
OFF_THRESHOLD = 0.1


class Helix256(EmbeddedManifold):
    """The ``helix3d`` curve embedded in R^256 (noise 0.02 per axis): D / d = 256."""

    name, intrinsic_dim, ambient_dim = "helix256", 1, 256
    base_class = Helix3D


class VonMisesCircle(Manifold):
    """Circle of radius 2 in R^2 with a von Mises angle law (mean 0, concentration ``kappa``)."""

    name, ambient_dim, intrinsic_dim = "vonmises_circle", 2, 1
    default_noise_std, radius, kappa = 0.0, 2.0, 2.0

    def log_density(self, theta: torch.Tensor) -> torch.Tensor:
        """True log-density w.r.t. arc length: ``kappa cos(theta) - log(2 pi I0(kappa)) - log r``."""
        log_i0 = math.log(torch.special.i0(torch.tensor(self.kappa, dtype=torch.float64)).item())
        return self.kappa * theta.cos() - math.log(2 * math.pi) - log_i0 - math.log(self.radius)

    def sample_clean(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = torch.linspace(-math.pi, math.pi, 100_001, dtype=torch.float64)
        cdf = torch.cumsum(self.log_density(grid).exp(), 0)
        theta = grid[torch.searchsorted(cdf / cdf[-1], torch.rand(n, generator=generator, dtype=torch.float64))]
        return (self.radius * torch.stack([theta.cos(), theta.sin()], 1)).float()

    def _distance(self, x: torch.Tensor) -> torch.Tensor:
        return (x.norm(dim=1) - self.radius).abs()


class VonMisesCircle16(EmbeddedManifold):
    name, intrinsic_dim, ambient_dim = "vonmises16", 1, 16
    base_class = VonMisesCircle


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no ties expected for continuous values)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


EXTRA_MANIFOLDS = {"helix256": Helix256, "vonmises16": lambda: VonMisesCircle16(noise_std=0.02)}
CONCENTRATION_SETS = (("sphere64", "sphere64", None), ("helix64", "helix64", None), ("helix256", "helix64", "helix256"))


def _with_manifold(manifold: Manifold):
    """A datamodule patch for ``train``: ``manifold`` instead of the config's registered set."""
    def patch(dm) -> None:
        dm.manifold, dm.data_shape = manifold, (manifold.ambient_dim,)
    return patch


def _train_and_score(method: str, config_set: str, manifold_key: str | None, steps: int) -> dict:
    torch.set_num_threads(1)
    patch = _with_manifold(EXTRA_MANIFOLDS[manifold_key]()) if manifold_key else None
    model, dm, seconds = train(REPO / "configs" / method, steps, patch=patch, dataset=config_set)
    return {**score(model, dm), "train_seconds": round(seconds, 1)}


def _vonmises_numbers(steps: int) -> dict:
    """Spearman and log-density error of a MAGT trained on the von Mises circle in R^16."""
    torch.set_num_threads(1)
    manifold = EXTRA_MANIFOLDS["vonmises16"]()
    # the intrinsic density (area formula) needs the latent dimension to be the manifold's (1), whatever
    # the helix64 layer chose for sample quality (latent_dim 2 since 2026-12-06)
    model, dm, _ = train(REPO / "configs" / "magt", steps, model_overrides={"latent_dim": manifold.intrinsic_dim},
                         patch=_with_manifold(manifold), dataset="helix64")
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(7))
    with model.ema_weights():
        logp_model = model.intrinsic_log_density(z).double()
        x = model.g(z).detach()
    coords = x.double() @ manifold.frame                                      # plane of the circle
    logp_true = manifold.base.log_density(torch.atan2(coords[:, 1], coords[:, 0]))
    finite = torch.isfinite(logp_model)
    return {"spearman": round(spearman(logp_model[finite], logp_true[finite]), 4),
            "log_density_mae": round(float((logp_model[finite] - logp_true[finite]).abs().mean()), 4),
            "true_log_density_range": round(float(logp_true.max() - logp_true.min()), 3),
            "degenerate_share": round(float(1 - finite.double().mean()), 4)}


def _concentration_rows(name: str, config_set: str, registered: bool, steps: int, found: dict) -> list[dict]:
    magt, fm = found["magt"], found["flow_matching"]
    better = magt["off_frac"] <= fm["off_frac"] and magt["mean_dist"] <= fm["mean_dist"]
    either = magt["off_frac"] <= fm["off_frac"] or magt["mean_dist"] <= fm["mean_dist"]
    # a reference far from its data (W2 > 1.5x the floor) makes "nearer than flow matching" a statement
    # about the budget, not about the method: at most "partly" then
    reference_converged = fm["ratio"] <= 1.5
    caveat = "" if reference_converged else (f" Flow matching is not converged at this budget (W2 {fm['ratio']:.1f}x "
                                             "the floor), so this compares equal budgets, not the methods at their best.")
    rows = [{
        "claim": f"MAGT concentrates samples nearer the support than flow matching when D >> d ({name})",
        "protocol": f"{name}: {steps} steps, batch 256, configs/magt and configs/flow_matching ({config_set}.yaml); "
                    f"10,000 samples; off-manifold = distance > {OFF_THRESHOLD}; MAGT 1 NFE vs flow matching "
                    "(minibatch OT) 100 Euler steps",
        "numbers": {f"{m}_{k}": round(v, 4) for m, r in found.items() for k, v in r.items()},
        "verdict": ("holds" if reference_converged else "partly") if better else ("partly" if either else "does not hold"),
        "note": f"off-manifold share MAGT {magt['off_frac']:.3f} vs FM {fm['off_frac']:.3f} (data "
                f"{magt['off_frac_data']:.3f}, whose 0.02-per-axis noise alone puts it ~{magt['mean_dist_data']:.2f} "
                f"off); mean distance {magt['mean_dist']:.3f} vs {fm['mean_dist']:.3f}.{caveat}",
    }]
    if registered:  # the targets are stated for the registered sets
        w2_ok, off_ok = magt["ratio"] <= 1.2, magt["off_frac"] <= 2 * max(magt["off_frac_data"], 1e-4)
        rows.append({
            "claim": f"MAGT reaches <= 1.2x the W2 floor with an off-manifold share within 2x the data's ({name})",
            "protocol": f"{name}: {steps} steps (configs/magt/{name}.yaml); W2 of 2,000 samples vs the first "
                        "2,000 test points; floor W2(val, test); off-manifold share of 10,000 samples",
            "numbers": {k: round(magt[k], 4) for k in ("w2", "floor", "ratio", "off_frac", "off_frac_data")},
            "verdict": "holds" if w2_ok and off_ok else ("partly" if w2_ok or off_ok else "does not hold"),
            "note": f"W2 {magt['ratio']:.2f}x the floor; off-manifold share {magt['off_frac']:.4f} against "
                    f"the data's {magt['off_frac_data']:.4f}.",
        })
    return rows


def _density_row(steps: int, numbers: dict) -> dict:
    rho, mae = numbers["spearman"], numbers["log_density_mae"]
    return {
        "claim": "A trained MAGT's intrinsic log-density ranks its samples like the true density on the manifold",
        "protocol": f"von Mises (kappa 2) on a radius-2 circle in R^16, noise 0.02; MAGT latent 1 with the "
                    f"other configs/magt/helix64.yaml settings, {steps} steps; 2,000 samples: Spearman between "
                    "log p^M(g(z)) (area formula, raw units) and the true arc-length log-density at the angle",
        "numbers": numbers,
        # the rank alone is weak evidence (the prior term log N(z) already orders the samples; a flipped
        # log-det term keeps a high rank correlation), so "holds" also needs the values: error < 1 nat
        "verdict": "holds" if rho >= 0.8 and mae < 1.0 else ("partly" if rho >= 0.3 else "does not hold"),
        "note": f"Spearman {rho:.3f}, mean absolute log-density error {mae:.3f} nats on a true range of "
                f"{numbers['true_log_density_range']:.2f} nats (values, not only ranks, agree).",
    }


def measure(quick: bool = False, jobs: int = 1) -> list[dict]:
    """Every MAGT claim row (module docstring). ``quick``: 1,000 training steps per model instead of 4,000
    (3,000 for the density claim). ``jobs``: independent trainings in that many processes (one thread each)."""
    steps, density_steps = (1000, 1000) if quick else (4000, 3000)
    tasks = {(method, name): (_train_and_score, method, config_set, key, steps)
             for name, config_set, key in CONCENTRATION_SETS for method in ("magt", "flow_matching")}
    tasks["density"] = (_vonmises_numbers, density_steps)
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {k: pool.submit(*task) for k, task in tasks.items()}
            results = {k: f.result() for k, f in futures.items()}
    else:
        torch.set_num_threads(1)
        results = {k: task[0](*task[1:]) for k, task in tasks.items()}
    rows = []
    for name, config_set, key in CONCENTRATION_SETS:
        found = {m: results[(m, name)] for m in ("magt", "flow_matching")}
        rows += _concentration_rows(name, config_set, key is None, steps, found)
    return rows + [_density_row(density_steps, results["density"])]


def rows_from_record(record: dict) -> list[dict]:
    """The claim rows re-derived from a saved record's numbers (verdict and note logic only; no training)."""
    steps = 1000 if record["quick"] else 4000
    numbers = {r["claim"].rsplit("(", 1)[-1].rstrip(")"): r["numbers"] for r in record["claims"] if "than flow" in r["claim"]}
    rows = []
    for name, config_set, key in CONCENTRATION_SETS:
        found = {m: {k[len(m) + 1:]: v for k, v in numbers[name].items() if k.startswith(m + "_")}
                 for m in ("magt", "flow_matching")}
        found["magt"] = {k: v for k, v in found["magt"].items() if not k.startswith("matching")}
        rows += _concentration_rows(name, config_set, key is None, steps, found)
    density = next(r for r in record["claims"] if "intrinsic" in r["claim"])
    return rows + [_density_row(1000 if record["quick"] else 3000, density["numbers"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training steps per model")
    parser.add_argument("--jobs", type=int, default=1, help="trainings in parallel processes")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--rederive", action="store_true", help="recompute verdicts and notes of --out's numbers")
    args = parser.parse_args()
    out = Path(args.out)
    if args.rederive:
        record = json.loads(out.read_text())
        rows = record["claims"] = rows_from_record(record)
    else:
        start = time.time()
        rows = measure(quick=args.quick, jobs=args.jobs)
        record = {"quick": args.quick, "machine": "2-core shared CPU VM (heavily loaded), one thread per training",
                  "wall_seconds": round(time.time() - start), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "claims": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    for row in rows:
        print(f"[{row['verdict']}] {row['claim']}: {row['note']}")


if __name__ == "__main__":
    main()
