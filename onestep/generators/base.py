"""The plugin contract every generator implements.

A method subclasses :class:`OneStepGenerator` and writes two things:

* ``loss(x, idx) -> Tensor | (Tensor, dict)``: the training objective on a batch of normalised data
  ``x`` with dataset indices ``idx`` (extra diagnostics go in the dict and are logged as ``train/<key>``);
* ``generate(n, generator) -> Tensor``: ``n`` samples in normalised data space with the *current* weights.

Everything else is shared: the optimiser and learning-rate schedule, gradient clipping, the exponential
moving average (EMA) of the weights that sampling and evaluation use, chunked sampling, logging, option
validation and the reliability callbacks.

Options. Every ``__init__`` option of the whole class hierarchy is checked against its annotation when
the module is built (``int`` options must be integers, ``float`` options finite numbers, ``Sequence[int]``
lists of integers, ...), and so are the rules it declares there: ``Literal[...]`` choices and
:class:`~onestep.options.Range` bounds (``lr: Annotated[float, Positive]``, ``ema_decay: Annotated[float,
Range(ge=0, lt=1)]``; see :mod:`onestep.options`). A plugin writes by hand only the rules that tie several
options together (``t_min < t_max``), with :func:`_check`; errors are one-line ``ValueError`` naming the
option, the value and what is allowed.

Several optimisers (manual optimisation). A plugin that sets ``self.automatic_optimization = False`` returns
its optimisers from ``configure_optimizers``, the generator's **first** (build them with
:meth:`make_optimizer` / :meth:`make_scheduler` to get the base's AdamW and learning-rate schedule), and
in ``training_step`` updates the other networks with :meth:`clip_and_step` and the generator with
:meth:`generator_step` (backward, clipping to ``grad_clip``, step, every schedule advanced once, then
:meth:`ema_update`). Only the generator optimiser's steps advance ``global_step``, so ``trainer.max_steps``,
the schedules, the EMA warm-up, evaluation and checkpoint intervals all count generator updates (see
:meth:`optimizers`). A plugin that steps the generator itself must call :meth:`ema_update` after it;
evaluating an EMA that was never updated is refused (:meth:`check_ema_updated`).

Resumable plugins. A checkpoint restores the parameters and buffers (``state_dict``), the EMA, optimiser,
scheduler, loop progress, data-loader position and every rank's RNG states (:meth:`configure_callbacks`
adds :class:`~onestep.callbacks.reliability.ResumableRNG`, a NaN/inf guard and the preemption handler to
any trainer that lacks them). A plugin stays exactly resumable if it keeps all other training state in
registered buffers (or sub-modules), or saves it in ``on_save_checkpoint`` and reads it back in
``on_load_checkpoint`` (calling ``super()`` in both), draws randomness from torch/numpy/``random`` (or
from generators it stores), and calls ``super()`` in any hook it overrides. Checkpoints load with
``weights_only=True``: store tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import lightning as L
import torch
from torch import Tensor

from onestep.generators.sample_noise import IndexedNoise
from onestep.modules import eval_mode
from onestep.options import Fraction, NonNegative, Positive, Range, check_options
from onestep.options import conforms as _conforms  # noqa: F401 - kept importable from here

LR_SCHEDULES = ("constant", "cosine")


def _uncounted() -> None:
    """Stands in for Lightning's step-counting hooks on an optimiser whose steps do not count."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_option_types(module: Any, options: Mapping[str, Any]) -> None:
    """Check ``options`` against the ``__init__`` annotations of ``type(module)`` and its bases: the type,
    then the declared rule (see :mod:`onestep.options`)."""
    check_options(type(module), options)


