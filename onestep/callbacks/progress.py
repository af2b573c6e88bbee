"""What ``onestep fit`` and ``onestep benchmark`` print while they train.

* :class:`StepProgress` (a Lightning progress bar): ``step k/max_steps`` with the overall ETA (not a
  per-epoch bar), one line per evaluation with its headline metrics, and a final summary (headline
  metrics, run directory, pictures). On a terminal the step line is redrawn in place (``\\r``) at most every
  ``refresh_seconds``; otherwise (a log file, a pipe) it prints plain lines only, at most one per
  ``plain_every_seconds`` plus one per 10 % of the run, so the size of a log is bounded by the run's
  length in time and never by its number of steps.
* :class:`Heartbeat`: the rate-limited progress line of a benchmark cell (at most one per ``interval``).
* :func:`quiet_lightning`: drops Lightning's chatter that says nothing about the run (the litlogger tip,
  "GPU available / TPU available / HPU available" lines, torch's LeafSpec deprecation).

ETA: ``(total - step) * elapsed / (step - first_step)``, where ``elapsed`` runs from this process's first
training batch and includes evaluations (they are part of what is left to wait for).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TextIO

from lightning.pytorch import Callback
from lightning.pytorch.callbacks.progress import ProgressBar

from onestep.callbacks.visuals import headline_metrics

__all__ = ["StepProgress", "Heartbeat", "HeartbeatCallback", "quiet_lightning", "add_progress_bar", "format_duration", "eta_seconds"]

#: message fragments of Lightning's info lines that carry no information about the run
CHATTER = ("GPU available:", "TPU available:", "HPU available:", "litlogger", "LitLogger")


def format_duration(seconds: float | None) -> str:
    """``75 -> "1m15s"``, ``3725 -> "1h02m05s"``, ``None`` or not finite -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def eta_seconds(step: int, total: int | None, first_step: int, elapsed: float) -> float | None:
    """Seconds left at ``step`` of ``total`` when ``step - first_step`` steps took ``elapsed`` seconds."""
    done = step - first_step
    if total is None or done <= 0 or elapsed <= 0:
        return None
    return max(0, total - step) * elapsed / done


class Heartbeat:
    """A progress line at most every ``interval`` seconds of ``clock`` (injectable, for tests).

    ``beat(step, total)`` returns (and passes to ``log``) the line it printed, or ``None`` when the last
    line is more recent than ``interval``. The first call only starts the clock (there is no rate yet)."""

    def __init__(self, label: str, interval: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], Any] | None = None) -> None:
        self.label, self.interval, self.clock = label, float(interval), clock
        self.log = log if log is not None else (lambda line: print(line, flush=True))
        self._start: tuple[float, int] | None = None
        self._last: float | None = None

    def beat(self, step: int, total: int | None, time_left: float | None = None) -> str | None:
        now = self.clock()
        if self._start is None:
            self._start, self._last = (now, step), now
            return None
        if now - self._last < self.interval:
            return None
        self._last = now
        eta = eta_seconds(step, total, self._start[1], now - self._start[0])
        if time_left is not None:  # a wall-clock budget ends the run first when it is shorter
            eta = max(0.0, time_left) if eta is None else min(eta, max(0.0, time_left))
        line = f"  {self.label}: step {step}/{total if total is not None else '?'}, ETA {format_duration(eta)}"
        self.log(line)
        return line


class HeartbeatCallback(Callback):
    """A :class:`Heartbeat` after each training batch (rank 0): the step, out of ``max_steps``, and the ETA
    (the sooner of ``max_steps`` at the current rate and ``time_left()``, the seconds a time budget leaves)."""

    def __init__(self, label: str, interval: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], Any] | None = None, time_left: Callable[[], float | None] | None = None) -> None:
        self.heartbeat = Heartbeat(label, interval, clock, log)
        self.time_left = time_left

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self.heartbeat.beat(trainer.global_step, total, self.time_left() if self.time_left else None)


class _ChatterFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in CHATTER)


_FILTER = _ChatterFilter()


