"""The ``onestep`` command.

* ``onestep fit --config configs/<method> --data.dataset <dataset> [--trainer.max_steps N ...]``: LightningCLI;
  a method folder resolves to ``<kind>.yaml`` plus ``<dataset>.yaml`` when present (:mod:`onestep.config_layers`),
  a ``--config FILE`` is read as it is; every option can be overridden on the command line, ``--print_config``
  shows the result.
  ``--ckpt_path FILE`` resumes a checkpoint of the same model class, dataset and data shape (another is
  refused before training); ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the run's versions.
* ``onestep evaluate --ckpt_path FILE [--eval.*]``: the evaluation protocol on a checkpoint's EMA weights,
  model and data rebuilt from the checkpoint; one line per metric, a record appended to the run's
  ``eval.jsonl``.
* ``onestep benchmark --suite configs/suites/<name>.yaml --out <dir>``: methods x datasets x seeds.
* ``onestep report <dir>``: tables and figures of a benchmark directory.
* ``onestep train-features <dataset>``: train the LeNet feature network used for Fréchet distances.
* ``onestep --help`` lists the commands, ``onestep --version`` prints the version. Lightning's
  ``validate``/``test``/``predict`` are not offered (these models have no validation or predict step).
"""

from __future__ import annotations

import sys
from pathlib import Path

from onestep.callbacks.progress import StepProgress
from onestep.config_layers import expand_config_directories
from onestep.errors import check_config_files, report_errors, take_debug_flag
# `onestep fit` lives in onestep.fit; its names stay importable from here
from onestep.fit import CHECKPOINT_EVERY, TRAINER_DEFAULTS, OneStepCLI, _check_max_steps, _plain_ddp, run_lightning

__all__ = ["CHECKPOINT_EVERY", "COMMANDS", "TRAINER_DEFAULTS", "OneStepCLI", "main", "run_lightning",
           "_check_max_steps", "_plain_ddp"]

#: every subcommand with its one-line description (`onestep --help`)
COMMANDS = {
    "fit": "train one model: onestep fit --config configs/<method> --data.dataset DATASET [--trainer.* --model.* ...]",
    "evaluate": "score a checkpoint under the evaluation protocol: onestep evaluate --ckpt_path PATH [--eval.*]",
    "benchmark": "train and evaluate methods x datasets x seeds: onestep benchmark --suite SUITE.yaml",
    "report": "tables and figures of a benchmark directory: onestep report DIR",
    "train-features": "train the LeNet feature network of Fréchet distances: onestep train-features DATASET",
}


def print_help() -> None:
    from onestep import __version__

    print(f"usage: onestep {{{','.join(COMMANDS)}}} ... | --version\n\nonestep {__version__}: train, evaluate and "
          "compare one-step generative models.\n\ncommands:")
    for name, text in COMMANDS.items():
        print(f"  {name:<15} {text}")
    print("\n`onestep <command> --help` lists the options of a command.")


def main(argv: list[str] | None = None) -> int:
    """Every subcommand; an error becomes one line ``onestep: error: ...`` and exit status 2 (``--debug``:
    the traceback), see :mod:`onestep.errors`."""
    from_sys = argv is None
    argv, debug = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if from_sys:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    return report_errors(lambda: _run_command(argv, from_sys), debug)


def _run_command(argv: list[str], from_sys: bool) -> int:
    command = argv[0] if argv else ""
    if command in ("", "-h", "--help"):
        print_help()
        return 0
    if command in ("-V", "--version"):
        from onestep import __version__
        print(f"onestep {__version__}")
        return 0
    if command == "evaluate":
        from onestep.evaluate import main as evaluate_main
        return evaluate_main(argv[1:])
    if not command.startswith("-") and command not in COMMANDS:
        print(f"onestep: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
              "(`onestep --help`)", file=sys.stderr)
        return 2
    if command == "benchmark":
        from onestep.benchmark.runner import main as benchmark_main
        return benchmark_main(argv[1:])
    if command == "report":
        from onestep.benchmark.report import main as report_main
        return report_main(argv[1:])
    if command == "train-features":
        from onestep.metrics.features import main_train_features
        main_train_features(argv[1:])
        return 0
    # --config <method folder>: its <kind>.yaml + <dataset>.yaml; sys.argv keeps the user's own command (the
    # resume hint repeats it; DDP workers re-run it and expand it again)
    expanded = expand_config_directories(argv)
    check_config_files(expanded)
    cli = run_lightning(expanded)
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and trainer.is_global_zero:
        # not trainer.log_dir: that is a collective (broadcast) and the other ranks have finished already
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        summarised = any(isinstance(cb, StepProgress) for cb in trainer.callbacks)  # its summary names the run
        if log_dir and not summarised:
            print(f"onestep: log directory {Path(log_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
