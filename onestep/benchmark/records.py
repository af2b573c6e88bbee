"""``results.jsonl``: one JSON line per finished cell, appended atomically; plus the machine and versions.

Atomicity, for writers in several processes and on several hosts (cluster jobs on a shared filesystem):
a record is serialised first, then written while holding an exclusive POSIX record lock
(``fcntl.lockf``) on ``results.jsonl.lock``, through a file descriptor opened with ``O_APPEND``, and
``fsync``-ed before the lock is released. ``O_APPEND`` alone keeps concurrent writes whole on a local
filesystem, but an NFS client appends at the end *it* last saw, so two hosts can overwrite each other;
the lock serialises the writers (NFS implements these locks across hosts, and a client revalidates the
file's size when it takes one and flushes its writes before releasing it). A process killed mid-suite
therefore leaves only complete lines, except in the (theoretical) case of a kill inside that one write;
the reader ignores such a torn last line, and the next append starts on a fresh line so the fragment
never corrupts the record after it. The lock dies with its process, so a killed writer never leaves a
stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from onestep.benchmark.staleness import NOT_COMPARED

RESULTS_FILE = "results.jsonl"
LOCK_WAIT_SECONDS = 600.0  # an append waits this long for another writer before giving up loudly
LOCK_POLL_SECONDS = 0.01
PACKAGES = ("torch", "lightning", "onestep", "numpy", "POT", "torchmetrics", "scipy", "jsonargparse")


def jsonable(value: Any) -> Any:
    """Plain JSON types: tensors and numpy scalars to numbers, non-finite floats to ``None``, paths to str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
        return jsonable(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


@contextlib.contextmanager
def results_lock(path: str | os.PathLike, wait_seconds: float = LOCK_WAIT_SECONDS):
    """Hold the exclusive lock of results file ``path`` (the lock file ``<path>.lock`` next to it).

    POSIX record locks belong to a process: threads of one process do not exclude each other (the
    benchmark appends from one thread per process)."""
    lock_path = Path(f"{path}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{lock_path} is still locked by another process after {wait_seconds:.0f} s; "
                                       "is a writer hung on the filesystem? The record was not written") from None
                time.sleep(LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock


def append_record(path: str | os.PathLike, record: dict[str, Any], wait_seconds: float = LOCK_WAIT_SECONDS) -> None:
    """Append ``record`` as one line, under the results lock, with ``O_APPEND`` + ``fsync`` (see the module
    docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(jsonable(record), sort_keys=True, allow_nan=False) + "\n").encode()
    with results_lock(path, wait_seconds):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a torn fragment from a killed writer must not swallow this record
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            view = memoryview(data)
            while view:  # a short write (a signal, a full quota) is continued; the lock keeps the line whole
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a results file; a torn or corrupt line is skipped (with a warning
    unless it is the unterminated last line, which is what a killed writer leaves)."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last_unterminated = i == len(lines) - 1 and not raw.endswith(b"\n")
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if not last_unterminated:
                warnings.warn(f"{path}: line {i + 1} is not valid JSON and was skipped")
            continue
        if last_unterminated or not isinstance(record, dict):
            continue  # an unterminated line is by definition not a finished write
        records.append(record)
    return records


def latest_by_cell(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The last record of every (method, dataset, seed); a later success replaces an earlier failure."""
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for record in records:
        key = (record.get("method"), record.get("dataset"), record.get("seed"))
        if None in key:
            continue
        if record.get("status") != "ok" and latest.get(key, {}).get("status") == "ok" \
                and latest[key].get("fingerprint") == record.get("fingerprint") \
                and not _configs_differ(latest[key], record):
            continue  # a retried failure never hides the finished result of the same specification
        latest[key] = record
    return latest


def _configs_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both records hold a resolved config and they differ in an option that changes the result: a cell
    rerun because its config file changed (:mod:`onestep.benchmark.staleness`) that then failed must not
    leave the result of the old values standing as if it were current."""
    ca, cb = a.get("config"), b.get("config")
    if not isinstance(ca, dict) or not isinstance(cb, dict):
        return False
    strip = lambda c: {k: v for k, v in c.items() if k not in NOT_COMPARED}  # noqa: E731
    return strip(ca) != strip(cb)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model, logical cores (all, and usable by this process), torch threads, platform, CUDA device."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "cuda_device": None}
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        info["cuda_device"] = torch.cuda.get_device_name(device if device is not None and device.index else 0)
    return info


def describe_machine_short(info: dict[str, Any]) -> str:
    text = f"{info.get('cpu')} ({info.get('cpu_usable')} of {info.get('cpu_count')} cores usable, " \
           f"{info.get('torch_threads')} torch threads)"
    return text + (f", GPU {info['cuda_device']}" if info.get("cuda_device") else ", no GPU")