class OneStepGenerator(L.LightningModule):
    """Base class of every generator plugin.

    Args:
        data_shape: shape of one data sample, e.g. ``(2,)`` or ``(1, 28, 28)``; linked from the datamodule.
        backbone: network spec ``{"name": ..., **kwargs}`` for :func:`onestep.nets.build_backbone`.
        lr, weight_decay, betas: AdamW settings.
        warmup_steps: linear learning-rate warm-up from 0.
        lr_schedule: ``constant`` or ``cosine`` (decays to 0 at ``trainer.max_steps``).
        ema_decay: EMA decay of the weights used for sampling (with the usual warm-up
            ``min(decay, (1 + step) / (10 + step))``); 0 disables averaging.
        grad_clip: maximal global gradient norm; 0 disables clipping.
    """

    #: network evaluations per sample at the default setting
    nfe: int = 1
    #: True for plugins whose stages train different parameters (teacher then student, autoencoder then
    #: distance net): DDP must then look for unused parameters, which ``onestep fit`` switches on
    trains_in_stages: bool = False

    def __init__(
        self,
        data_shape: Sequence[int] = (2,),
        backbone: Mapping[str, Any] | None = None,
        lr: Annotated[float, Positive] = 1e-3,
        weight_decay: Annotated[float, NonNegative] = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: Annotated[int, NonNegative] = 0,
        lr_schedule: Literal[LR_SCHEDULES] = "constant",
        ema_decay: Annotated[float, Fraction] = 0.999,
        grad_clip: Annotated[float, Range(ge=0, note="0 disables clipping")] = 1.0,
    ) -> None:
        super().__init__()
        # all options of the class hierarchy (Lightning collects the subclasses' init arguments too)
        self.save_hyperparameters()
        check_option_types(self, {k: v for k, v in self.hparams.items() if not k.startswith("_")})
        _check(len(data_shape) > 0 and all(int(s) > 0 for s in data_shape),
               f"data_shape must be a non-empty list of positive sizes, got {list(data_shape)}")
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two values in [0, 1), got {betas}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.backbone_spec = dict(backbone) if backbone is not None else None
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.ema_decay, self.grad_clip = ema_decay, grad_clip
        self._ema: dict[str, Tensor] | None = None
        #: EMA updates over the run, carried by checkpoints (None after loading a checkpoint that predates the
        #: count: a stale EMA cannot be told apart there, so it is not refused)
        self._ema_updates: int | None = 0

    # ------------------------------------------------------------------ to implement
    def loss(self, x: Tensor, idx: Tensor) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def randn(self, n: int, shape: Sequence[int] | None = None,
              generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise ``(n, *shape)`` on the model's device, reproducible through ``generator``."""
        shape = self.data_shape if shape is None else tuple(shape)
        indexed = getattr(self, "_indexed_noise", None)
        if generator is not None and indexed is not None and indexed.generator is generator:
            return indexed.draw(n, shape).to(self.device)  # inside sample_chunked: chunk-independent noise
        device = generator.device if generator is not None else self.device
        z = torch.randn((n, *shape), generator=generator, device=device)
        return z.to(self.device)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, idx = batch if isinstance(batch, (tuple, list)) else (batch, None)
        out = self.loss(x, idx)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        self.log_training({"loss": loss, **logs})
        return loss

    def log_training(self, values: Mapping[str, Tensor | float]) -> None:
        """Log ``train/<key>`` for each value (``train/loss`` also in the progress line), on the steps the
        loggers write: every ``trainer.log_every_n_steps`` and the last step. ``self.log`` costs about as
        much as a small network's whole training step on a CPU, and Lightning writes only those steps anyway,
        so a value logged in between would only be overwritten."""
        if not self._logs_this_step():
            return
        for key, value in values.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss")

    def _logs_this_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return True
        try:
            if trainer._logger_connector.should_update_logs:
                return True
            batch = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        except AttributeError:  # a Lightning without these (or a stand-in trainer): log every step
            return True
        return trainer.max_steps is not None and 0 < trainer.max_steps <= batch

    def make_optimizer(self, params: Any, lr: float | None = None, betas: Sequence[float] | None = None,
                       weight_decay: float | None = None) -> torch.optim.Optimizer:
        """The base's AdamW over ``params`` (``lr``, ``betas``, ``weight_decay`` default to the options)."""
        return torch.optim.AdamW(params, lr=self.lr if lr is None else lr,
                                 betas=self.betas if betas is None else tuple(betas),
                                 weight_decay=self.weight_decay if weight_decay is None else weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The base's learning-rate factor as a function of the training step ``k`` (generator updates):
        linear warm-up ``min(1, (k + 1) / warmup_steps)``, then constant or a cosine decay to 0 at
        ``trainer.max_steps``."""
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
            if self.lr_schedule == "cosine" and total:
                progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps)))
                return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
            return warm

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_callbacks(self) -> list:
        """Reliability defaults for any trainer that lacks them: RNG states in checkpoints (exact resume),
        a stop on NaN/inf losses, and a checkpoint on SIGTERM/SIGUSR1. Callbacks of these types already in
        the trainer (e.g. configured on the command line) are kept as they are. Overrides should extend
        ``super().configure_callbacks()``."""
        from onestep.callbacks.fault import NonFiniteGuard, PreemptionCheckpoint
        from onestep.callbacks.reliability import ResumableRNG

        present = self._trainer.callbacks if self._trainer is not None else []
        return [cls() for cls in (ResumableRNG, NonFiniteGuard, PreemptionCheckpoint)
                if not any(isinstance(cb, cls) for cb in present)]

    # ------------------------------------------------------------------ EMA
    #: name prefixes of parameters that sampling never uses (a GAN's discriminator): the EMA skips them
    ema_excludes: tuple[str, ...] = ()

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters the EMA averages (all of them but those under :attr:`ema_excludes`)."""
        return {name: p for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith(self.ema_excludes)}

    def _ensure_ema(self) -> dict[str, Tensor]:
        if self._ema is None:
            self._ema = {name: p.detach().clone() for name, p in self._trainable().items()}
        return self._ema

    def reset_ema(self) -> None:
        """Restart the average from the current weights (used when a new training stage begins)."""
        self._ema = None
        self._ensure_ema()

    def on_fit_start(self) -> None:
        if not self.automatic_optimization and "configure_optimizers" in vars(self):
            # LightningCLI's --optimizer/--lr_scheduler put one optimiser over all parameters in place
            raise ValueError(f"--optimizer/--lr_scheduler replace configure_optimizers with one optimiser over all "
                             f"parameters, but {type(self).__name__} trains with its own optimisers (manual "
                             "optimisation): leave --optimizer/--lr_scheduler out and set model.init_args.lr, "
                             "betas, warmup_steps and lr_schedule")
        ema = self._ensure_ema()
        for name, p in self.named_parameters():
            if name in ema:
                ema[name] = ema[name].to(p.device)

    def ema_decay_at(self, step: int) -> float:
        """EMA decay after optimiser step ``step``, with the usual warm-up: early in training the average
        follows the weights closely, so a short run's EMA is not dominated by the random initialisation."""
        return min(self.ema_decay, (1 + step) / (10 + step))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The EMA is updated here, not in on_train_batch_end: that hook runs after the callbacks', so a
        # checkpoint or an evaluation at step k would otherwise see the EMA of step k - 1.
        self.ema_update(self.global_step + 1)  # global_step counts steps before this one

    def ema_update(self, step: int | None = None) -> None:
        """Move the EMA towards the current weights: ``ema <- decay * ema + (1 - decay) * w`` with
        ``decay = ema_decay_at(step)``. Automatic optimisation calls it after every optimiser step; a
        manual-optimisation plugin calls it after each generator step (:meth:`generator_step` does).
        ``step`` defaults to ``global_step``, i.e. the steps done including the one just taken."""
        decay = self.ema_decay_at(self.global_step if step is None else step)
        ema = self._ensure_ema()
        with torch.no_grad():
            averaged, live = [], []
            for name, p in self._trainable().items():
                if name not in ema:  # a parameter that became trainable later (a new stage)
                    ema[name] = p.detach().clone()
                elif decay == 0.0:  # ema_decay 0: the average is the live weights; share them, copy nothing
                    if ema[name].data_ptr() != p.data_ptr():
                        ema[name] = p.detach()
                else:
                    if ema[name].data_ptr() == p.data_ptr():  # shared while the decay was 0: average from here
                        ema[name] = p.detach().clone()
                    averaged.append(ema[name])
                    live.append(p.detach())
            if averaged:
                torch._foreach_lerp_(averaged, live, 1.0 - decay)
        if self._ema_updates is not None:
            self._ema_updates += 1

    def averages_weights(self) -> bool:
        """Whether sampling uses the EMA copy; with ``ema_decay = 0`` it uses the live weights."""
        return self.ema_decay > 0

    def check_ema_updated(self) -> None:
        """Refuse to score an EMA that training never updated (a manual plugin without ``ema_update``):
        it still holds the initial weights, and every evaluation would report the same wrong number."""
        steps = getattr(self._trainer, "global_step", 0)  # 0 without a trainer (or with a stand-in one)
        if self.averages_weights() and self._ema_updates == 0 and steps > 0:
            raise ValueError(
                f"{type(self).__name__}: the EMA weights were never updated in {steps} training steps "
                f"(ema_decay={self.ema_decay}), so sampling would use the initial weights; call self.ema_update() "
                "after each generator step (self.generator_step(loss) does), or set ema_decay: 0 to sample the "
                "live weights")

    # ------------------------------------------------------------------ manual optimisation
    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """Lightning's optimisers. Under manual optimisation with several optimisers only the first's (the
        generator's) steps are counted by Lightning's progress tracking (``optim_step_progress``, which is
        ``global_step``): the others' ``step()`` keeps the strategy and precision path but skips the count,
        so ``trainer.max_steps`` and every interval count generator updates."""
        opts = super().optimizers(use_pl_optimizer)
        if use_pl_optimizer and not self.automatic_optimization and isinstance(opts, list):
            for other in opts[1:]:
                other._on_before_step = other._on_after_step = _uncounted
        return opts

    def clip_and_step(self, optimizer: Any, loss: Tensor) -> None:
        """One update of ``optimizer``'s parameters on ``loss``: zero the gradients, ``manual_backward``,
        clip the global gradient norm to ``grad_clip`` (0: no clipping), step."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def generator_step(self, loss: Tensor) -> None:
        """The generator's update (one training step): :meth:`clip_and_step` on the first optimiser, every
        learning-rate schedule advanced once (all schedules run in training steps), then :meth:`ema_update`."""
        opts = self.optimizers()
        self.clip_and_step(opts[0] if isinstance(opts, list) else opts, loss)
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        self.ema_update()

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in for the duration of the block.

        The swap exchanges tensor storage (``param.data``) with the EMA tensors instead of copying, so it
        costs nothing per call; the swap back restores the training weights bit for bit. Nested use is a
        no-op (the EMA weights are already in), and so is the block with ``ema_decay = 0`` (the live weights are
        sampled; no stale copy is read).
        """
        if getattr(self, "_ema_swapped", False) or not self.averages_weights():
            yield  # nested, or ema_decay = 0: the live weights are the sampled ones
            return
        self.check_ema_updated()
        ema = self._ensure_ema()
        params = dict(self.named_parameters())
        names = [name for name in ema if name in params]
        for name in names:
            if ema[name].device != params[name].device or ema[name].dtype != params[name].dtype:
                ema[name] = ema[name].to(params[name])

        def swap() -> None:
            for name in names:
                params[name].data, ema[name] = ema[name], params[name].data

        swap()
        self._ema_swapped = True
        try:
            yield
        finally:
            swap()
            self._ema_swapped = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # with ema_decay = 0 the sampled weights are the live ones: the checkpoint's "ema" holds them
        ema = self._ensure_ema() if self.averages_weights() else self._trainable()
        checkpoint["ema"] = {k: v.detach().cpu() for k, v in ema.items()}
        checkpoint["ema_updates"] = self._ema_updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" in checkpoint:
            self._ema = {k: v.to(self.device) for k, v in checkpoint["ema"].items()
                         if not k.startswith(self.ema_excludes)}  # older checkpoints averaged them too
        self._ema_updates = checkpoint.get("ema_updates")

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator | None = None, use_ema: bool = True) -> Tensor:
        """``n`` samples in normalised data space, drawn with the EMA weights by default."""
        return self.sample_chunked(n, chunk_size=max(1, n), generator=generator, use_ema=use_ema)

    @torch.no_grad()
    def sample_chunked(self, n: int, chunk_size: int = 4096, generator: torch.Generator | None = None,
                       use_ema: bool = True) -> Tensor:
        """Like :meth:`sample` but in chunks of at most ``chunk_size``, so large ``n`` fits in memory.

        With a ``generator`` the noise that :meth:`randn` hands ``generate`` is addressed by sample index
        (:class:`~onestep.generators.sample_noise.IndexedNoise`), so the result does not depend on
        ``chunk_size``: ``sample_chunked(n, c, g)`` equals ``sample(n, g)`` for equally seeded ``g``."""
        _check(n >= 1, f"n must be >= 1, got {n}")
        _check(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
        indexed = IndexedNoise(generator) if generator is not None else None
        self._indexed_noise = indexed
        try:
            with eval_mode(self), self.ema_weights() if use_ema else contextlib.nullcontext():
                chunks = []
                for start in range(0, n, chunk_size):
                    size = min(chunk_size, n - start)
                    if indexed is not None:
                        indexed.begin_chunk(start, size)
                    chunks.append(self.generate(size, generator))
        finally:
            self._indexed_noise = None
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
