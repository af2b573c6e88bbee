"""Shared test helpers: tiny trainers without progress bars, loggers or checkpoints."""

from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


def fit_quietly(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int, **trainer_kwargs):
    """Train ``model`` for ``steps`` optimiser steps on CPU with nothing written to disk."""
    kwargs = dict(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, accelerator="cpu", devices=1)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Two test workers share two cores: one intra-op thread each avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist" / "raw").exists(),
                                 reason="MNIST files not found in ../shared/datasets")
