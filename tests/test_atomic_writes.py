"""Files that must never be left half written: the checkpoint (temporary file + rename) and a results
record (one ``os.write`` of the record and its newline).

The kill is simulated at the exact point that matters instead of being timed: the module's ``os`` is
replaced by a proxy whose ``replace`` (or ``write``) records the call and, for the checkpoint, raises a
``BaseException`` as a SIGKILL between the write and the rename would end the writer."""
from __future__ import annotations

import os
import types

import pytest
import torch

from conftest import fit_quietly
from onestep.benchmark import records
from onestep.benchmark.records import append_record, read_records
from onestep.callbacks import reliability
from onestep.callbacks.reliability import atomic_save_checkpoint
from onestep.data import OneStepDataModule
from onestep.generators.flow_matching import FlowMatching


class Killed(BaseException):
    """The writer dies here (a BaseException: nothing may catch it as an ordinary error)."""


def os_proxy(**overrides):
    """A stand-in for a module's ``os``: everything from ``os`` except ``overrides``."""
    proxy = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    for name, fn in overrides.items():
        setattr(proxy, name, fn)
    return proxy


def test_a_writer_killed_before_its_rename_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = FlowMatching(data_shape=(2,), backbone={"name": "mlp", "hidden": [8]}, steps=1)
    trainer = fit_quietly(model, OneStepDataModule("8gaussians", batch_size=16, n_train=64), steps=2)
    path = tmp_path / "last.ckpt"
    atomic_save_checkpoint(trainer, str(path))
    before = path.read_bytes()
    assert torch.load(path, weights_only=True)["global_step"] == 2

    with torch.no_grad():  # a later state, whose save is interrupted
        for p in model.parameters():
            p.add_(1.0)
    renames = []

    def killed_at_rename(src, dst):
        renames.append((str(src), str(dst)))
        raise Killed()

    monkeypatch.setattr(reliability, "os", os_proxy(replace=killed_at_rename))
    with pytest.raises(Killed):
        atomic_save_checkpoint(trainer, str(path))
    monkeypatch.undo()
    assert renames and renames[0][1] == str(path) and renames[0][0] != str(path)  # written elsewhere first
    assert path.read_bytes() == before  # the only checkpoint is untouched, and still loads
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert torch.load(renames[0][0], weights_only=True)["state_dict"]  # the new one was complete, not renamed


def test_a_record_and_its_newline_are_one_write(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    append_record(path, {"method": "a", "dataset": "d", "seed": 0, "status": "ok"})  # not the first line
    writes = []

    def recording_write(fd, data):
        writes.append(bytes(data))
        return os.write(fd, data)

    monkeypatch.setattr(records, "os", os_proxy(write=recording_write))
    record = {"method": "b", "dataset": "d", "seed": 1, "status": "ok", "metrics": {"w2": 0.25}}
    append_record(path, record)
    monkeypatch.undo()
    # another process appending between two writes would split the line: one write holds all of it
    assert len(writes) == 1 and writes[0].endswith(b"}\n") and writes[0].count(b"\n") == 1
    assert read_records(path)[-1] == record
