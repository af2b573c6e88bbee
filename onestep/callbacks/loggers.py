"""Logger construction: CSV always, Weights & Biases on request.

W&B runs offline unless the user has configured a key (``WANDB_API_KEY`` or a ``wandb login`` entry in
``~/.netrc``), or ``WANDB_MODE`` says otherwise. Lightning's ``WandbLogger`` creates its run on rank 0
only, so a DDP job gives one run; ``group`` (e.g. the dataset or suite) and ``config`` (the resolved
training config) are recorded so the default W&B workspace can compare methods side by side.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning.pytorch.loggers import CSVLogger, Logger


def wandb_key_configured() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` is set or ``~/.netrc`` has an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def make_loggers(save_dir: str | os.PathLike, name: str, wandb: bool = False, project: str = "onestep",
                 group: str | None = None, tags: Sequence[str] | None = None, offline: bool | None = None,
                 config: Mapping[str, Any] | None = None, version: str | int | None = None) -> list[Logger]:
    """``[CSVLogger(save_dir, name)]`` plus a ``WandbLogger`` when ``wandb=True``.

    ``offline=None`` means: offline unless a W&B key is configured or ``WANDB_MODE=online``."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(save_dir), name=name, version=version)]
    if not wandb:
        return loggers
    try:
        import wandb as _wandb  # noqa: F401
    except ImportError as err:
        raise ImportError("W&B logging was requested but wandb is not installed: "
                          "pip install wandb  (or pip install 'onestep[wandb]')") from err
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_key_configured())
    loggers.append(WandbLogger(name=name, save_dir=str(save_dir), project=project, group=group,
                               tags=list(tags) if tags else None, offline=offline,
                               config=dict(config) if config else None,
                               version=str(version) if version is not None else None))
    return loggers


def finish_wandb_runs(loggers: Sequence[Logger], summary: Mapping[str, Any] | None = None,
                      config: Mapping[str, Any] | None = None, failed: bool = False) -> int:
    """Write ``summary`` into the run summary (and ``config`` into the config, replacing what Lightning's
    flat hyperparameter logging put under the same keys, e.g. the data module's ``seed``) of every
    ``WandbLogger`` that started a run, then finish it.

    One process that trains several models (a single-process ``onestep benchmark``) must do this between
    them: ``wandb.init`` while a run is active returns that run, so every later model would log into the
    first one's run. Returns the number of runs finished."""
    finished = 0
    for logger in loggers:
        run = getattr(logger, "_experiment", None)  # only a run that was started; never start one here
        if run is None or type(logger).__name__ != "WandbLogger":
            continue
        if config:
            run.config.update(dict(config), allow_val_change=True)
        if summary:
            run.summary.update(dict(summary))
        run.finish(exit_code=1 if failed else 0)
        finished += 1
    return finished
