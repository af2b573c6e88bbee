"""Sampling throughput and a description of the machine that measured it.

Every sampling time in onestep (the evaluation's ``samples_per_s``, the NFE sweep, the final samples, this
module's benchmark) is read by :func:`timed`: CUDA work is asynchronous, so the device is synchronised
before the clock starts and again before it is read, else the time would be that of queueing the kernels.
:func:`measure_sampling_speed`: ``samples_per_s = n / median(t_1..t_repeats)`` after ``warmup`` untimed
calls. The number of network evaluations per sample (NFE) is a property of the model (``pl_module.nfe``),
not measured here.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, TypeVar

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


T = TypeVar("T")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work: a CUDA device, or (``None``) every CUDA device when there is one."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str | None,
          clock: Callable[[], float] | None = None) -> tuple[T, float]:
    """``(fn(), seconds)``, the device synchronised before starting and before reading the clock
    (``clock``: default ``time.perf_counter``; a caller may pass its own, e.g. a test's fake clock)."""
    clock = clock or time.perf_counter
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    return result, clock() - start


def measure_sampling_speed(sample_fn: Callable[[int], Any], n: int, warmup: int = 1, repeats: int = 3,
                           device: torch.device | str | None = None) -> dict[str, Any]:
    """Time ``sample_fn(n)``: ``{"samples_per_s", "seconds", "seconds_all", "n", "machine"}``."""
    if n < 1 or repeats < 1:
        raise ValueError("measure_sampling_speed needs n >= 1 and repeats >= 1")
    device = torch.device(device) if device is not None else None
    with torch.no_grad():
        for _ in range(warmup):
            sample_fn(n)
        times = [timed(lambda: sample_fn(n), device)[1] for _ in range(repeats)]
    seconds = statistics.median(times)
    return {"samples_per_s": n / max(seconds, 1e-12), "seconds": seconds, "seconds_all": times, "n": n,
            "machine": describe_machine(device)}
