"""Small helpers about torch / Lightning modules that generators and callbacks share."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def datamodule_of(module: Any) -> Any | None:
    """The data module of the trainer ``module`` is attached to, or ``None`` (no trainer, or none given).

    Reads ``module._trainer`` rather than ``module.trainer``: Lightning's property raises when detached."""
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; afterwards ``module.train(previous mode)``, also on an exception
    (through the module's own ``train``, so an override that keeps a frozen part in eval mode still runs)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
