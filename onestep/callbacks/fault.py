"""Faults: a non-finite loss, a preemption signal, a broken checkpoint file.

* :class:`NonFiniteGuard` stops training *before* an optimiser step that a NaN/inf loss or gradient
  would poison, with a message naming the step and the last good checkpoint (which nothing overwrites
  afterwards: the run ends there).
* :class:`PreemptionCheckpoint` turns SIGTERM / SIGUSR1 (what SLURM and preemptible clouds send before a
  kill) into a checkpoint ``last.ckpt`` written between two batches, then a clean exit (status 0); Ctrl-C
  (SIGINT) likewise, with exit status 130 (a second Ctrl-C stops at once, without a checkpoint). It prints
  the command that resumes the run.
* :func:`check_checkpoint_file` tells a truncated or corrupted checkpoint apart from a good one before
  any training, and names the earlier checkpoints to use instead.

Under DDP every decision is reduced over the ranks (one small all-reduce per check), so all ranks stop
together and none is left waiting in a collective.
"""

from __future__ import annotations

import os
import pickle
import shlex
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from onestep.callbacks.reliability import ExactCheckpoint, atomic_save_checkpoint

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "PreemptionCheckpoint", "Preempted", "Interrupted",
           "CheckpointCorruptedError", "check_checkpoint_file", "last_good_checkpoint", "resume_hint"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


class CheckpointCorruptedError(ValueError):
    """A checkpoint file cannot be read back."""


class Preempted(SIGTERMException):
    """Raised after the preemption checkpoint is written; a ``SystemExit`` with status 0."""


class Interrupted(SystemExit):
    """Raised after the checkpoint of a Ctrl-C (SIGINT) is written; a ``SystemExit`` with status 130
    (128 + SIGINT, what a shell reports for a command stopped by Ctrl-C), so ``onestep fit && next`` stops."""

    def __init__(self) -> None:
        super().__init__(130)


def resume_hint(path: str, argv: list[str] | None = None) -> str:
    """How to resume from checkpoint ``path``: the ``onestep fit`` command line of this process (``argv``,
    default ``sys.argv[1:]``) with ``--ckpt_path path`` in place of any earlier one; inside ``onestep
    benchmark``, its own command (a rerun resumes every unfinished cell); else just the option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["benchmark"]:
        return f"Resume with: onestep {shlex.join(argv)}"
    if argv[:1] != ["fit"]:
        return f"Resume with --ckpt_path {path}"
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return f"Resume with: onestep {shlex.join(['fit', *kept, '--ckpt_path', str(path)])}"


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint file this run wrote (any ``ModelCheckpoint``), or ``None``."""
    paths = []
    for cb in trainer.checkpoint_callbacks:
        for attr in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
            path = getattr(cb, attr, "")
            if path and os.path.isfile(path):
                paths.append(path)
    return max(paths, key=os.path.getmtime) if paths else None


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if trainer.world_size > 1 else flag


