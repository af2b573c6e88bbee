"""The shared pieces: atomic writes, the eval-mode context, the synchronised timer, and the one metric suite
(:func:`onestep.metrics.evaluate_samples`) that the evaluation callback, the data floor and the NFE sweep use."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import onestep.metrics.speed as speed
from onestep.benchmark.floor import compute_floor
from onestep.callbacks import EvaluationCallback
from onestep.evaluate import SingleProcess
from onestep.files import atomic_torch_save, atomic_write, atomic_write_json
from onestep.metrics import (MetricOptions, evaluate_samples, frechet_distance, get_feature_extractor,
                             manifold_distance_stats, prdc, sliced_wasserstein, timed, wasserstein2)
from onestep.modules import datamodule_of, eval_mode
from test_callbacks import FakeGenerator, ToyData


# ------------------------------------------------------------------------------------------- files
class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise this")


def test_atomic_write_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"old": torch.ones(3)}, path)
    # torch.save writes the tensor's record first, then fails on the second entry: a half-written archive
    with pytest.raises(RuntimeError, match="cannot serialise"):
        atomic_torch_save({"new": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["old"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left behind

    def half_then_fail(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert torch.load(path, weights_only=True)["old"].sum() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    atomic_write_json(tmp_path / "sub.json", {"a": 1})
    assert (tmp_path / "sub.json").read_text() == '{\n "a": 1\n}'


# ------------------------------------------------------------------------------------------- modules
def test_eval_mode_restores_the_previous_mode_even_on_an_exception():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with pytest.raises(ValueError):
        with eval_mode(net):
            assert not net.training and not net[1].training
            raise ValueError("inside")
    assert net.training and net[1].training
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training  # a module in eval mode before stays in eval mode


def test_datamodule_of_reads_the_attached_trainer_only():
    module = types.SimpleNamespace(_trainer=None)
    assert datamodule_of(module) is None
    module._trainer = types.SimpleNamespace(datamodule="dm")
    assert datamodule_of(module) == "dm"


# ------------------------------------------------------------------------------------------- timing
def test_timed_synchronises_a_cuda_device_before_each_clock_reading(monkeypatch):
    events = []
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: events.append("clock")
                                                             or next(clock)))
    result, seconds = timed(lambda: events.append("sample") or "samples", torch.device("cuda", 0))
    assert result == "samples" and seconds == 2.5
    assert events == [("sync", "cuda:0"), "clock", "sample", ("sync", "cuda:0"), "clock"]
    events.clear()
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))
    timed(lambda: None, torch.device("cpu"))
    assert events == []  # a CPU device has nothing to wait for


# ------------------------------------------------------------------------------------------- metric suite
def callback_and_samples(feature_space):
    """The callback's metrics on a toy model, and the same samples/reference drawn again by hand."""
    data, model = ToyData(), FakeGenerator(good=True)
    callback = EvaluationCallback(every_n_steps=None, n_samples=300, feature_space=feature_space, w2_max_samples=200,
                                  seed=3, pictures=False, prdc_k=4, sw_projections=64)
    metrics, _ = callback.compute_metrics(SingleProcess(data, 0), model)
    fake = data.denormalize(model.sample_chunked(300, generator=torch.Generator().manual_seed(3)))
    return metrics, callback, fake, data.reference("test", 300), data


def test_evaluate_samples_gives_the_callbacks_numbers_and_the_plain_functions(tmp_path):
    metrics, callback, fake, real, data = callback_and_samples(["pixels"])
    pixels = get_feature_extractor("pixels")
    suite = evaluate_samples(fake, real, data.manifold, {"pixels": (pixels, pixels(real))}, callback.metric_options())
    assert {f"eval/{k}": v for k, v in suite.items()} == {k: v for k, v in metrics.items()
                                                          if k not in ("eval/samples_per_s", "eval/nfe")}
    # the same numbers as the plain metric functions (what the data floor and the NFE sweep called before);
    # a feature map unlike the raw units, so that PRDC in the wrong space would show
    def squares(x):
        return torch.cat([x, x.square()], 1)

    options = callback.metric_options()
    suite = evaluate_samples(fake, real, data.manifold, {"sq": (squares, squares(real))}, options)
    stats = manifold_distance_stats(data.manifold.distance(fake), 0.1)
    plain = {"w2": wasserstein2(fake, real, 200, 3), "sw2": sliced_wasserstein(fake, real, 64, 3),
             **{f"manifold_dist_{k}": stats[k] for k in ("mean", "median", "p95")},
             "offmanifold": stats["offmanifold"], "fd_sq": frechet_distance(squares(fake), squares(real)),
             **prdc(squares(real), squares(fake), 4)}
    assert suite == {k: float(v) for k, v in plain.items()}  # exact
    assert list(suite) == list(plain)  # and in the same order
    only = evaluate_samples(fake, real, None, {"sq": (squares, squares(real))}, options, groups=("w2", "fd"))
    assert only == {"w2": suite["w2"], "fd_sq": suite["fd_sq"]}
    with pytest.raises(ValueError, match="unknown metric groups"):
        evaluate_samples(fake, real, None, {}, MetricOptions(), groups=("fid",))


def test_without_feature_spaces_prdc_is_in_raw_units_and_options_come_from_a_protocol():
    metrics, callback, fake, real, _ = callback_and_samples(None)
    assert metrics["eval/precision"] == float(prdc(real, fake, 4)["precision"])
    options = MetricOptions.from_protocol(callback.protocol(SingleProcess(ToyData(), 0)))
    assert options == callback.metric_options()
    assert MetricOptions.from_protocol({}).w2_max_samples is None  # a protocol without it: every sample


def test_data_floor_is_the_suite_on_two_real_samples():
    config = {"dataset": "8gaussians", "n_train": 400, "n_test": 200, "n_val": 200, "batch_size": 64}
    protocol = {"n_samples": 200, "reference_split": "test", "w2_max_samples": 200, "seed": 0, "prdc_k": 5}
    floor = compute_floor(config, protocol)
    from onestep.data import OneStepDataModule

    dm = OneStepDataModule(**config)
    dm.setup()
    reference = dm.reference("test", 200).float()
    runs = [evaluate_samples(dm.denormalize(dm.train_data[k * 200:(k + 1) * 200]).float(), reference, dm.manifold,
                             {}, MetricOptions.from_protocol(protocol)) for k in range(2)]
    assert floor["repeats"] == 2 and floor["metrics"]["w2"] == (runs[0]["w2"] + runs[1]["w2"]) / 2
    assert floor["metrics"]["w2"] == pytest.approx(float(sum(wasserstein2(dm.denormalize(
        dm.train_data[k * 200:(k + 1) * 200]).float(), reference, 200, 0) for k in range(2)) / 2), rel=1e-12)
