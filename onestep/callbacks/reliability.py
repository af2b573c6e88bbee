"""Exact resume: random-number states in the checkpoint, per-rank seeds, and checkpoints taken between batches.

A checkpoint holds the model, EMA, optimiser, scheduler, loop progress and coupling banks through
Lightning and the plugin's ``state_dict``/``on_save_checkpoint``; the datamodule's training loader adds the
data-loader position (:class:`onestep.data.sampler.ResumableSampler`, saved through Lightning's loader
state). Two more things are needed for a resumed run to reproduce an uninterrupted one bit for bit, and
they live here:

* :class:`ResumableRNG` stores the torch (CPU and CUDA), numpy and python ``random`` states of *every*
  rank and restores each rank's own state right before the first training step after a resume. A fresh
  multi-process run seeds rank ``r`` with ``rank_seed(global_seed, r)``, so ranks draw different noise
  and the run is still reproducible.
* :class:`ExactCheckpoint` is a ``ModelCheckpoint`` whose step-triggered saves are written *between* two
  batches (at the next batch start, or at the epoch end after the last one). Lightning calls callbacks'
  ``on_train_batch_end`` before the module's, so a plain ``ModelCheckpoint`` misses anything a plugin does
  in its own ``on_train_batch_end`` (the base class updates the EMA earlier, in ``optimizer_step``). Files are written to ``<name>.tmp`` and
  renamed, so a kill during a write never leaves a truncated ``last.ckpt``.

All stored states are tensors, ints, floats, lists and dicts: the checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["ResumableRNG", "ExactCheckpoint", "rank_seed", "global_seed", "seed_all", "capture_rng_state",
           "restore_rng_state", "atomic_save_checkpoint"]


# ---------------------------------------------------------------------------------------------- seeds
def global_seed() -> int:
    """The run's seed: ``PL_GLOBAL_SEED`` (set by ``seed_everything`` / LightningCLI), else torch's initial seed."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else int(torch.initial_seed())


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, rank, step)``; distinct ranks get unrelated streams."""
    state = np.random.SeedSequence([int(seed) % 2**63, 7727, int(rank), int(step)]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy and python ``random`` without touching ``PL_GLOBAL_SEED``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------- states
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-safe values (tensors, ints, floats, None)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: reading every visible GPU would open a CUDA context on each of them
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device()).cpu()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


class ResumableRNG(Callback):
    """Save every rank's RNG states with each checkpoint; restore them before the first step after a resume.

    The states are gathered from all ranks when the checkpoint is written (``trainer.save_checkpoint`` runs
    on every rank). A checkpoint written with a different number of processes cannot give each rank its
    stream back: the ranks are then re-seeded from ``(seed, rank, step)`` with a warning (reproducible,
    but not identical to an uninterrupted run)."""

    def __init__(self) -> None:
        super().__init__()
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None
        self._restored = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":  # the same instance may serve several runs in one process (CLI defaults)
            self._pending, self._restored = None, False

    def state_dict(self) -> dict[str, Any]:
        mine = capture_rng_state()
        states = [mine]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, mine)
        return {"ranks": states, "world_size": len(states)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending, self._restored = state_dict, True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored and trainer.world_size > 1:
            # every rank ran seed_everything(seed) and built the same initial weights; from here on each
            # rank needs its own noise, derived from the run's seed so that the run stays reproducible
            seed_all(rank_seed(global_seed(), trainer.global_rank))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        ranks = state.get("ranks", [])
        if len(ranks) == trainer.world_size:
            restore_rng_state(ranks[trainer.global_rank])
            return
        warnings.warn(f"ResumableRNG: the checkpoint holds RNG states of {len(ranks)} process(es) but this run has "
                      f"{trainer.world_size}; re-seeding each rank from (seed, rank, step) instead", stacklevel=2)
        seed_all(rank_seed(global_seed(), trainer.global_rank, trainer.global_step))


# ---------------------------------------------------------------------------------------------- files
def atomic_save_checkpoint(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` to ``<filepath>.tmp``, then an atomic rename (local files; rank 0).

    Must be called on every rank, like ``trainer.save_checkpoint``."""
    local = "://" not in str(filepath)
    target = f"{filepath}.tmp" if local else filepath
    trainer.save_checkpoint(target, weights_only)
    if local and trainer.is_global_zero:
        os.replace(target, filepath)
    trainer.strategy.barrier("atomic_save_checkpoint")


class ExactCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same options) whose checkpoints capture the state between two batches.

    A save that ``every_n_train_steps`` or ``train_time_interval`` triggers at the end of a batch is
    written at the start of the next batch, or at the end of the epoch if that was the last batch, so it
    contains everything the module did in ``on_train_batch_end``. Writes are atomic.
    With an automatic folder (``dirpath=None``) each new fit resolves its folder again, so one instance
    can be reused by several trainers in one process."""

    _MANUAL_OPT_WARNING = ".*ModelCheckpoint with manual optimization.*"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._automatic_dirpath = self.dirpath is None
        self._pending: tuple[Any, Any, int] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._automatic_dirpath:
            self.dirpath = None
            self.best_k_models, self.kth_best_model_path, self.best_model_path = {}, "", ""
            self.best_model_score = self.current_score = None
            self.last_model_path, self._last_checkpoint_saved = "", ""
            self._last_global_step_saved = 0
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        self._pending = None
        super().setup(trainer, pl_module, stage)

    # the save decided at a batch end happens once the batch is fully done
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pending = (outputs, batch, batch_idx)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending = None  # the interrupted batch may be half done: never save it as if it were complete
        super().on_exception(trainer, pl_module, exception)

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the save decision postponed from the last batch end (if any)."""
        if self._pending is None:
            return
        outputs, batch, batch_idx = self._pending
        self._pending = None
        with warnings.catch_warnings():
            # the state saved here is the post-step state on purpose; Lightning's hint does not apply
            warnings.filterwarnings("ignore", message=self._MANUAL_OPT_WARNING)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        atomic_save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
