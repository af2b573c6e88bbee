"""What a researcher sees: progress, evaluation lines and summary of `fit`, Ctrl-C with a resume command, the
checkpoint interval option, the benchmark heartbeat and Ctrl-C, option help, pictures and report marks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from conftest import REPO
from onestep.benchmark.tables import dataset_table, saturated
from onestep.callbacks.fault import PreemptionCheckpoint, resume_hint
from onestep.callbacks.progress import Heartbeat, StepProgress
from onestep.cli import CHECKPOINT_EVERY, TRAINER_DEFAULTS, main, run_lightning
from onestep.data import DATASETS

TINY_FIT = ["fit", "--config", str(REPO / "configs/flow_matching"), "--data.dataset", "8gaussians",
            "--model.init_args.backbone", "{name: mlp, hidden: [16, 16]}", "--model.init_args.steps", "2",
            "--model.init_args.coupling", "independent", "--data.batch_size", "32", "--data.n_train", "256"]
NO_EVAL = ["--eval.every_n_steps", "0", "--eval.at_end", "false", "--trainer.enable_progress_bar", "false"]


@pytest.fixture
def sigint_raises():
    """Ctrl-C behaves as in a terminal even when the test runner was started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class StartedMarker(Callback):
    """Writes ``path`` (atomically) once training has reached ``step``: the test's sign that training runs."""

    def __init__(self, path: str, step: int = 3) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not os.path.exists(self.path):
            tmp = f"{self.path}.tmp"
            Path(tmp).write_text(str(trainer.global_step))
            os.replace(tmp, self.path)


class FirstStep(Callback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first = trainer.global_step


# ------------------------------------------------------------------------------------------ Ctrl-C in fit
def test_ctrl_c_during_fit_writes_last_ckpt_prints_the_resume_command_and_the_run_continues(tmp_path):
    marker = tmp_path / "started"
    callbacks = "[{class_path: test_feedback.StartedMarker, init_args: {path: '%s', step: 3}}]" % marker
    args = [*TINY_FIT, *NO_EVAL, "--out_dir", str(tmp_path / "runs"), "--trainer.callbacks", callbacks]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, "-m", "onestep.cli", *args, "--trainer.max_steps", "100000"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.monotonic() + 900  # a hang guard, not a timing check: loaded CI machines are slow
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)  # polling a condition, not waiting a fixed time
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = next(tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt"))
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 3 and f"received SIGINT at step {step}; checkpoint written to {last}" in err
    for chatter in ("GPU available", "TPU available", "litlogger", "LeafSpec"):  # silenced
        assert chatter not in err, err[-2000:]
    command = re.search(r"Resume with: (onestep fit .*)$", err, re.MULTILINE).group(1)
    resume_args = shlex.split(command)[1:]
    assert resume_args == [*args, "--trainer.max_steps", "100000", "--ckpt_path", str(last)]

    first = FirstStep()
    resumed = run_lightning(resume_args[1:-2] + ["--trainer.max_steps", str(step + 4),
                                                 "--out_dir", str(tmp_path / "resumed")], run=False)
    resumed.trainer.callbacks.append(first)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=resume_args[-1])
    assert first.first == step and resumed.trainer.global_step == step + 4


def test_second_ctrl_c_stops_at_once_and_an_ignored_sigint_stays_ignored(sigint_raises):
    callback = PreemptionCheckpoint()
    callback.on_train_start(None, None)
    try:
        callback._handler(signal.SIGINT, None)  # first Ctrl-C: only recorded (checkpoint at the next batch)
        assert callback.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            callback._handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        callback._restore_handlers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    callback.on_train_start(None, None)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.SIGINT not in callback._previous
    callback._restore_handlers()


def test_resume_hint_replaces_the_checkpoint_option_and_quotes_for_the_shell():
    argv = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--model.init_args.backbone", "{name: mlp}",
            "--ckpt_path=older.ckpt"]
    hint = resume_hint("runs/x/last.ckpt", argv)
    assert shlex.split(hint.removeprefix("Resume with: ")) == [
        "onestep", "fit", "--config", "a b.yaml", "--model.init_args.backbone", "{name: mlp}", "--ckpt_path",
        "runs/x/last.ckpt"]
    assert resume_hint("l.ckpt", ["benchmark", "--suite", "s.yaml"]) == "Resume with: onestep benchmark --suite s.yaml"


# ------------------------------------------------------------------------------------------ checkpoint interval
def test_checkpoint_every_sets_the_interval_and_does_not_leak_into_the_next_run(tmp_path):
    main([*TINY_FIT, *NO_EVAL, "--out_dir", str(tmp_path), "--trainer.max_steps", "9", "--checkpoint_every", "4"])
    names = sorted(p.name for p in tmp_path.glob("*/version_0/checkpoints/*.ckpt"))
    assert names == ["last.ckpt", "step4.ckpt", "step8.ckpt"]
    run_lightning([*TINY_FIT[1:], *NO_EVAL, "--out_dir", str(tmp_path / "b")], run=False)
    default = next(cb for cb in TRAINER_DEFAULTS["callbacks"] if hasattr(cb, "_every_n_train_steps"))
    assert default._every_n_train_steps == CHECKPOINT_EVERY
    with pytest.raises(ValueError, match=r"--checkpoint_every=0 is not allowed"):
        run_lightning([*TINY_FIT[1:], *NO_EVAL, "--checkpoint_every", "0"], run=False)