def quiet_lightning() -> None:
    """Drop :data:`CHATTER` from Lightning's loggers and torch's LeafSpec deprecation warning (idempotent)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.accelerator_connector",
                 "lightning.pytorch.trainer.setup"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):  # handler filters also see records of child loggers
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=DeprecationWarning)


def add_progress_bar(trainer_kwargs: dict[str, Any], trainer_config: Any, enabled: bool | None) -> None:
    """Put a :class:`StepProgress` among the trainer's callbacks (``trainer_kwargs["callbacks"]``, which
    replaces the configured list in ``LightningCLI.instantiate_trainer``) unless the progress bar is off
    (``--trainer.enable_progress_bar false``) or the configuration already has a progress bar."""
    if enabled is False or "callbacks" in trainer_kwargs:
        return
    given = trainer_config.get("callbacks") if trainer_config is not None else None
    given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
    if not any(isinstance(cb, ProgressBar) for cb in given):
        trainer_kwargs["callbacks"] = [*given, StepProgress()]


class StepProgress(ProgressBar):
    """Step ``k/total`` with an overall ETA, one line per evaluation, a summary at the end (rank 0 only)."""

    def __init__(self, refresh_seconds: float = 0.5, plain_every_seconds: float = 30.0, stream: TextIO | None = None,
                 is_tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.refresh_seconds, self.plain_every_seconds = refresh_seconds, plain_every_seconds
        self._stream, self._is_tty, self.clock = stream, is_tty, clock
        self._enabled = True
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._first_step = 0
        self._last_draw = -math.inf
        self._next_milestone = 0
        self._line_open = False
        self._evals_shown = 0

    # ------------------------------------------------------------------------------------ ProgressBar API
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def tty(self) -> bool:
        if self._is_tty is not None:
            return self._is_tty
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        self._write_line(sep.join(map(str, args)))

    # ------------------------------------------------------------------------------------ output
    def _write_line(self, line: str) -> None:
        if not self._enabled:
            return
        if self._line_open:  # end the in-place step line first
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def _total(self, trainer) -> int | None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            try:
                estimated = trainer.estimated_stepping_batches
                total = int(estimated) if math.isfinite(estimated) else None
            except Exception:  # noqa: BLE001 - an unknown length only costs the ETA
                total = None
        return total

    def step_line(self, trainer, step: int) -> str:
        total = self._total(trainer)
        elapsed = self.clock() - self._t0 if self._t0 is not None else 0.0
        eta = eta_seconds(step, total, self._first_step, elapsed)
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "") if total
                 else f"step {step}"]
        loss = next((v for k, v in trainer.progress_bar_metrics.items() if "loss" in k), None)
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        done = step - self._first_step
        if done > 0 and elapsed > 0:
            parts.append(f"{done / elapsed:.3g} steps/s")
        parts.append(f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta) if total else '?'}")
        return "  ".join(parts)

    def _eval_lines(self, trainer, keep_last: bool = False) -> None:
        """One line per evaluation not shown yet (``keep_last``: not the last one, the summary shows it)."""
        evaluation = _evaluation_callback(trainer)
        history = getattr(evaluation, "history", None) or []
        for record in history[self._evals_shown:len(history) - int(keep_last)]:
            shown = headline_metrics(record["metrics"])
            text = ", ".join(f"{k} {v:.4g}" for k, v in shown) or "no headline metric"
            self._write_line(f"eval at step {record['step']}: {text}")
        self._evals_shown = len(history)

    # ------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        self._first_step = trainer.global_step
        self._t0 = self.clock()
        if not trainer.is_global_zero:
            self.disable()
            return
        total = self._total(trainer)
        start = f" from step {self._first_step}" if self._first_step else ""
        self._write_line(f"onestep fit: {type(pl_module).__name__} on {getattr(trainer.datamodule, 'dataset', '?')}, "
                         f"{total if total else '?'} steps{start}")
        self._next_milestone = self._first_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._eval_lines(trainer)  # an evaluation run at the previous batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        step, now = trainer.global_step, self.clock()
        total = self._total(trainer)
        if self.tty:
            if now - self._last_draw >= self.refresh_seconds or (total and step >= total):
                self._last_draw = now
                self.stream.write("\r" + self.step_line(trainer, step).ljust(100))
                self.stream.flush()
                self._line_open = True
            return
        milestone = bool(total) and step >= self._next_milestone
        if milestone or now - self._last_draw >= self.plain_every_seconds:
            self._last_draw = now
            if total:
                tenth = max(1, total // 10)
                self._next_milestone = (step // tenth + 1) * tenth
            self._write_line(self.step_line(trainer, step))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._enabled or self._t0 is None:
            return
        self._eval_lines(trainer, keep_last=True)
        step = trainer.global_step
        self._write_line(f"onestep fit: finished at step {step}/{self._total(trainer) or '?'} in "
                         f"{format_duration(self.clock() - self._t0)}")
        evaluation = _evaluation_callback(trainer)
        history = getattr(evaluation, "history", None) or []
        if history:
            shown = headline_metrics(history[-1]["metrics"])
            text = ", ".join(f"{k} {v:.4g}" for k, v in shown)
            self._write_line(f"  final evaluation (step {history[-1]['step']}): {text}")
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        if log_dir:
            run_dir = Path(log_dir).resolve()
            self._write_line(f"  run directory: {run_dir}")
            pictures = sorted(run_dir.glob("samples_step*.png"), key=lambda p: int(p.stem.removeprefix("samples_step")))
            if pictures:
                more = f" (and {len(pictures) - 1} earlier)" if len(pictures) > 1 else ""
                self._write_line(f"  pictures: {pictures[-1]}{more}")


def _evaluation_callback(trainer):
    from onestep.callbacks.evaluation import EvaluationCallback

    return next((cb for cb in trainer.callbacks if isinstance(cb, EvaluationCallback)), None)
