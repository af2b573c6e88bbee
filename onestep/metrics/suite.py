r"""The metric suite: every sample-based number of the evaluation protocol, computed in one place.

:func:`evaluate_samples` compares generated samples ``fake`` with real samples ``real`` (raw data units):

* ``w2``: exact W2 on at most ``w2_max_samples`` points per side; ``sw2``: sliced W2 (``sw_projections``);
* ``manifold_dist_{mean,median,p95}``, ``offmanifold`` (share farther than ``offmanifold_threshold``),
  when the data has a known manifold;
* ``fd_<space>``: Fréchet distance in each feature space, in the given order;
* ``precision``, ``recall``, ``density``, ``coverage`` (``prdc_k`` neighbours) in the *last* feature
  space, or in raw units when there is none.

Users: the evaluation callback (hence ``onestep evaluate``), the benchmark's data floor (two real samples)
and NFE sweep (``groups=("w2", "fd")``). Each metric is a torchmetrics ``Metric``: with ``sync=True`` (the
callback, under DDP) every rank passes its share and the states are gathered before ``compute``, so all
ranks get the numbers of one process holding everything; with ``sync=False`` the numbers are of these
samples alone, even inside a distributed run. In one process both equal the plain functions
(:func:`~onestep.metrics.wasserstein.wasserstein2` etc.) on the same samples exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from onestep.metrics.frechet import FrechetDistance
from onestep.metrics.manifold import ManifoldDistance
from onestep.metrics.prdc import PRDC
from onestep.metrics.wasserstein import SlicedWasserstein2, Wasserstein2

METRIC_GROUPS = ("w2", "sw2", "manifold", "fd", "prdc")

#: feature space name -> (extractor, features of the real samples)
FeatureSpaces = Mapping[str, tuple[Callable[[Tensor], Tensor], Tensor]]


@dataclass(frozen=True)
class MetricOptions:
    """The protocol options the metrics read (defaults: those of ``EvaluationCallback``)."""

    seed: int = 0
    w2_max_samples: int | None = 2048
    sw_projections: int = 256
    prdc_k: int = 5
    offmanifold_threshold: float = 0.1

    @classmethod
    def from_protocol(cls, protocol: Mapping[str, Any]) -> MetricOptions:
        """From a recorded protocol dict; a missing entry takes the default, except ``w2_max_samples``
        (missing or null: every sample, as the evaluation's own null)."""
        return cls(seed=int(protocol.get("seed") or 0), w2_max_samples=protocol.get("w2_max_samples"),
                   sw_projections=int(protocol.get("sw_projections") or 256),
                   prdc_k=int(protocol.get("prdc_k") or 5),
                   offmanifold_threshold=float(protocol.get("offmanifold_threshold") or 0.1))


def _two_sample(metric, fake: Tensor, real: Tensor):
    metric = metric.to(fake.device)
    metric.update(fake=fake, real=real)
    return metric.compute()


def _manifold_metrics(manifold, fake: Tensor, threshold: float, sync: bool) -> dict[str, float]:
    metric = ManifoldDistance(manifold.distance, threshold, sync_on_compute=sync).to(fake.device)
    metric.update(fake)
    stats = metric.compute()
    metrics = {f"manifold_dist_{k}": float(stats[k]) for k in ("mean", "median", "p95")}
    metrics["offmanifold"] = float(stats["offmanifold"])
    return metrics


def evaluate_samples(fake: Tensor, real: Tensor, manifold: Any | None, feature_spaces: FeatureSpaces,
                     options: MetricOptions, groups: Collection[str] = METRIC_GROUPS,
                     sync: bool = False) -> dict[str, float]:
    """The suite's metrics of ``fake`` against ``real`` (see the module docstring), in the order listed there.

    ``manifold``: an object with ``distance(x)`` (or ``None``); ``feature_spaces``: name -> (extractor,
    real features), the real features already computed (and, under DDP, this rank's share);
    ``groups``: which of :data:`METRIC_GROUPS` to compute."""
    unknown = set(groups) - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"evaluate_samples: unknown metric groups {sorted(unknown)}; use {METRIC_GROUPS}")
    sync_kw = {"sync_on_compute": sync}
    metrics: dict[str, float] = {}
    with torch.no_grad():
        if "w2" in groups:
            metrics["w2"] = float(_two_sample(Wasserstein2(options.w2_max_samples, options.seed, **sync_kw),
                                              fake, real))
        if "sw2" in groups:
            metrics["sw2"] = float(_two_sample(SlicedWasserstein2(options.sw_projections, options.seed, **sync_kw),
                                               fake, real))
        if "manifold" in groups and manifold is not None:
            metrics.update(_manifold_metrics(manifold, fake, options.offmanifold_threshold, sync))
        prdc_fake, prdc_real = fake, real
        for name, (extractor, real_features) in feature_spaces.items() if {"fd", "prdc"} & set(groups) else ():
            prdc_fake, prdc_real = extractor(fake), real_features
            if "fd" in groups:
                metrics[f"fd_{name}"] = float(_two_sample(FrechetDistance(prdc_fake.shape[1], **sync_kw),
                                                          prdc_fake, prdc_real))
        if "prdc" in groups:
            values = _two_sample(PRDC(options.prdc_k, **sync_kw), prdc_fake, prdc_real)
            metrics.update({k: float(v) for k, v in values.items()})
    return metrics
