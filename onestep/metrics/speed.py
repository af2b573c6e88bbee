"""Sampling throughput and a description of the machine that measured it.

``samples_per_s = n / median(t_1..t_repeats)`` after ``warmup`` untimed calls (CUDA synchronised before
and after each timed call). The number of network evaluations per sample (NFE) is a property of the
model (``pl_module.nfe``), not measured here.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


def describe_machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """Processor, CPU count, torch threads and version, and the CUDA device name when one is used."""
    info: dict[str, Any] = {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        info["cuda_device"] = torch.cuda.get_device_name(device if device is not None else 0)
    return info


def _sync(device: torch.device | None) -> None:
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)


def measure_sampling_speed(sample_fn: Callable[[int], Any], n: int, warmup: int = 1, repeats: int = 3,
                           device: torch.device | str | None = None) -> dict[str, Any]:
    """Time ``sample_fn(n)``: ``{"samples_per_s", "seconds", "seconds_all", "n", "machine"}``."""
    if n < 1 or repeats < 1:
        raise ValueError("measure_sampling_speed needs n >= 1 and repeats >= 1")
    device = torch.device(device) if device is not None else None
    with torch.no_grad():
        for _ in range(warmup):
            sample_fn(n)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            sample_fn(n)
            _sync(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"samples_per_s": n / max(seconds, 1e-12), "seconds": seconds, "seconds_all": times, "n": n,
            "machine": describe_machine(device)}
