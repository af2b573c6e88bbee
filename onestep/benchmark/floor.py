r"""The data's own sampling floor: the metric suite between two independent *real* samples.

A generator that reproduced the data distribution exactly would still score ``W2 > 0``: its ``n`` samples
and the ``n`` reference samples are two finite draws. The floor puts a number on that:

.. math::  \mathrm{floor}(m) = m\big(\{x_i\}_{i \le n} \subset \text{train},\; \{y_j\}_{j \le n} \subset
           \text{reference split}\big),

computed by the evaluation's own :func:`~onestep.metrics.suite.evaluate_samples` with exactly the cell's
protocol (``n_samples``, reference split, ``w2_max_samples``, seed, feature spaces, PRDC ``k``, SW
projections, off-manifold threshold). The train and reference splits are
disjoint draws (synthetic sets: independent seeds per split; images: the train and test files). When the
training set is smaller than ``n`` all of it is used (the floor then records the size). A method is
"at the floor" when its W2 ratio ``W2 / floor`` is close to 1.

The floor is itself a random number (at ``n = 256`` in 2-D the W2 of two draws varies by +-25%), so for
synthetic sets it is the mean over up to ``SYNTHETIC_REPEATS`` disjoint train chunks
``train[k n : (k + 1) n]`` against the same reference sample (the reference the methods face), and the
spread is kept as ``<metric>_std``. Image floors use one chunk (their metrics are costly and, with
thousands of samples in many dimensions, far less variable).

Floors are cached in ``<results dir>/floors.json`` under a hash of the data options and protocol.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from onestep.files import atomic_write_json
from onestep.metrics.features import get_feature_extractor
from onestep.metrics.suite import FeatureSpaces, MetricOptions, evaluate_samples

FLOOR_FILE = "floors.json"
DATA_KEYS_IRRELEVANT = ("batch_size", "num_workers")  # options that do not change the data itself
SYNTHETIC_REPEATS = 5
PROTOCOL_KEYS = ("n_samples", "reference_split", "feature_space", "w2_max_samples", "seed", "prdc_k",
                 "sw_projections", "offmanifold_threshold")


def floor_key(data_config: dict[str, Any], protocol: dict[str, Any]) -> str:
    data = {k: v for k, v in sorted(data_config.items()) if k not in DATA_KEYS_IRRELEVANT}
    proto = {k: protocol.get(k) for k in PROTOCOL_KEYS}
    return hashlib.sha256(json.dumps([data, proto], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _floor_metrics(train, reference, dm, protocol: dict[str, Any], extractors: FeatureSpaces) -> dict[str, float]:
    return evaluate_samples(train, reference, dm.manifold, extractors, MetricOptions.from_protocol(protocol))


def compute_floor(data_config: dict[str, Any], protocol: dict[str, Any]) -> dict[str, Any]:
    """``{"metrics": {...same keys as a cell's metrics, plus <key>_std...}, "n_train_sample", "repeats"}``."""
    from onestep.data import OneStepDataModule  # Lightning and the datasets: loaded only on a cache miss

    dm = OneStepDataModule(**data_config)
    dm.setup()
    n = int(protocol.get("n_samples") or 2048)
    reference = dm.reference(protocol.get("reference_split") or "test", n).float()
    spaces = protocol.get("feature_space") or []
    spaces = [spaces] if isinstance(spaces, str) else list(spaces)
    with torch.no_grad():
        extractors = {name: (ex, ex(reference)) for name in spaces for ex in [get_feature_extractor(name)]}
    repeats = 1 if dm.is_image else max(1, min(SYNTHETIC_REPEATS, len(dm.train_data) // n))
    runs = [_floor_metrics(dm.denormalize(dm.train_data[k * n:(k + 1) * n]).float(), reference, dm, protocol,
                           extractors) for k in range(repeats)]
    metrics = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
    if repeats > 1:
        metrics.update({f"{key}_std": statistics.stdev(r[key] for r in runs) for key in runs[0]})
    return {"metrics": metrics, "n_train_sample": int(min(n, len(dm.train_data))), "n_reference": int(len(reference)),
            "repeats": repeats, "dataset": dm.dataset}


def load_floors(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / FLOOR_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def floor_for(out_dir: Path, data_config: dict[str, Any], protocol: dict[str, Any],
              cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cached floor of (data, protocol), computing and saving it on a miss."""
    cache = load_floors(out_dir) if cache is None else cache
    key = floor_key(data_config, protocol)
    if key not in cache:
        cache[key] = {**compute_floor(data_config, protocol), "data_config": data_config,
                      "protocol": {k: protocol.get(k) for k in PROTOCOL_KEYS}}
        atomic_write_json(out_dir / FLOOR_FILE, cache)
    return cache[key]
