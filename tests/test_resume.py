"""Exact resume: N steps, a checkpoint, N more steps == 2N uninterrupted steps, bit for bit, on CPU.

A method joins these tests by adding one factory to ``METHODS``. To pass, a plugin must keep all training
state in parameters/buffers or in ``on_save_checkpoint``/``on_load_checkpoint`` (calling ``super()``),
and draw its randomness from torch/numpy/``random`` (whose states the checkpoint carries).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from onestep.callbacks.reliability import ExactCheckpoint
from onestep.data import OneStepDataModule
from onestep.data.sampler import ResumableSampler
from onestep.generators.flow_matching import FlowMatching
from onestep.generators.otnfm import OTNFM

TINY = {"name": "mlp", "hidden": [16, 16]}
BATCHES_PER_EPOCH = 4  # n_train=64, batch_size=16

def _optional(module: str, name: str):
    """A generator class written by another plugin, or None while its module does not import."""
    try:
        return getattr(__import__(f"onestep.generators.{module}", fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


CharacteristicGenerator = _optional("characteristic", "CharacteristicGenerator")
MAGT = _optional("magt", "MAGT")
LatentMAGT = _optional("magt_latent", "LatentMAGT")
LMPPM = _optional("lmppm", "LMPPM")
GAN = _optional("gan", "GAN")

METHODS = {
    "flow_matching-independent": lambda shape: FlowMatching(data_shape=shape, backbone=TINY, coupling="independent",
                                                            steps=2, ema_decay=0.9, warmup_steps=3,
                                                            lr_schedule="cosine"),
    "otnfm-online": lambda shape: OTNFM(data_shape=shape, backbone=TINY, coupling="online", bank_slots=2,
                                        ema_decay=0.9),
    "otnfm-minibatch": lambda shape: OTNFM(data_shape=shape, backbone=TINY, coupling="minibatch", ema_decay=0.9),
    # the teacher trains for 4 steps, so the checkpoints at steps 4 and 6 fall in the student stage (stage 2)
    "characteristic-stage2": lambda shape: CharacteristicGenerator(data_shape=shape, backbone=TINY, teacher_steps=4,
                                                                   ema_decay=0.9),
    "magt": lambda shape: MAGT(data_shape=shape, backbone=TINY, n_anchors=32, ema_decay=0.9),
    # autoencoder for 4 steps, then the latent bank is built and the distance net trains
    "lmppm": lambda shape: LMPPM(data_shape=shape, latent_dim=2, ae_steps=4, bank_size=32, ema_decay=0.9,
                                 encoder={"name": "mlp", "hidden": [16]}, decoder={"name": "mlp", "hidden": [16]},
                                 distance_net={"name": "mlp", "hidden": [16]}),
    # autoencoder for 4 steps, then MAGT on the standardised codes
    "magt-latent": lambda shape: LatentMAGT(data_shape=shape, code_dim=2, latent_dim=1, ae_steps=4, n_anchors=32,
                                            ema_decay=0.9, backbone=TINY, encoder={"name": "mlp", "hidden": [16]},
                                            decoder={"name": "mlp", "hidden": [16]}),
    # manual optimisation: two optimisers and schedules, only the generator's steps count
    "gan": lambda shape: GAN(data_shape=shape, backbone=TINY, ema_decay=0.9, warmup_steps=3, lr_schedule="cosine"),
}
AVAILABLE = {"characteristic-stage2": CharacteristicGenerator, "magt": MAGT, "lmppm": LMPPM, "magt-latent": LatentMAGT,
             "gan": GAN}


class StopAt(Callback):
    """Stop the run after ``step`` optimiser steps (an interruption: max_steps, hence the cosine horizon, stays)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.indices: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch[1].clone())


def build(method: str):
    L.seed_everything(0, verbose=False)
    dm = OneStepDataModule("8gaussians", batch_size=16, n_train=64, seed=3)
    return METHODS[method](dm.data_shape), dm


def fit(model, dm, steps: int, root, ckpt_path=None, every: int | None = None, stop_at: int | None = None):
    record = RecordBatches()
    callbacks = [record] + ([StopAt(stop_at)] if stop_at else [])
    if every:
        callbacks.append(ExactCheckpoint(dirpath=root, filename="step{step}", every_n_train_steps=every, save_top_k=-1,
                                         save_last=True, auto_insert_metric_name=False))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(every), accelerator="cpu", devices=1, callbacks=callbacks,
                        default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, record.indices