# ------------------------------------------------------------------------------------------ fit's output
def test_fit_log_is_plain_bounded_and_ends_with_a_summary(tmp_path, capfd):
    """Not a terminal: no carriage returns, a log of a few lines for 300 steps, one line per evaluation,
    a summary with the headline metrics, run directory and pictures. (Lightning's chatter is checked on a real
    process's stderr in the Ctrl-C test: in-process, pytest's own log and warning capture hides it.)"""
    main([*TINY_FIT, "--out_dir", str(tmp_path), "--trainer.max_steps", "300", "--eval.every_n_steps", "100",
          "--eval.n_samples", "128", "--eval.w2_max_samples", "128"])
    out, err = capfd.readouterr()
    log = out + err
    assert "\r" not in log
    assert len(log.encode()) < 3000, log  # was 58 KB with Lightning's bar
    for text in ("step 300/300", "eval at step 100: w2 ", "eval at step 200: w2 ", "final evaluation (step 300): w2 ",
                 "run directory: ", "pictures: ", "samples_step300.png"):
        assert text in out, (text, out)


def _fake_trainer(step: int, max_steps: int):
    return SimpleNamespace(global_step=step, max_steps=max_steps, progress_bar_metrics={"train/loss": 0.5},
                           is_global_zero=True, datamodule=SimpleNamespace(dataset="moons2d"), callbacks=[],
                           logger=None)


@pytest.mark.parametrize("tty", [False, True])
def test_step_progress_rate_is_bounded_by_time_not_steps(tty):
    """10,000 steps: a plain log (1 s per step) gets at most one line per 30 s plus one per 10 %; a terminal
    (0.1 s per step) gets the line redrawn in place (carriage returns, no new lines) at most every 0.5 s."""
    now, seconds_per_step = [0.0], 0.1 if tty else 1.0
    stream = io.StringIO()
    bar = StepProgress(stream=stream, is_tty=tty, clock=lambda: now[0])
    trainer = _fake_trainer(0, 10_000)
    bar.on_train_start(trainer, SimpleNamespace())
    for step in range(1, 10_001):
        now[0] += seconds_per_step
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step)
    text = stream.getvalue()
    lines = text.count("\n")
    if tty:
        assert lines == 1 and 1000 <= text.count("\r") <= 10_000 * 0.1 / 0.5 + 2  # header, then redraws
        assert "step 10000/10000 (100%)" in text.split("\r")[-1] and "ETA 0s" in text.split("\r")[-1]
    else:
        assert "\r" not in text and lines <= 1 + 10_000 // 30 + 11, lines
        assert "step 5000/10000 (50%)" in text and "ETA 1h23m20s" in text  # 5,000 s left at 1 step/s


# ------------------------------------------------------------------------------------------ benchmark
def test_heartbeat_prints_at_most_every_interval_with_step_and_eta():
    now, lines = [0.0], []
    beat = Heartbeat("flow-8gaussians-s0", interval=30, clock=lambda: now[0], log=lines.append)
    assert beat.beat(0, 100) is None  # starts the clock
    for step in range(1, 100):
        now[0] = float(step)  # one step per second
        beat.beat(step, 100)
    assert lines == ["  flow-8gaussians-s0: step 30/100, ETA 1m10s", "  flow-8gaussians-s0: step 60/100, ETA 40s",
                     "  flow-8gaussians-s0: step 90/100, ETA 10s"]
    assert beat.beat(100, 100) is None  # 10 s after the last line
    now[0] = 130.0
    assert beat.beat(100, 100_000, time_left=65.0) == "  flow-8gaussians-s0: step 100/100000, ETA 1m05s"  # time budget


