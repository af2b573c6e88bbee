r"""Training in consecutive stages inside one run (teacher then student, autoencoder then distance net).

A generator mixes :class:`StagedTraining` in before :class:`~onestep.generators.base.OneStepGenerator` and
writes three things:

* :meth:`~StagedTraining.stage_starts`: the global steps at which stages 2, 3, ... begin;
* :meth:`~StagedTraining.begin_stage`: what happens at a switch (freeze a network, copy its EMA into its
  weights with :meth:`~StagedTraining.load_ema_into`, build a bank, ...);
* optionally :meth:`~StagedTraining.restore_stage` (flags a checkpoint of a later stage needs that the
  state dict does not carry, e.g. ``requires_grad``) and :meth:`~StagedTraining.stage_ema_decay`.

The stage is the registered buffer ``stage`` (1-based), so checkpoints carry it. Stage ``k + 1`` begins
at the first training batch with ``global_step >= stage_starts()[k - 1]`` (checked in
``on_train_batch_start``, before the batch's loss): :meth:`begin_stage` runs, then the EMA restarts from
the current weights, and its warm-up :math:`\min(\text{decay}, (1 + n)/(10 + n))` counts ``n`` from the
stage start, so a new network's average does not start from its untrained weights. A checkpoint saved
in any stage resumes there: the buffer comes back with the weights, and no switch runs twice.

:func:`stage_schedule` gives the learning-rate factor of a parameter group that trains in one stage only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


class StagedTraining:
    """Stage bookkeeping for a :class:`~onestep.generators.base.OneStepGenerator` subclass (see the module)."""

    #: stages train different parameters, so DDP must search for unused ones (``onestep fit`` reads this)
    trains_in_stages = True
    #: the stage that trains the networks samples come from (every staged generator here has two stages);
    #: before it, samples come from untrained networks and no evaluation scores them
    sampling_stage = 2

    def register_stage(self, first: int = 1) -> None:
        """Create the ``stage`` buffer (call in ``__init__``); ``first`` > 1 skips the earlier stages."""
        self.register_buffer("stage", torch.tensor(int(first)))

    # ------------------------------------------------------------------ to implement
    def autoencoder_switch_step(self, ae_steps: int | None, ae_fraction: float) -> int:
        """First step after an autoencoder stage: ``ae_steps``, or ``ae_fraction`` of ``trainer.max_steps``."""
        if ae_steps is not None:
            return ae_steps
        max_steps = self._trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            raise ValueError("ae_steps=None needs trainer.max_steps > 0 to place the stage switch at "
                             f"ae_fraction={ae_fraction} of it; set ae_steps explicitly")
        return int(round(ae_fraction * max_steps))

    def stage_starts(self) -> Sequence[int]:
        """Global steps at which stages 2, 3, ... begin."""
        raise NotImplementedError

    def begin_stage(self, stage: int) -> None:
        """Work done once when ``stage`` begins, before the EMA restarts."""

    def restore_stage(self, stage: int) -> None:
        """A checkpoint of ``stage`` is being loaded into a module in an earlier stage: set what the state
        dict does not carry (the weights and the buffer arrive with it)."""

    def stage_ema_decay(self, stage: int) -> float:
        """The EMA decay limit in ``stage`` (default: ``ema_decay`` in every stage)."""
        return self.ema_decay

    def untrained_sampler(self) -> str | None:
        """Why samples drawn now would come from untrained networks (the stage is before
        :attr:`sampling_stage`), or ``None`` when they would not."""
        stage = int(self.stage)
        if stage >= self.sampling_stage:
            return None
        try:  # the switch step may need a trainer's max_steps (ae_fraction)
            begins = f", which begins at step {self.stage_start(self.sampling_stage)}"
        except (ValueError, AttributeError, IndexError, RuntimeError):
            begins = ", which has not begun"
        return (f"{type(self).__name__} is in stage {stage}; its samples come from the networks of stage "
                f"{self.sampling_stage}{begins}")

    # ------------------------------------------------------------------ machinery
    def stage_start(self, stage: int) -> int:
        """First global step of ``stage``."""
        return 0 if stage == 1 else int(self.stage_starts()[stage - 2])

    def stage_origin(self) -> int:
        """Global step the current stage counts its EMA warm-up from (its start)."""
        return self.stage_start(int(self.stage))

    def enter_stage(self, stage: int) -> None:
        """Switch to ``stage`` now: :meth:`begin_stage`, the buffer, then the EMA restarts."""
        self.begin_stage(stage)
        self.stage.fill_(stage)
        self.reset_ema()

    def advance_stage(self) -> None:
        """Enter every stage whose start ``global_step`` has reached."""
        starts = self.stage_starts()
        while int(self.stage) <= len(starts) and self.global_step >= starts[int(self.stage) - 1]:
            self.enter_stage(int(self.stage) + 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = super().on_train_batch_start(batch, batch_idx)
        self.advance_stage()
        return out

    def averages_weights(self) -> bool:
        """The current stage's EMA decay decides whether sampling uses the average or the live weights."""
        return self.stage_ema_decay(int(self.stage)) > 0

    def ema_decay_at(self, step: int) -> float:
        """The base's EMA warm-up, counted from the start of the current stage."""
        local = step - self.stage_origin()
        return min(self.stage_ema_decay(int(self.stage)), (1 + local) / (10 + local))

    @torch.no_grad()
    def load_ema_into(self, *prefixes: str) -> None:
        """Copy the EMA into the parameters whose names start with one of ``prefixes``."""
        ema = self._ensure_ema()
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                if name not in ema:
                    raise RuntimeError(f"{type(self).__name__}: parameter {name!r} has no EMA to copy (was it "
                                       "frozen before the stage that should have trained it?)")
                param.copy_(ema[name])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("state_dict", {}).get("stage")
        if saved is not None and int(saved) > int(self.stage):
            self.restore_stage(int(saved))
            self.stage.fill_(int(saved))


def stage_schedule(start: int, end: int | None, warmup: int, cosine: bool) -> Callable[[int], float]:
    """Learning-rate factor of a network that trains only in steps ``[start, end)``: linear warm-up over
    ``warmup`` steps from the stage start, then constant or cosine decay to 0 at ``end``; 0 outside."""
    def factor(step: int) -> float:
        if step < start or (end is not None and step >= end):
            return 0.0
        local = step - start
        warm = min(1.0, (local + 1) / warmup) if warmup > 0 else 1.0
        if cosine and end:
            progress = min(1.0, max(0.0, (local - warmup) / max(1, end - start - warmup)))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm
    return factor
