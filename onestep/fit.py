"""``onestep fit``: the LightningCLI that builds and trains one model (also used by every benchmark cell).

``run_lightning(args, run)`` builds :class:`OneStepCLI` over every ``OneStepGenerator`` and the
``OneStepDataModule`` with the shared :data:`TRAINER_DEFAULTS`; :mod:`onestep.cli` dispatches ``onestep fit``
to it and :mod:`onestep.benchmark.cell` calls it with ``run=False`` (a module of its own, so that neither
of those two imports the other).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from onestep.callbacks import EvaluationCallback
from onestep.callbacks.fault import NonFiniteGuard, PreemptionCheckpoint, check_checkpoint_file
from onestep.callbacks.loggers import make_loggers
from onestep.callbacks.progress import add_progress_bar, quiet_lightning
from onestep.callbacks.reliability import ExactCheckpoint, ResumableRNG
from onestep.checkpoints import check_data_shape, check_fit_checkpoint, resolve_last
from onestep.config_layers import expand_config_directories
from onestep.data import OneStepDataModule
from onestep.errors import check_writable_dir
from onestep.generators import OneStepGenerator

#: Steps between two periodic checkpoints, unless `--checkpoint_every N` says otherwise.
CHECKPOINT_EVERY = 1000

#: The trainer defaults every method shares (one place; a config or the command line overrides them).
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 2000,
    "max_epochs": -1,
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 50,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    # reliability: RNG states in checkpoints, stop on NaN/inf, checkpoint on SIGTERM/SIGUSR1/Ctrl-C; ExactCheckpoint
    # is a ModelCheckpoint whose files capture the state between two batches (exact resume). These callbacks are
    # always added (LightningCLI appends them to --trainer.callbacks); `--checkpoint_every N` sets the interval.
    "callbacks": [ResumableRNG(), NonFiniteGuard(), PreemptionCheckpoint(),
                  ExactCheckpoint(filename="step{step}", save_last=True, every_n_train_steps=CHECKPOINT_EVERY,
                                  save_top_k=-1, auto_insert_metric_name=False)],
}


def _plain_ddp(trainer_cfg: Any) -> bool:
    """Whether the trainer options ask for DDP by name, or for ``auto`` on several devices or nodes."""
    strategy, devices = trainer_cfg.get("strategy"), trainer_cfg.get("devices")
    if strategy == "ddp":
        return True
    if strategy != "auto":
        return False
    if int(trainer_cfg.get("num_nodes") or 1) > 1:
        return True
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() > 1
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) > 1
    try:
        return int(devices) > 1
    except (TypeError, ValueError):
        return False


def _check_max_steps(max_steps: Any) -> None:
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ValueError(f"--trainer.max_steps={max_steps} is not allowed; use an integer >= 1 "
                         "(or -1 with --trainer.max_epochs set)")


class OneStepCLI(LightningCLI):
    """LightningCLI with the datamodule's shape linked into the model, evaluation and loggers."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # only `fit`: Lightning's validate/test/predict need steps these models do not have (`onestep evaluate`)
        return {"fit": LightningCLI.subcommands()["fit"]}

    def init_parser(self, **kwargs: Any):
        # a bad option raises (reported by onestep.errors as one line) instead of printing usage and exiting
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_lightning_class_args(EvaluationCallback, "eval")
        parser.add_argument("--out_dir", type=str, default="runs", help="root folder of run directories")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="run name (default: <method>-<dataset>)")
        parser.add_argument("--wandb", type=bool, default=False, help="also log to Weights & Biases")
        parser.add_argument("--wandb_project", type=str, default="onestep")
        parser.add_argument("--wandb_group", type=str | None, default=None)
        parser.add_argument("--checkpoint_every", type=int, default=CHECKPOINT_EVERY,
                            help="training steps between two checkpoints step<k>.ckpt (last.ckpt follows each); "
                                 "under manual optimisation, generator updates")

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_writable_dir("--out_dir", cfg.get("out_dir", "runs"))
        quiet_lightning()
        every = cfg.get("checkpoint_every", CHECKPOINT_EVERY)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"--checkpoint_every={every!r} is not allowed; use an integer >= 1 (training steps)")
        for callback in TRAINER_DEFAULTS["callbacks"]:  # shared instances: set on every run, never left over
            if isinstance(callback, ExactCheckpoint):
                callback._every_n_train_steps = every
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        add_progress_bar(kwargs, init.trainer, cfg.trainer.get("enable_progress_bar"))
        if cfg.trainer.get("logger") in (None, True):
            method = type(self.model).__name__.lower()
            label = getattr(self.datamodule, "dataset_label", self.datamodule.dataset)  # a file: its name
            name = cfg.get("run_name") or f"{method}-{label}"
            kwargs["logger"] = make_loggers(
                save_dir=cfg.get("out_dir", "runs"), name=name, wandb=cfg.get("wandb", False),
                project=cfg.get("wandb_project", "onestep"), group=cfg.get("wandb_group"),
                tags=[method, label], config=cfg.as_dict())
        if cfg.trainer.get("plugins") is None and SLURMEnvironment.detect():
            # PreemptionCheckpoint answers SIGUSR1 (checkpoint between two batches, exit 0); Lightning's own SLURM
            # handler would also requeue the job from outside training, on top of the job script or submitit
            # (--launcher slurm) doing it: a second copy of the job. One requeue, theirs.
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
        if getattr(self.model, "trains_in_stages", False) and _plain_ddp(cfg.trainer):
            # the parameters of the stage not being trained get no gradient; plain DDP stops on that
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        return super().instantiate_trainer(**kwargs)


    def before_instantiate_classes(self) -> None:
        """Refuse a bad step count before anything is built (Lightning's own message names no option)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        _check_max_steps(cfg.trainer.get("max_steps"))

    def before_fit(self) -> None:
        """Fail before any training: bad step counts, missing or corrupted data files."""
        _check_max_steps(self.trainer.max_steps)
        self.datamodule.setup("fit")  # reads (and validates) the data files now, not mid-run
        if getattr(self, "_ckpt_identity", None) is not None:
            check_data_shape(self._ckpt_identity, self.datamodule.data_shape)

    def parse_arguments(self, parser, args) -> None:
        """Parse, then report a missing, truncated or corrupted ``--ckpt_path`` before it is read (LightningCLI
        reads the checkpoint's hyperparameters right after parsing)."""
        with warnings.catch_warnings():
            # `onestep fit` passes its expanded command as `args` and keeps the user's in sys.argv on purpose
            # (the resume hint repeats it, DDP workers re-run it): Lightning's warning about both is noise
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand) if subcommand else None
        if cfg is not None:
            resolve_last(cfg)  # `last`: the newest last.ckpt of this run's versions, or an error
        path = cfg.get("ckpt_path") if cfg is not None else None
        if path and str(path) not in ("last", "best", "hpc", "registry"):
            weights_only = cfg.get("weights_only")
            check_checkpoint_file(path, weights_only=True if weights_only is None else bool(weights_only))
        # refuse a checkpoint of another model class or dataset now: LightningCLI would let its hyperparameters win
        self._ckpt_identity = check_fit_checkpoint(cfg) if path else None


def run_lightning(args: list[str] | None = None, run: bool = True) -> OneStepCLI:
    """The CLI over ``args`` (None: ``sys.argv``, expanded by :func:`onestep.cli.main`); a ``--config <method
    folder>`` in ``args`` becomes its ``<kind>.yaml`` and ``<dataset>.yaml`` (:mod:`onestep.config_layers`)."""
    if isinstance(args, list):
        args = expand_config_directories(args)
    return OneStepCLI(
        OneStepGenerator, OneStepDataModule, subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=0, args=args, run=run,
        save_config_kwargs={"overwrite": True},
    )
