"""Bad input, as a new user types it, through the real ``onestep`` entry point.

Every case must end with exit status 2 (or 1 for a benchmark whose cells failed), print no traceback, end
its output with one line that names the option or file and says what to write instead, and stop before
training: no optimizer step (a spy on ``training_step``), no checkpoint, no ``eval.jsonl``.
Most cases run in-process through ``onestep.cli.main(argv)``; a few run ``python -m onestep.cli`` in a
real process to check the exit status the shell sees and ``--debug``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from onestep.cli import main
from onestep.data import write_idx
from onestep.generators.base import OneStepGenerator

CONFIGS = REPO / "configs"


def fit(method: str = "otnfm", dataset: str = "8gaussians", *extra: str) -> list[str]:
    """A tiny ``onestep fit`` (64 points, 2 steps) that would train in a second if the input were good."""
    return ["fit", "--config", str(CONFIGS / method), "--data.dataset", dataset, "--trainer.max_steps", "2",
            "--data.n_train", "64", "--data.batch_size", "16", "--eval.n_samples", "64",
            "--eval.every_n_steps", "0", "--trainer.enable_progress_bar", "false", *extra]


def fit_images(root: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "otnfm"), "--data.dataset", "mnist", "--trainer.max_steps", "2",
            "--data.n_train", "8", "--data.batch_size", "4", "--data.n_val", "4", "--data.n_test", "4",
            "--eval.n_samples", "8", "--eval.every_n_steps", "0", "--data.root", root, *extra]


def tiny_mnist(root: Path, truncate: bool = False) -> Path:
    """A 12-image MNIST in the real IDX format (optionally with the training images cut short)."""
    raw = root / "mnist" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, 12, dtype=np.uint8))
    if truncate:
        import gzip
        path = raw / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:5000]))
    return root


def write_yaml(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def suite(tmp: Path, **changes) -> str:
    raw = {"name": "bad", "methods": [{"name": "otnfm", "config": str(CONFIGS / "otnfm")}],
           "datasets": ["8gaussians"], "seeds": [0], "budget": {"max_steps": 2},
           "data": {"n_train": 64, "batch_size": 16}, "eval": {"n_samples": 64, "w2_max_samples": 64}}
    raw.update(changes)
    return write_yaml(tmp / "suite.yaml", raw)


def bench(tmp: Path, *extra: str, **changes) -> list[str]:
    return ["benchmark", "--suite", suite(tmp, **changes), "--out", str(tmp / "bench"), "--no-report",
            "--threads", "1", *extra]


# (case id, argv builder (tmp_path -> argv), words the last line must hold: the option or file, and the fix)
CASES = [
    # ------------------------------------------------------------------ data module
    ("dataset-unknown", lambda t: fit("otnfm", "8gaussians", "--data.dataset", "nope"),
     ["dataset", "is not a known dataset", "register_manifold"]),
    ("n_train-0", lambda t: fit("otnfm", "8gaussians", "--data.n_train", "0"), ["n_train", ">= 1"]),
    ("n_train-negative", lambda t: fit("otnfm", "8gaussians", "--data.n_train", "-5"), ["n_train", ">= 1"]),
    ("n_train-text", lambda t: fit("otnfm", "8gaussians", "--data.n_train", "many"), ["--data.n_train", "integer"]),
    ("batch-0", lambda t: fit("otnfm", "8gaussians", "--data.batch_size", "0"), ["batch_size", ">= 1"]),
    ("batch-huge", lambda t: fit("otnfm", "8gaussians", "--data.batch_size", "20000"),
     ["--data.batch_size=20000", "64 samples", "<= 64"]),
    ("batch-float", lambda t: fit("otnfm", "8gaussians", "--data.batch_size", "1.5"), ["--data.batch_size", "integer"]),
    ("n_val-0", lambda t: fit("otnfm", "8gaussians", "--data.n_val", "0"), ["n_val", ">= 1"]),
    ("n_test-0", lambda t: fit("otnfm", "8gaussians", "--data.n_test", "0"), ["n_test", ">= 1"]),
    ("noise-negative", lambda t: fit("otnfm", "8gaussians", "--data.noise_std", "-1"), ["noise_std", ">= 0"]),
    ("noise-nan", lambda t: fit("otnfm", "8gaussians", "--data.noise_std", "nan"), ["--data.noise_std", "finite"]),
    ("noise-inf-yaml", lambda t: fit("otnfm", "8gaussians", "--data.noise_std", ".inf"), ["noise_std", "finite"]),
    ("data-seed-negative", lambda t: fit("otnfm", "8gaussians", "--data.seed", "-1"), ["seed", "2**63"]),
    ("workers-negative", lambda t: fit("otnfm", "8gaussians", "--data.num_workers", "-1"), ["num_workers", ">= 0"]),
    ("image-size-0", lambda t: fit("otnfm", "8gaussians", "--data.image_size", "0"), ["image_size", ">= 1"]),
    ("mnist-root-missing", lambda t: fit_images(str(t / "nowhere")), ["train-images", "--data.root"]),
    ("mnist-idx-truncated", lambda t: fit_images(str(tiny_mnist(t / "data", truncate=True))),
     ["train-images-idx3-ubyte.gz", "download it again"]),
    ("mnist-noise", lambda t: fit_images(str(tiny_mnist(t / "data")), "--data.noise_std", "0.1"),
     ["noise_std", "leave it unset"]),
    ("image-folder-missing", lambda t: fit("otnfm", "8gaussians", "--data.dataset", "image_folder", "--data.root",
                                           str(t / "no_images"), "--model.init_args.backbone", "{name: mlp}"),
     ["no_images", "image"]),
    # ------------------------------------------------------------------ model options, every method
    ("lr-nan", lambda t: fit("otnfm", "8gaussians", "--model.init_args.lr", "nan"),
     ["--model.init_args.lr", "finite", "lr must be > 0"]),
    ("lr-inf", lambda t: fit("otnfm", "8gaussians", "--model.init_args.lr", "inf"),
     ["--model.init_args.lr", "finite", "lr must be > 0"]),
    ("lr-yaml-nan", lambda t: fit("otnfm", "8gaussians", "--model.init_args.lr", ".nan"),
     ["lr=nan", "finite", "lr must be > 0"]),
    ("lr-negative", lambda t: fit("otnfm", "8gaussians", "--model.init_args.lr=-1e-3"), ["lr must be > 0"]),
    ("lr-zero", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.lr", "0"), ["lr must be > 0"]),
    ("lr-text", lambda t: fit("magt", "8gaussians", "--model.init_args.lr", "fast"),
     ["--model.init_args.lr", "finite number"]),
    ("ema-above-1", lambda t: fit("otnfm", "8gaussians", "--model.init_args.ema_decay", "1.5"),
     ["ema_decay", "[0, 1)"]),
    ("ema-negative", lambda t: fit("magt", "8gaussians", "--model.init_args.ema_decay", "-0.1"),
     ["ema_decay", "[0, 1)"]),
    ("ema-inf", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.ema_decay", "inf"),
     ["--model.init_args.ema_decay", "finite", "[0, 1)"]),
    ("weight-decay-negative", lambda t: fit("otnfm", "8gaussians", "--model.init_args.weight_decay", "-1"),
     ["weight_decay", ">= 0"]),
    ("grad-clip-negative", lambda t: fit("otnfm", "8gaussians", "--model.init_args.grad_clip", "-1"),
     ["grad_clip", ">= 0"]),
    ("warmup-negative", lambda t: fit("otnfm", "8gaussians", "--model.init_args.warmup_steps", "-1"),
     ["warmup_steps", ">= 0"]),
    ("schedule-unknown", lambda t: fit("otnfm", "8gaussians", "--model.init_args.lr_schedule", "linear"),
     ["lr_schedule", "cosine"]),
    ("betas-one", lambda t: fit("otnfm", "8gaussians", "--model.init_args.betas", "[0.9]"), ["betas"]),
    ("backbone-glued-yaml", lambda t: fit("otnfm", "8gaussians", "--model.init_args.backbone", "{name:mlp}"),
     ["--model.init_args.backbone", "key: value", "{name: mlp}"]),
    ("backbone-unknown", lambda t: fit("otnfm", "8gaussians", "--model.init_args.backbone", "{name: transformer}"),
     ["transformer", "known backbones"]),
    ("backbone-no-name", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.backbone", "{hidden: [8]}"),
     ["no 'name'", "choose one of"]),
    ("backbone-bad-width", lambda t: fit("otnfm", "8gaussians", "--model.init_args.backbone",
                                         "{name: mlp, hidden: [-3]}"), ["backbone 'mlp'", "positive integers"]),
    ("backbone-unknown-arg", lambda t: fit("magt", "8gaussians", "--model.init_args.backbone",
                                           "{name: mlp, width: 3}"), ["width", "accepted"]),
    ("backbone-unet-on-vectors", lambda t: fit("otnfm", "8gaussians", "--model.init_args.backbone", "{name: unet}"),
     ["unet", "mlp"]),
    ("otnfm-coupling", lambda t: fit("otnfm", "8gaussians", "--model.init_args.coupling", "sinkhorn"),
     ["coupling must be one of", "minibatch"]),
    ("otnfm-p_t1", lambda t: fit("otnfm", "8gaussians", "--model.init_args.p_t1", "2"), ["p_t1", "[0, 1]"]),
    ("fm-steps-0", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.steps", "0"), ["steps", ">= 1"]),
    ("fm-sigma-negative", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.sigma", "-1"),
     ["sigma", ">= 0"]),
    ("fm-coupling", lambda t: fit("flow_matching", "8gaussians", "--model.init_args.coupling", "nope"),
     ["coupling must be one of"]),
    ("magt-sigma-0", lambda t: fit("magt", "8gaussians", "--model.init_args.sigma", "0"), ["sigma", "> 0"]),
    ("magt-proposal", lambda t: fit("magt", "8gaussians", "--model.init_args.proposal", "nope"),
     ["proposal must be one of"]),
    ("characteristic-t-range", lambda t: fit("characteristic", "8gaussians", "--model.init_args.t_min", "0.9",
                                             "--model.init_args.t_max", "0.5"), ["t_min", "t_max"]),
    ("characteristic-mode", lambda t: fit("characteristic", "8gaussians", "--model.init_args.mode", "nope"),
     ["mode must be one of"]),
    ("lmppm-latent-0", lambda t: fit("lmppm", "8gaussians", "--model.init_args.latent_dim", "0"),
     ["latent_dim", ">= 1"]),
    ("lmppm-alpha", lambda t: fit("lmppm", "8gaussians", "--model.init_args.alpha", "2"), ["alpha", "[0, 1]"]),
    ("lmppm-bandwidth-rule", lambda t: fit("lmppm", "8gaussians", "--model.init_args.bandwidth_rule", "nope"),
     ["bandwidth_rule must be one of"]),
    ("class-path-missing-module", lambda t: fit("otnfm", "8gaussians", "--model.class_path", "nope_pkg.Gen"),
     ["--model.class_path=nope_pkg.Gen", "importable"]),
    ("class-path-unknown-class", lambda t: fit("otnfm", "8gaussians", "--model.class_path",
                                               "onestep.generators.NoSuchMethod"), ["NoSuchMethod", "importable"]),
    ("model-unknown-option", lambda t: fit("otnfm", "8gaussians", "--model.init_args.learning_rate", "1e-3"),
     ["learning_rate", "--model.help OTNFM"]),
    # ------------------------------------------------------------------ trainer
    ("max-steps-0", lambda t: fit("otnfm", "8gaussians", "--trainer.max_steps", "0"),
     ["--trainer.max_steps=0", ">= 1"]),
    ("max-steps-negative", lambda t: fit("otnfm", "8gaussians", "--trainer.max_steps", "-5"),
     ["--trainer.max_steps=-5", ">= 1"]),
    ("max-steps-text", lambda t: fit("otnfm", "8gaussians", "--trainer.max_steps", "lots"),
     ["--trainer.max_steps", "integer"]),
    ("trainer-unknown-option", lambda t: fit("otnfm", "8gaussians", "--trainer.learning_rate", "3"),
     ["learning_rate", "--help"]),
    # ------------------------------------------------------------------ evaluation protocol
    ("eval-n-1", lambda t: fit("otnfm", "8gaussians", "--eval.n_samples", "1"), ["--eval.n_samples=1", ">= 6"]),
    ("eval-n-0", lambda t: fit("otnfm", "8gaussians", "--eval.n_samples", "0"), ["--eval.n_samples=0", ">= 6"]),
    ("eval-n-below-prdc-k", lambda t: fit("otnfm", "8gaussians", "--eval.n_samples", "10", "--eval.prdc_k", "10"),
     ["--eval.n_samples=10", ">= 11"]),
    ("eval-split", lambda t: fit("otnfm", "8gaussians", "--eval.reference_split", "validation"),
     ["--eval.reference_split", "train, val, test"]),
    ("eval-every-negative", lambda t: fit("otnfm", "8gaussians", "--eval.every_n_steps", "-3"),
     ["--eval.every_n_steps=-3", ">= 1"]),
    ("eval-feature-space", lambda t: fit("otnfm", "8gaussians", "--eval.feature_space", "vgg"),
     ["--eval.feature_space", "lenet-mnist"]),
    ("eval-prdc-k-0", lambda t: fit("otnfm", "8gaussians", "--eval.prdc_k", "0"), ["--eval.prdc_k", ">= 1"]),
    ("eval-w2-max-1", lambda t: fit("otnfm", "8gaussians", "--eval.w2_max_samples", "1"),
     ["--eval.w2_max_samples", ">= 2"]),
    ("eval-threshold-0", lambda t: fit("otnfm", "8gaussians", "--eval.offmanifold_threshold", "0"),
     ["--eval.offmanifold_threshold", "> 0"]),
    ("eval-lenet-weights-missing", lambda t: fit("otnfm", "8gaussians", "--eval.feature_space", "lenet-mnist",
                                                 "--eval.feature_weights_path", str(t / "none.pt")),
     ["none.pt", "onestep train-features"]),
    # ------------------------------------------------------------------ config files, output folder, top level
    ("config-missing", lambda t: ["fit", "--config", str(t / "missing.yaml")], ["missing.yaml", "configs/"]),
    ("config-folder", lambda t: ["fit", "--config", str(CONFIGS / "otnfm")], ["otnfm", "is a method folder",
                                                                              "--data.dataset"]),
    ("config-yaml-syntax", lambda t: ["fit", "--config", write_yaml(t / "broken.yaml",
                                                                   "model:\n  init_args:\n    lr: [1, 2\n")],
     ["broken.yaml", "line", "not valid YAML"]),
    ("config-yaml-tab", lambda t: ["fit", "--config", write_yaml(t / "tabs.yaml", "trainer:\n\tmax_steps: 3\n")],
     ["tabs.yaml", "line 2", "tabs"]),
    ("config-unknown-key", lambda t: fit("otnfm", "8gaussians", "--config", write_yaml(t / "extra.yaml",
                                                                                      {"optimiser": "adam"})),
     ["optimiser", "--help"]),
    ("out-dir-under-file", lambda t: fit("otnfm", "8gaussians", "--out_dir", str(Path(write_yaml(t / "f", "x"))
                                                                                  / "runs")),
     ["--out_dir", "folder"]),
    ("out-dir-is-file", lambda t: fit("otnfm", "8gaussians", "--out_dir", write_yaml(t / "f", "x")),
     ["--out_dir", "is a file"]),
    ("top-level-unknown", lambda t: fit("otnfm", "8gaussians", "--epochs", "3"), ["--epochs", "--help"]),
    # ------------------------------------------------------------------ benchmark, report, train-features
    ("suite-missing", lambda t: ["benchmark", "--suite", str(t / "none.yaml")], ["none.yaml", "configs/suites"]),
    ("suite-yaml-syntax", lambda t: ["benchmark", "--suite", write_yaml(t / "s.yaml", "name: [x\n")],
     ["s.yaml", "not valid YAML"]),
    ("suite-dataset-unknown", lambda t: bench(t, datasets=["mnist3d"]), ["datasets", "is not a known dataset"]),
    ("suite-budget-0", lambda t: bench(t, budget={"max_steps": 0}), ["budget.max_steps", ">= 1"]),
    ("suite-budget-minutes", lambda t: bench(t, budget={"minutes": -1}), ["budget.minutes", "> 0"]),
    ("suite-budget-unknown-key", lambda t: bench(t, budget={"steps": 3}), ["budget", "max_steps"]),
    ("suite-eval-n", lambda t: bench(t, eval={"n_samples": 3}), ["eval.n_samples", ">= 6"]),
    ("suite-eval-split", lambda t: bench(t, eval={"n_samples": 64, "reference_split": "dev"}),
     ["eval.reference_split", "test"]),
    ("suite-method-bare-string", lambda t: bench(t, methods=["otnfm"]), ["methods[0]", "config: configs/otnfm"]),
    ("suite-override-budget", lambda t: bench(t, overrides={"trainer.max_steps": 5}),
     ["trainer.max_steps", "budget"]),
    ("suite-jobs-0", lambda t: bench(t, "--jobs", "0"), ["--jobs", ">= 1"]),
    ("suite-class-path-dry-run", lambda t: bench(t, "--dry-run", methods=[{"name": "mine",
                                                                            "class_path": "nope_pkg.mod.Gen"}]),
     ["will fail", "fix the suite"]),
    ("suite-class-path-run", lambda t: bench(t, methods=[{"name": "mine", "class_path": "nope_pkg.mod.Gen"}]),
     ["mine-8gaussians-s0", "results.jsonl", "rerun"]),
    ("report-missing-dir", lambda t: ["report", str(t / "no_results")], ["no_results", "onestep benchmark"]),
    ("train-features-unknown", lambda t: ["train-features", "cifar100"], ["cifar100", "choose from"]),
]


@pytest.fixture
def training_spy(monkeypatch):
    """Records every training step of every generator."""
    steps: list[int] = []
    original = OneStepGenerator.training_step

    def spy(self, batch, batch_idx):
        steps.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(OneStepGenerator, "training_step", spy)
    return steps


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own usage errors (train-features, report)
        return exit_.code


@pytest.mark.parametrize("argv_of, must_say", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_naming_the_option_and_the_fix(argv_of, must_say, tmp_path, monkeypatch,
                                                               capsys, training_spy):
    monkeypatch.chdir(tmp_path)  # a default out_dir ("runs") or results folder would land here
    argv = argv_of(tmp_path)
    if "--out_dir" not in argv and argv[0] == "fit":
        argv += ["--out_dir", str(tmp_path / "runs")]
    code = run_main(argv)
    out, err = capsys.readouterr()
    text = (out + err).strip()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code in (1, 2), f"exit status {code}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert "error:" in last, text[-3000:]
    for words in must_say:
        assert words in last, f"{words!r} not in the last line:\n{last}"
    assert training_spy == []
    written = [p.name for p in tmp_path.rglob("*") if p.suffix == ".ckpt" or p.name == "eval.jsonl"]
    assert written == []


def test_every_section_of_the_cli_is_covered():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_the_failed_cell_of_a_benchmark_shows_its_whole_reason(tmp_path, capsys):
    """A bad class_path is reported in full on the cell's line (it used to be cut after the first colon)."""
    code = main(bench(tmp_path, methods=[{"name": "mine", "class_path": "nope_pkg.mod.Gen"}]))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "mine-8gaussians-s0: FAILED" in line)
    assert code == 1 and "--model.class_path=nope_pkg.mod.Gen" in line and "No module named 'nope_pkg'" in line
    assert "importable" in line


