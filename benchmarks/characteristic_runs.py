"""Train-and-measure helpers shared by the characteristic generator's claim and option benchmarks.

Protocol (the toy suite's): data from :class:`~onestep.data.OneStepDataModule` (data seed 0, batch 256),
training through a Lightning ``Trainer`` like ``onestep fit``; W2 is the exact W2 between 2,000 samples
(generator seed 0, EMA weights) and the first 2,000 test points, in raw units. A teacher is trained once
(stage 1 of a CharacteristicGenerator) and frozen at its EMA weights; each student (stage 2) starts
from a copy of it, so options of the student are compared on the same teacher.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

from onestep.config_layers import load_method_config  # noqa: E402
from onestep.data import OneStepDataModule  # noqa: E402
from onestep.generators.characteristic import CharacteristicGenerator  # noqa: E402
from onestep.metrics import wasserstein2  # noqa: E402

# the shipped vector config's network (MLP 3x256; t raw since 2026-12-06, 64 sinusoidal features before)
BACKBONE = load_method_config(REPO / "configs" / "characteristic", "moons2d")["model"]["init_args"]["backbone"]
N_EVAL = 2000


def fit(model: L.LightningModule, dataset: str, steps: int, seed: int) -> float:
    """Train ``model`` for ``steps`` steps on ``dataset``; returns the wall seconds."""
    L.seed_everything(seed, verbose=False)
    data = OneStepDataModule(dataset=dataset, batch_size=256)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


def reference(dataset: str, split: str = "test") -> torch.Tensor:
    data = OneStepDataModule(dataset=dataset, batch_size=256)
    data.setup()
    return data.reference(split, N_EVAL)


def train_teacher(dataset: str, steps: int, seed: int, **options: Any) -> tuple[Any, float]:
    """Stage 1 alone; returns the frozen EMA teacher and the wall seconds."""
    gen = CharacteristicGenerator(data_shape=(2,), backbone=BACKBONE, teacher_steps=steps, **options)
    seconds = fit(gen, dataset, steps, seed)
    gen._start_student_stage()  # teacher := its EMA weights, frozen (what stage 2 would start from)
    return gen.teacher, seconds


def train_student(teacher: Any, dataset: str, steps: int, seed: int, **options: Any) -> tuple[CharacteristicGenerator, float]:
    """Stage 2 from a copy of ``teacher`` (the student starts as the teacher)."""
    gen = CharacteristicGenerator(data_shape=(2,), backbone=BACKBONE, **options)
    gen.set_teacher(copy.deepcopy(teacher))
    return gen, fit(gen, dataset, steps, seed)


def w2_one_step(gen: CharacteristicGenerator, ref: torch.Tensor) -> float:
    gen.sample_steps = 1
    samples = gen.sample_chunked(N_EVAL, generator=torch.Generator().manual_seed(0))
    return float(wasserstein2(samples, ref, N_EVAL, 0))


def w2_teacher(gen: CharacteristicGenerator, ref: torch.Tensor, nfe: int = 100) -> float:
    samples = gen.sample_teacher(N_EVAL, nfe, torch.Generator().manual_seed(0))
    return float(wasserstein2(samples, ref, N_EVAL, 0))


def data_floor(dataset: str) -> float:
    """W2 between 2,000 validation and 2,000 test points: what a perfect model would measure."""
    return float(wasserstein2(reference(dataset, "val"), reference(dataset, "test"), N_EVAL, 0))


def quiet() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings
    warnings.filterwarnings("ignore")
