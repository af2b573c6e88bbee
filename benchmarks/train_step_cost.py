"""Cost breakdown of one training step per method (coupling, anchors, teacher steps, backward, optimiser).

Each method is built and trained through the same LightningCLI as ``onestep fit`` (its config, batch 256 by
default) for ``--steps`` optimiser steps, with manual wall-clock timers installed on

* the Lightning hooks of the model: ``training_step`` (forward + loss), ``backward``, ``optimizer_step``
  (which *contains* the closure, i.e. training_step and backward, in automatic optimisation) and
  ``on_train_batch_end`` (the EMA update);
* every method the plugin's own classes define (``loss``, ``pair``, ``phi``, anchor/teacher helpers, ...),
  and those of any generator nested inside it (a teacher), found by introspection;
* every module-level function of the plugin's module and of the ``onestep`` modules it imports functions
  from (e.g. ``minibatch_ot`` -> ``ot_permutation`` -> ``pairwise_sq_dist``).

Times are *inclusive* (a piece includes the pieces it calls), averaged over the measured steps and shown
as milliseconds and as a share of the whole step (batch start to batch end). Steps are grouped by the set
of pieces they call, so a multi-stage method (autoencoder then distance net; teacher then student) gets one
breakdown per stage, numbered in the order they occur (a one-step group is a stage switch); the first
``--warmup`` steps of each stage are not measured.

    python benchmarks/train_step_cost.py [--dataset 8gaussians] [--steps 80] [--batch_size 256] [--threads 2]

``--against_bare`` measures instead the framework's whole cost per step against a bare PyTorch loop and a
minimal Lightning loop doing the same math (:mod:`step_overhead`: flow matching, independent coupling, EMA
and clipping off, the method's own network), alternating the three ``--repeats`` times:

    python benchmarks/train_step_cost.py --against_bare --threads 1 [--steps 3000] [--repeats 3]
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import threading
import time
from collections import defaultdict

from common import base_parser, config_args, discover_methods, fit_cli, print_table, save_result, setup
import torch
from lightning.pytorch import Callback

from onestep.generators.base import OneStepGenerator

HOOKS = ("training_step", "backward", "optimizer_step", "on_train_batch_end", "configure_gradient_clipping")
SKIP = {"generate", "sample", "sample_chunked", "setup", "on_load_checkpoint", "on_save_checkpoint",
        "configure_optimizers", "extra_eval_metrics", "__init__"}


class StepTimers(Callback):
    """Wall time per step and, per step, the inclusive time and calls of every wrapped piece.

    Pieces called on another thread (the coupling solved one batch ahead, see ``PairingPipeline``) run
    concurrently with the step: they are summed apart in ``background``, not charged to a step. ``cycles``
    holds the time from one batch start to the next, which adds the data fetch (and Lightning's loop) to
    the step."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] | None = None
        self.steps: list[tuple[float, dict[str, list[float]]]] = []
        self.cycles: list[float] = []
        self.background: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._start = 0.0

    def wrap(self, name: str, fn):
        timers = self

        def timed(*args, **kwargs):
            main = threading.current_thread() is threading.main_thread()
            if main and timers.current is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = timers.current.setdefault(name, [0.0, 0]) if main else timers.background[name]
                entry[0] += time.perf_counter() - start
                entry[1] += 1
        return timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.steps and len(self.cycles) < len(self.steps):
            self.cycles.append(now - self._start)
        self.current, self._start = {}, now

    def finish(self) -> None:
        """End of a step: called after the model's own ``on_train_batch_end`` (the EMA update), which
        Lightning runs after every callback's hook."""
        if self.current is not None:
            self.steps.append((time.perf_counter() - self._start, self.current))
            self.current = None

    def wrap_last_hook(self, fn):
        timed = self.wrap("on_train_batch_end", fn)

        def last(*args, **kwargs):
            try:
                return timed(*args, **kwargs)
            finally:
                self.finish()
        return last


def plugin_classes(obj) -> list[type]:
    """The plugin's own classes and mixins: its MRO up to ``OneStepGenerator`` (the framework's)."""
    mro = type(obj).__mro__
    return list(mro[:mro.index(OneStepGenerator)])


def plugin_methods(obj) -> list[str]:
    names = []
    for cls in plugin_classes(obj):
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("__") and name not in SKIP and name not in names:
                names.append(name)
    return names


def install(model, timers: StepTimers) -> list[tuple[object, str, object]]:
    """Wrap the pieces; returns the module attributes replaced, for :func:`restore`."""
    for hook in HOOKS:
        wrap = timers.wrap_last_hook if hook == "on_train_batch_end" else lambda fn, h=hook: timers.wrap(h, fn)
        setattr(model, hook, wrap(getattr(model, hook)))
    for name in plugin_methods(model):
        if name not in HOOKS:
            setattr(model, name, timers.wrap(name, getattr(model, name)))
    for child_name, child in model.named_modules():
        if child is not model and isinstance(child, OneStepGenerator):  # a nested teacher / stage model
            for name in plugin_methods(child):
                setattr(child, name, timers.wrap(f"{child_name}.{name}", getattr(child, name)))
    modules = {cls.__module__ for cls in plugin_classes(model)}
    for value in vars(sys.modules[type(model).__module__]).values():
        if inspect.isfunction(value) and value.__module__.startswith("onestep"):
            modules.add(value.__module__)
    replaced = []
    for module_name in sorted(modules):
        module = sys.modules[module_name]
        for name, value in list(vars(module).items()):
            if inspect.isfunction(value) and not name.startswith("_") and value.__module__.startswith("onestep"):
                replaced.append((module, name, value))
                setattr(module, name, timers.wrap(name, value))
    return replaced


def restore(replaced: list[tuple[object, str, object]]) -> None:
    for module, name, value in replaced:
        setattr(module, name, value)


def run_method(name: str, config, steps: int, batch_size: int, warmup: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cli = fit_cli([*config_args(config), *(f"--{item}" for item in extra)], steps, batch_size, tmp)
        timers = StepTimers()
        replaced = install(cli.model, timers)
        cli.trainer.callbacks.append(timers)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            restore(replaced)
    stages: dict[frozenset, list] = defaultdict(list)
    for number, (seconds, pieces) in enumerate(timers.steps):
        cycle = timers.cycles[number] if number < len(timers.cycles) else None
        stages[frozenset(pieces)].append((seconds, pieces, cycle))
    background = {piece: {"ms_per_step": 1e3 * sec / len(timers.steps), "calls_per_step": calls / len(timers.steps)}
                  for piece, (sec, calls) in sorted(timers.background.items(), key=lambda kv: -kv[1][0])}
    rows = []
    for index, measured in enumerate(stages.values()):  # dicts keep insertion order: stages in time order
        measured = measured[warmup:] if len(measured) > 2 * warmup else measured
        step_ms = 1e3 * sum(s for s, _, _ in measured) / len(measured)
        cycles = [c for _, _, c in measured if c is not None]
        cycle_ms = 1e3 * sum(cycles) / len(cycles) if cycles else None
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for _, pieces, _ in measured:
            for piece, (sec, calls) in pieces.items():
                totals[piece][0] += sec
                totals[piece][1] += calls
        breakdown = {piece: {"ms": 1e3 * sec / len(measured), "share": 1e3 * sec / len(measured) / step_ms,
                             "calls_per_step": calls / len(measured)}
                     for piece, (sec, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])}
        rows.append({"method": name, "stage": index, "steps_measured": len(measured), "step_ms": step_ms,
                     "cycle_ms": cycle_ms, "pieces": breakdown, "background_all_stages": background})
    return rows


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--dataset", default="8gaussians")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra fit options, e.g. model.init_args.teacher_steps=40 (to reach a later stage)")
    parser.add_argument("--against_bare", action="store_true",
                        help="the framework's step against a bare loop and a minimal Lightning loop (flow matching)")
    parser.add_argument("--repeats", type=int, default=3, help="--against_bare: alternations of the three loops")
    args = parser.parse_args()
    device = setup(args)
    if args.against_bare:
        return against_bare(args, device)
    rows = []
    for name, config in discover_methods(args.dataset, args.methods):
        try:
            rows += run_method(name, config, args.steps, args.batch_size, args.warmup, args.set)
        except Exception as err:  # noqa: BLE001 - report and go on
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"[:300]})
    for row in rows:
        if "error" in row:
            print(f"{row['method']}: ERROR {row['error']}")
            continue
        cycle = f", {row['cycle_ms']:.2f} ms batch start to batch start" if row["cycle_ms"] else ""
        print(f"\n{row['method']} stage {row['stage']}: {row['step_ms']:.2f} ms/step{cycle} "
              f"({row['steps_measured']} steps measured)")
        print_table([{"piece": k, **v} for k, v in row["pieces"].items()], ["piece", "ms", "share", "calls_per_step"])
        if row["background_all_stages"]:
            print("  on a background thread, overlapping the steps (ms per step, all stages):")
            print_table([{"piece": k, **v} for k, v in row["background_all_stages"].items()],
                        ["piece", "ms_per_step", "calls_per_step"])
    save_result("train_step_cost", {"dataset": args.dataset, "batch_size": args.batch_size, "set": args.set, "rows": rows,
                                    "target": "OT coupling <= 25% of an OT-NFM step at batch 256"}, args.out)


def against_bare(args, device) -> None:
    from step_overhead import compare

    (name, config), = discover_methods(args.dataset, ["flow_matching"])
    steps = args.steps if args.steps > 80 else 3000  # the per-piece default (80) is too short for a ratio
    result = compare(config_args(config), steps, args.batch_size, warmup=min(max(args.warmup, 200), steps // 4),
                     repeats=args.repeats, device=device)
    ms = result["ms_per_step"]
    print(f"{args.dataset} on {device}, batch {args.batch_size}, {steps} steps x {args.repeats} alternations, "
          f"{torch.get_num_threads()} thread(s): onestep {ms['onestep']:.2f} ms/step, minimal Lightning "
          f"{ms['lightning']:.2f}, bare loop {ms['bare']:.2f}; onestep / bare = {result['onestep_over_bare']:.2f}x "
          f"(Lightning's own floor {result['lightning_over_bare']:.2f}x; target {result['target']})")
    save_result("train_step_overhead", {"dataset": args.dataset, **result}, args.out)


if __name__ == "__main__":
    main()