def test_dry_run_names_the_class_path_that_will_fail(tmp_path, capsys):
    code = main(bench(tmp_path, "--dry-run", methods=[{"name": "mine", "class_path": "nope_pkg.mod.Gen"},
                                                      {"name": "otnfm", "config": str(CONFIGS / "otnfm")}]))
    out = capsys.readouterr().out
    assert code == 1
    assert "mine-8gaussians-s0: (will fail: method 'mine': class_path 'nope_pkg.mod.Gen' cannot be imported" in out
    assert "otnfm-8gaussians-s0: onestep fit --config" in out


# ---------------------------------------------------------------------- real processes: exit status, --debug
def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    environment.pop("ONESTEP_DEBUG", None) if "ONESTEP_DEBUG" not in env else None
    return subprocess.Popen([sys.executable, "-m", "onestep.cli", *args], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_shell_sees_status_2_one_line_and_the_traceback_only_with_debug(tmp_path):
    """Three processes at once (each pays the import of torch and Lightning)."""
    bad_lr = fit("otnfm", "8gaussians", "--model.init_args.lr", "nan", "--out_dir", str(tmp_path / "runs"))
    procs = {
        "fit": run_cli(bad_lr, tmp_path),
        "fit --debug": run_cli([*bad_lr, "--debug"], tmp_path),
        "ONESTEP_DEBUG": run_cli(fit("otnfm", "8gaussians", "--eval.every_n_steps", "-3"), tmp_path,
                                 ONESTEP_DEBUG="1"),
    }
    done = {name: (proc.wait(timeout=300), *proc.communicate()) for name, proc in procs.items()}
    code, out, err = done["fit"]
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("onestep: error: --model.init_args.lr: got nan")
    code, out, err = done["fit --debug"]
    assert code == 1 and "Traceback (most recent call last)" in err and "lr" in err.strip().splitlines()[-1]
    code, out, err = done["ONESTEP_DEBUG"]
    assert code == 1 and "Traceback (most recent call last)" in err and "every_n_steps" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_glued_yaml_backbone_spec_from_python_says_key_colon_space():
    """YAML reads `{name:mlp}` as the key "name:mlp" without a value (also outside the CLI)."""
    from onestep.nets import build_backbone

    with pytest.raises(ValueError, match=r"key: value.*write \{name: mlp\}"):
        build_backbone({"name:mlp": None}, (2,))