def training_state(trainer, model) -> dict[str, torch.Tensor]:
    """Parameters, buffers (the online bank), EMA, every optimiser's moments and learning rate, the step counter
    and the EMA update count."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in model._ema.items()})
    for i, optimizer in enumerate(trainer.optimizers):
        for key, entry in optimizer.state_dict()["state"].items():
            state.update({f"optim{i}.{key}.{k}": v for k, v in entry.items() if torch.is_tensor(v)})
        state[f"lr{i}"] = torch.tensor(optimizer.param_groups[0]["lr"])
    state["global_step"] = torch.tensor(trainer.global_step)
    state["ema_updates"] = torch.tensor(model._ema_updates)
    return state


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_equals_uninterrupted_mid_epoch_and_after_a_stop(method, tmp_path):
    if method in AVAILABLE and AVAILABLE[method] is None:
        pytest.skip(f"{method}: its module does not import")
    n = 6  # 1.5 epochs: the checkpoint falls mid-epoch
    model, dm = build(method)
    trainer, seen = fit(model, dm, 2 * n, tmp_path / "full", every=2)
    full = training_state(trainer, model)
    assert trainer.global_step == 2 * n and len(seen) == 2 * n

    mid = torch.load(tmp_path / "full" / f"step{n}.ckpt", weights_only=True)
    if method == "characteristic-stage2":
        assert mid["characteristic_stage"] == 2  # the resumed part is the student stage
    if method in ("lmppm", "magt-latent"):
        assert int(mid["state_dict"]["stage"]) == 2

    # resume from the checkpoint written while the uninterrupted run passed step n (mid-epoch)
    model, dm = build(method)
    trainer, resumed = fit(model, dm, 2 * n, tmp_path / "b", ckpt_path=tmp_path / "full" / f"step{n}.ckpt")
    assert_same_state(full, training_state(trainer, model))
    assert len(resumed) == n and all(torch.equal(x, y) for x, y in zip(resumed, seen[n:], strict=True))

    # a run stopped at an epoch boundary, then continued from the last checkpoint it wrote
    stop = BATCHES_PER_EPOCH
    model, dm = build(method)
    trainer, _ = fit(model, dm, 2 * n, tmp_path / "stop", every=stop, stop_at=stop)
    assert trainer.global_step == stop
    model, dm = build(method)
    trainer, continued = fit(model, dm, 2 * n, tmp_path / "c", ckpt_path=tmp_path / "stop" / "last.ckpt")
    assert_same_state(full, training_state(trainer, model))
    assert len(continued) == 2 * n - stop  # no batch seen twice, none skipped
    assert all(torch.equal(x, y) for x, y in zip(continued, seen[stop:], strict=True))


def test_resume_is_exact_with_dataloader_workers(tmp_path):
    """Two loader workers keep up to 4 batches prefetched (prefetch_factor 2 each): those were handed out
    by the sampler but not trained on, so the checkpoint's position must leave them out."""
    def build_with_workers():
        L.seed_everything(0, verbose=False)
        dm = OneStepDataModule("8gaussians", batch_size=16, n_train=256, seed=3, num_workers=2)
        return FlowMatching(data_shape=dm.data_shape, backbone=TINY, steps=2, ema_decay=0.9), dm

    model, dm = build_with_workers()
    trainer, seen = fit(model, dm, 10, tmp_path / "full", every=5)
    full = training_state(trainer, model)
    position = torch.load(tmp_path / "full" / "step5.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert position["combined_loader"][0]["position"]["samples_seen"] == 5 * 16  # trained, not prefetched
    model, dm = build_with_workers()
    trainer, resumed = fit(model, dm, 10, tmp_path / "b", ckpt_path=tmp_path / "full" / "step5.ckpt")
    assert_same_state(full, training_state(trainer, model))
    assert len(resumed) == 5 and all(torch.equal(x, y) for x, y in zip(resumed, seen[5:], strict=True))


def test_checkpoint_content_is_complete_and_weights_only_safe(tmp_path):
    model, dm = build("otnfm-online")
    trainer, _ = fit(model, dm, 6, tmp_path, every=6)
    ckpt = torch.load(tmp_path / "step6.ckpt", weights_only=True)  # raises if anything is not plain data
    assert ckpt["global_step"] == 6
    assert set(ckpt["ema"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bank.slot_of" in ckpt["state_dict"] and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    rng = ckpt["callbacks"]["ResumableRNG"]
    assert rng["world_size"] == 1 and {"torch", "numpy", "python"} <= set(rng["ranks"][0])
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"]
    assert position["epoch"] == 1 and position["samples_seen"] == 2 * 16  # 6 batches = 1 epoch + 2 batches
    # the bank stays a bijection between data points and noise slots
    slots = ckpt["state_dict"]["bank.slot_of"].flatten()
    assert torch.equal(slots.sort().values, torch.arange(64 * 2))


# ------------------------------------------------------------------------------------ the sampler
def test_sampler_splits_global_batches_across_ranks():
    """Rank r reads perm[r::W]: W ranks with batch b cover the global batches of 1 rank with batch b W."""
    single = list(ResumableSampler(50, seed=1, batch_size=8))
    ranks = [list(ResumableSampler(50, seed=1, num_replicas=2, rank=r, batch_size=4)) for r in range(2)]
    assert len(single) == 48 and all(len(r) == 24 for r in ranks)  # 50 -> multiples of the batch
    for k in range(6):
        global_batch = set(single[8 * k: 8 * (k + 1)])
        assert global_batch == set(ranks[0][4 * k: 4 * (k + 1)]) | set(ranks[1][4 * k: 4 * (k + 1)])
    assert not set(ranks[0]) & set(ranks[1])


def test_sampler_is_a_resumable_stream_of_fresh_permutations():
    sampler = ResumableSampler(10, seed=2)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second  # a new order per epoch
    again = ResumableSampler(10, seed=2)
    it = iter(again)
    head = [next(it) for _ in range(4)]
    state = again.state_dict(not_trained=1)  # one index handed out but not trained on
    assert state["epoch"] == 0 and state["samples_seen"] == 3
    resumed = ResumableSampler(10, seed=2)
    resumed.load_state_dict(state)
    assert head[:3] + list(resumed) == first and list(resumed) == second
    # two ranks resuming a single-process position (6 seen) continue at 3 each
    twin = [ResumableSampler(10, seed=2, num_replicas=2, rank=r) for r in range(2)]
    for s in twin:
        s.load_state_dict({"epoch": 0, "samples_seen": 6})
    assert sorted(list(twin[0]) + list(twin[1])) == sorted(first[6:])


# ------------------------------------------------------------------------------------ RNG states
def _draws() -> tuple:
    import random

    import numpy as np
    cuda = torch.randn(3, device="cuda").cpu() if torch.cuda.is_available() else None
    return torch.randn(3), np.random.rand(3).tolist(), random.random(), random.gauss(0, 1), cuda


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    from onestep.callbacks.reliability import capture_rng_state, restore_rng_state

    L.seed_everything(5, verbose=False)
    _draws()
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every stream on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = _draws()
    assert torch.equal(again[0], expected[0]) and again[1:4] == expected[1:4]
    assert (again[4] is None and expected[4] is None) or torch.equal(again[4], expected[4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_is_exact_on_gpu(tmp_path):
    """The same N + N == 2N check with the model and the noise on the GPU (CUDA RNG state restored)."""
    n = 6
    model, dm = build("otnfm-online")
    trainer = L.Trainer(max_steps=2 * n, logger=False, enable_progress_bar=False, accelerator="gpu", devices=1,
                        callbacks=[ExactCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=n,
                                                   save_top_k=-1)], enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    full = training_state(trainer, model)
    model, dm = build("otnfm-online")
    trainer = L.Trainer(max_steps=2 * n, logger=False, enable_progress_bar=False, accelerator="gpu", devices=1,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm, ckpt_path=tmp_path / f"step{n}.ckpt")
    resumed = training_state(trainer, model)
    assert_same_state({k: v.cpu() for k, v in full.items()}, {k: v.cpu() for k, v in resumed.items()})
