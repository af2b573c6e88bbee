"""Cost of the whole evaluation protocol as the sample count grows (1k, 2k, 5k, 10k).

The timed code is ``EvaluationCallback.compute_metrics`` itself: sampling is replaced by a stub that
returns pre-computed "generated" samples (the data plus small noise, so no generator cost is included),
and the trainer by a single-process stand-in. Everything else is the real protocol: exact W2 on the
``w2_max_samples`` subsample, sliced W2, distance-to-manifold statistics (synthetic), Fréchet distance
in every default feature space (MNIST: pixels and the shipped LeNet), PRDC (k = 5) in the last space.
The real-feature cache starts empty for every size (a cold first evaluation, the worst case); a second,
warm call is timed too. The breakdown times each metric's ``compute`` and the feature extractors.

    python benchmarks/metric_cost.py [--datasets 8gaussians mnist] [--sizes 1000 2000 5000 10000]
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import types
from collections import defaultdict

import torch
from common import base_parser, print_table, save_result, setup

from onestep.callbacks import EvaluationCallback
from onestep.data import OneStepDataModule
from onestep.metrics import PRDC, FrechetDistance, ManifoldDistance, SlicedWasserstein2, Wasserstein2
from onestep.metrics.features import FeatureExtractor, PixelFeatures


class StubGenerator(torch.nn.Module):
    """Returns the given normalised samples in order, as ``sample_chunked`` would."""

    nfe = 1

    def __init__(self, samples: torch.Tensor) -> None:
        super().__init__()
        self.samples = samples

    @property
    def device(self) -> torch.device:
        return self.samples.device

    def sample_chunked(self, n: int, chunk_size: int = 4096, generator=None) -> torch.Tensor:
        return self.samples[:n]


@contextlib.contextmanager
def piece_timers(totals: dict[str, float]):
    """Accumulate the time of every metric's compute and of feature extraction into ``totals``."""
    targets = [(Wasserstein2, "compute", "w2"), (SlicedWasserstein2, "compute", "sw2"),
               (ManifoldDistance, "compute", "manifold"), (FrechetDistance, "compute", "fd"),
               (PRDC, "compute", "prdc"), (FeatureExtractor, "forward", "features"),
               (PixelFeatures, "forward", "features")]
    saved = []
    for cls, attr, label in targets:
        original = cls.__dict__.get(attr)
        if original is None:
            continue

        def timed(self, *args, _fn=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(self, *args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start
        saved.append((cls, attr, original))
        setattr(cls, attr, timed)
    try:
        yield
    finally:
        for cls, attr, original in saved:
            setattr(cls, attr, original)


def time_protocol(dataset: str, n: int, device: torch.device) -> dict:
    dm = OneStepDataModule(dataset=dataset, n_test=max(n, 2048), n_train=max(n, 2048) if dataset != "mnist" else None)
    dm.setup()
    gen = torch.Generator().manual_seed(0)
    fake = dm.train_data[:n] + 0.05 * torch.randn(dm.train_data[:n].shape, generator=gen)
    module = StubGenerator(fake.to(device))
    trainer = types.SimpleNamespace(datamodule=dm, world_size=1, global_rank=0,
                                    strategy=types.SimpleNamespace(reduce=lambda t, reduce_op=None: t))
    row = {"dataset": dataset, "n": n}
    with tempfile.TemporaryDirectory() as cache:
        callback = EvaluationCallback(every_n_steps=None, n_samples=n, w2_max_samples=2048, pictures=False,
                                      cache_dir=cache)
        for label in ("cold", "warm"):
            totals: dict[str, float] = defaultdict(float)
            with piece_timers(totals):
                start = time.perf_counter()
                metrics, _ = callback.compute_metrics(trainer, module)
                row[f"{label}_s"] = time.perf_counter() - start
            row[f"{label}_pieces"] = dict(totals)
    row["feature_spaces"] = callback._spaces
    row["metrics"] = sorted(metrics)
    return row


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "mnist"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 2000, 5000, 10000])
    args = parser.parse_args()
    device = setup(args)
    rows = []
    for dataset in args.datasets:
        for n in args.sizes:
            row = time_protocol(dataset, n, device)
            rows.append(row)
            pieces = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(row["cold_pieces"].items(), key=lambda kv: -kv[1]))
            print(f"{dataset:>12} n={n:>6}: cold {row['cold_s']:.2f}s  warm {row['warm_s']:.2f}s  [{pieces}]",
                  flush=True)
    print_table(rows, ["dataset", "n", "cold_s", "warm_s"])
    save_result("metric_cost", {"rows": rows, "w2_max_samples": 2048,
                                "target": "10,000 samples within 30 s (2-D) and 60 s (MNIST) on 2 CPU cores"},
                args.out, device)


if __name__ == "__main__":
    main()