# ---------------------------------------------------------------------------------------------- NaN / inf
def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, computed in float32 at least (a float16 norm overflows to inf
    on finite gradients). float32 tensors on one device take one fused ``_foreach_norm`` call."""
    if all(t.dtype == torch.float32 and t.device == tensors[0].device for t in tensors):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()).to(tensors[0].device)
                                                 for t in tensors]))


class NonFiniteGuard(Callback):
    """Stop at the first non-finite loss (or gradient norm) before the optimiser applies it.

    The loss is looked at in ``on_before_backward``; the decision is taken in ``on_before_optimizer_step``
    (or at the batch end when no optimiser step happened in the batch), reduced over ranks, and raises
    :class:`NonFiniteLossError`. The weights, EMA and optimiser state therefore never hold NaNs and the
    last checkpoint stays the last good one.

    Args:
        check_grads: also stop when the global gradient norm is not finite (one extra norm per step; not
            under fp16 mixed precision, whose gradient scaler skips such steps by design).
    """

    def __init__(self, check_grads: bool = True) -> None:
        super().__init__()
        if not isinstance(check_grads, bool):
            raise ValueError(f"NonFiniteGuard: check_grads={check_grads!r} is not allowed; use true or false")
        self.check_grads = check_grads
        self._bad: tuple[str, float] | None = None
        self._stepped = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._bad, self._stepped = None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stepped = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._bad is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad = ("loss", float(loss.detach().float().sum()))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._stepped = True
        bad = self._bad
        # with an fp16 GradScaler an inf gradient is routine: the scaler skips that step and lowers its scale
        scaled = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
        if bad is None and self.check_grads and not scaled:
            grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norm = _global_norm(grads)
                if not bool(torch.isfinite(norm)):
                    bad = ("gradient norm", float(norm))
        self._stop_if_bad(trainer, bad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stepped:
            return
        bad = self._bad
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if bad is None and isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            bad = ("loss", float(loss.detach().float().sum()))
        self._stop_if_bad(trainer, bad)

    def _stop_if_bad(self, trainer: L.Trainer, bad: tuple[str, float] | None) -> None:
        self._bad = None
        if not _any_rank(trainer, bad is not None):
            return
        step = trainer.global_step
        what = f"the {bad[0]} is {bad[1]}" if bad else "another process's loss or gradient is not finite"
        ckpt = last_good_checkpoint(trainer)
        if ckpt:
            where = (f"The last good checkpoint is {ckpt} (kept: nothing is saved after this point). "
                     f"Resume from it with --ckpt_path {ckpt}")
        else:
            where = "No checkpoint had been written yet; restart from scratch"
        raise NonFiniteLossError(
            f"training stopped at optimizer step {step + 1} (global_step={step}, epoch {trainer.current_epoch}): "
            f"{what}; the weights were not updated with it. {where} after lowering the "
            "learning rate (model.init_args.lr), adding warmup_steps or gradient clipping, or checking the data.")


# ---------------------------------------------------------------------------------------------- signals
class PreemptionCheckpoint(Callback):
    """On SIGTERM, SIGUSR1 or SIGINT (Ctrl-C): write ``last.ckpt`` between two batches, then exit (status 0;
    130 after Ctrl-C) with the command that resumes the run.

    The signal handler only records the signal; the checkpoint is written at the next batch start (every
    rank, after a reduce, so a signal delivered to one rank stops them all), in the folder of the first
    ``ModelCheckpoint`` (else ``<log_dir>/checkpoints``), atomically. Then :class:`Preempted` (a
    ``SystemExit`` with status 0) ends the run without a final evaluation. Resume with
    ``--ckpt_path <that file>``; requeueing a cluster job is the job script's business (see
    ``docker/README.md``), so the same code works inside containers that have no ``scontrol``.

    Ctrl-C: a second Ctrl-C before the checkpoint is written raises ``KeyboardInterrupt`` at once (a step
    can take minutes), with no checkpoint. A process that ignores SIGINT (started in the background with
    ``&``) keeps ignoring it.

    The handlers replace Lightning's own SIGTERM handler for the duration of training (Lightning's stops
    without a checkpoint) and the previous handlers come back when training ends.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        super().__init__()
        names = [signals] if isinstance(signals, str) else list(signals)
        for name in names:
            if not isinstance(name, str) or not hasattr(signal, name) or not name.startswith("SIG"):
                raise ValueError(f"PreemptionCheckpoint: signals contains {name!r}, which is not a signal name; "
                                 "use names such as SIGTERM, SIGUSR1, SIGUSR2, SIGINT")
        self.signals = tuple(names)
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received, self.saved_path = None, None

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # Ctrl-C twice: stop now
                self._restore_handlers()
                raise KeyboardInterrupt
            # os.write: a print here could re-enter a write of the interrupted code to the same stream
            os.write(2, b"\nonestep: Ctrl-C: writing last.ckpt after the current step "
                        b"(Ctrl-C again to stop at once, without it)\n")
        self.received = signum  # the work happens between two batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.signals:
            signum = getattr(signal, name)
            if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (a background job): keep it so
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()  # a signal during the last batch: the run finished anyway

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not _any_rank(trainer, self.received is not None):
            return
        for cb in trainer.checkpoint_callbacks:  # periodic saves postponed from the last batch end come first
            if isinstance(cb, ExactCheckpoint):
                cb.flush(trainer, pl_module)
        path = self._checkpoint_path(trainer)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(path).parent == Path(cb.dirpath):
                cb.last_model_path = path  # part of the saved state, as ModelCheckpoint does for last.ckpt
        atomic_save_checkpoint(trainer, path)
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        if trainer.is_global_zero:
            print(f"onestep: received {name} at step {trainer.global_step}; checkpoint written to {path}. "
                  f"{resume_hint(path)}", file=sys.stderr, flush=True)
            for logger in trainer.loggers:
                logger.save()
        self._restore_handlers()
        if self.received == signal.SIGINT:
            raise Interrupted()
        raise Preempted()

    def _checkpoint_path(self, trainer: L.Trainer) -> str:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        root = trainer.log_dir or trainer.default_root_dir
        return os.path.join(root, "checkpoints", "last.ckpt")


# ---------------------------------------------------------------------------------------------- files
def _zip_intact(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        return False


def _earlier_checkpoints(path: Path, limit: int = 3) -> list[str]:
    """Other ``*.ckpt`` files next to ``path`` whose archive is intact, newest first."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in others if _zip_intact(p)][:limit]


def check_checkpoint_file(path: str | os.PathLike, weights_only: bool = True) -> None:
    """Raise a clear error unless ``path`` is a readable Lightning checkpoint.

    Checks: the file exists and is not empty; its zip directory (``torch.save`` writes a zip archive) is
    intact and every record passes its CRC-32 check (catches truncation and flipped bytes); it unpickles
    (memory-mapped, so a large file costs little) with ``weights_only`` loading; it holds a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path")

    def broken(reason: str) -> CheckpointCorruptedError:
        earlier = _earlier_checkpoints(path)  # looked up only once the file is known to be unusable
        hint = (f"Use an earlier checkpoint instead, e.g. {', '.join(earlier)}" if earlier else
                "Use an earlier checkpoint, or start again without --ckpt_path")
        return CheckpointCorruptedError(f"checkpoint {path} ({size} bytes) is truncated or corrupted: {reason}. {hint}")

    size = path.stat().st_size
    if size == 0:
        raise broken("the file is empty")
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if starts_like_zip and not is_zip:
        raise broken("its zip archive has no end record: the file was cut short")
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                bad_record = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
            raise broken(str(err)) from None
        if bad_record is not None:
            raise broken(f"record {bad_record!r} fails its CRC check")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=is_zip)
    except Exception as err:  # noqa: BLE001 - any failure to read back means the file is unusable
        first_line = (str(err).strip().splitlines() or [""])[0]
        if not is_zip:  # torch.save has written zip archives since torch 1.6; this is something else
            raise broken("not a PyTorch checkpoint (no zip archive)") from None
        if weights_only and isinstance(err, pickle.UnpicklingError) and "weights only" in first_line.lower():
            raise CheckpointCorruptedError(
                f"checkpoint {path} holds objects that weights_only loading refuses ({first_line}). If you trust "
                "the file, load it with --weights_only false") from None
        raise broken(f"{type(err).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointCorruptedError(f"checkpoint {path} is not a Lightning training checkpoint (it has no "
                                       "'state_dict' entry); pass the .ckpt file that `onestep fit` wrote")
