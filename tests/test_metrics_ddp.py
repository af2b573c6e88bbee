"""Two CPU processes (gloo) each holding part of the data compute exactly the single-process metrics."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onestep.metrics import (PRDC, FrechetDistance, ManifoldDistance, SlicedWasserstein2, Wasserstein2,
                             frechet_distance, prdc, wasserstein2)

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    fake = torch.randn(301, 3, generator=g) * 1.2 + 0.3  # odd count: uneven shares across ranks
    real = torch.randn(250, 3, generator=g)
    return fake, real


def _circle_distance(x):
    return (x[:, :2].norm(dim=1) - 1).abs()


def _metrics():
    return {"w2": Wasserstein2(max_samples=200, seed=1), "sw2": SlicedWasserstein2(64, seed=2),
            "fd": FrechetDistance(3), "prdc": PRDC(k=5, chunk_size=64),
            "manifold": ManifoldDistance(_circle_distance, threshold=0.3)}


def _run(fake_parts, real_parts):
    """Update every metric with the given parts (one update per part) and compute."""
    metrics = _metrics()
    for fake, real in zip(fake_parts, real_parts):
        for name, metric in metrics.items():
            metric.update(fake) if name == "manifold" else metric.update(fake=fake, real=real)
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out.update({f"{name}/{k}": v.item() for k, v in value.items()} if isinstance(value, dict)
                   else {name: value.item()})
    return out


def _worker(rank, port, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fake, real = _data()
        results[rank] = _run([torch.tensor_split(fake, WORLD)[rank]], [torch.tensor_split(real, WORLD)[rank]])
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
        per_rank = [dict(results[r]) for r in range(WORLD)]
    fake, real = _data()
    single = _run(torch.tensor_split(fake, WORLD), torch.tensor_split(real, WORLD))
    assert per_rank[0] == per_rank[1]  # compute() on every rank, same numbers
    assert per_rank[0] == single  # bitwise: cat states in rank order, float64 sums of the same halves
    # and the same as the plain functions on all the data
    assert single["w2"] == wasserstein2(fake, real, max_samples=200, seed=1).item()
    assert single["fd"] == pytest.approx(frechet_distance(fake, real).item(), rel=1e-10)
    assert {k: single[f"prdc/{k}"] for k in ("precision", "recall", "density", "coverage")} == \
        {k: v.item() for k, v in prdc(real, fake).items()}
    assert 0 < single["prdc/precision"] < 1 and single["w2"] > 0.1