class SigintAtStep(Callback):
    """Stands in for the heartbeat of the cells whose name ends with ``-s1``: Ctrl-C at step 3."""

    def __init__(self, label: str, *args, **kwargs) -> None:
        self.label = label

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.label.endswith("-s1") and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_benchmark_says_what_finished_and_how_to_resume(tmp_path, monkeypatch, capsys, sigint_raises):
    import onestep.benchmark.cell as cell_module
    from onestep.benchmark.runner import main as benchmark_main

    suite = {"name": "tiny", "methods": [{"name": "flow", "config": str(REPO / "configs/flow_matching"),
                                          "overrides": {"model.init_args.steps": 2}}],
             "datasets": ["8gaussians"], "seeds": [0, 1], "budget": {"max_steps": 8}, "data": {"n_train": 512},
             "eval": {"n_samples": 128, "w2_max_samples": 128, "final_samples": 128}}
    suite_path = tmp_path / "s.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    argv = ["--suite", str(suite_path), "--out", str(tmp_path / "out"), "--no-report"]
    monkeypatch.setattr(cell_module, "HeartbeatCallback", SigintAtStep)
    assert benchmark_main(argv) == 130
    out = capsys.readouterr().out
    assert "interrupted in flow-8gaussians-s1" in out and "finished now: flow-8gaussians-s0 (ok)" in out
    assert "left: flow-8gaussians-s1" in out
    assert f"resume with: onestep {shlex.join(['benchmark', *argv])}" in out
    last = next((tmp_path / "out/runs/flow-8gaussians-s1").glob("version_*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    monkeypatch.undo()
    assert benchmark_main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "out/results.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["status"]) for r in records] == [(0, "ok"), (1, "ok")]
    assert records[1]["resumed_from"] == str(last) and records[1]["budget"]["used"]["steps"] == 8


def test_report_command_line_is_shell_quoted():
    from onestep.benchmark.report import _header

    data = {"suite": {"name": "s"}, "records": [], "seeds": [0],
            "run_info": {"invocations": [{"argv": ["onestep", "benchmark", "--suite", "my suite.yaml"]}]}}
    command = dict(_header(data))["command"]
    assert command.startswith("onestep benchmark --suite 'my suite.yaml'  (started")


# ------------------------------------------------------------------------------------------ options and files
def test_eval_options_have_descriptions_and_choices_and_datasets_are_listed(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--eval.reference_split {train,val,test}" in text and "data split the samples are compared with" in text
    for option in ("every_n_steps", "n_samples", "feature_space", "w2_max_samples", "offmanifold_threshold", "seed",
                   "prdc_k", "feature_weights_path"):
        entries = re.findall(rf"--eval\.{option} [A-Z0-9_]+(?:, --eval\.{option}\+ [A-Z0-9_]+)? ([^\[]*?)\(type:", text)
        assert entries and len(entries[-1].split()) >= 3, (option, entries)  # a description before "(type: ..."
    dataset_help = text.split("--data.dataset DATASET ", 1)[1].split("--data.", 1)[0]
    assert all(name in dataset_help for name in DATASETS), dataset_help
    assert "--checkpoint_every CHECKPOINT_EVERY training steps between two checkpoints" in text


def test_train_features_refuses_to_overwrite_the_shipped_weights(tmp_path, capsys):
    from onestep.metrics.features import WEIGHTS_DIR, main_train_features

    shipped = WEIGHTS_DIR / "lenet-mnist.pt"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    for argv in (["mnist"], ["mnist", "--out", str(shipped)]):  # --root: training would fail at once, not run
        with pytest.raises(SystemExit) as refused:
            main_train_features([*argv, "--root", str(tmp_path / "no-data"), "--epochs", "1"])
        assert refused.value.code == 2
        assert "is the shipped lenet-mnist weights file" in capsys.readouterr().err
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before


# ------------------------------------------------------------------------------------------ tables and figures
def _record(method: str, w2: float, offmanifold: float) -> dict:
    return {"method": method, "_values": {"w2": w2, "offmanifold": offmanifold}}


def test_no_best_mark_on_a_metric_saturated_at_its_floor():
    records = [_record("a", 0.10, 0.990), _record("b", 0.20, 0.985), _record("c", 0.30, 0.992)]
    floors = [("data floor", {"metrics": {"w2": 0.05, "offmanifold": 0.99}})]
    table = dataset_table(records, ["a", "b", "c"], 1, floors)
    column = {label: i for i, label in enumerate(table.columns)}
    bold = {label: [row[column[label]][1] for row in table.rows[:3]] for label in ("W2", "off-manifold")}
    assert bold["W2"] == [True, False, False]
    assert bold["off-manifold"] == [False, False, False]
    assert any("No best marked for off-manifold" in note for note in table.notes)
    assert saturated([0.5, 0.505]) and saturated([0.2], floor=0.201) and not saturated([0.5, 0.6], floor=0.1)


def test_log_axes_read_as_plain_numbers():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from onestep.benchmark.figures import plain_log_axis

    for lo, hi in ((0.011, 0.045), (1, 100), (0.2, 3000)):
        fig = Figure()
        ax = fig.add_subplot()
        ax.plot([lo, hi], [lo, hi])
        ax.set_xscale("log"), ax.set_yscale("log")
        plain_log_axis(ax.xaxis), plain_log_axis(ax.yaxis)
        FigureCanvasAgg(fig).draw()
        labels = [t.get_text() for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()]
        shown = [float(t) for t in labels if t]
        assert len([v for v in shown if lo <= v <= hi]) >= 2, (lo, hi, labels)
        assert all(re.fullmatch(r"[0-9.]+", t) for t in labels if t), labels
