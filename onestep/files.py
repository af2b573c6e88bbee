"""Atomic file writes: a reader (another process, a resumed run) sees the old file or the new one, never half.

Every writer goes to a temporary file in the destination's own directory (``.<name>.<pid>.tmp``: same
file system, so the rename is atomic; the pid keeps concurrent writers apart), is flushed and fsync'ed,
then moved into place with ``os.replace``. If the writer raises, the temporary file is removed and the
destination is left as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], mkdir: bool = False) -> Path:
    """Call ``write(f)`` on a binary file object, then put the file at ``path`` in one rename."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """``json.dumps(data, indent=indent, default=str)`` (serialised before the file is opened)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # the file helpers stay importable without torch's start-up cost

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_savefig(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure as PNG (Agg canvas, no GUI backend needed); creates the parent directory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", **kwargs), mkdir=True)
