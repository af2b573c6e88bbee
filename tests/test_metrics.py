"""Known-answer tests for onestep.metrics (W2, SW2, FD, PRDC, manifold stats, speed, feature spaces)."""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import ot
import pytest
import scipy.linalg
import torch

from onestep.metrics import (FEATURES, PRDC, FrechetDistance, ManifoldDistance, SlicedWasserstein2, Wasserstein2,
                             check_feature_space, frechet_distance, frechet_from_moments, get_feature_extractor,
                             load_lenet_state, manifold_distance_stats, measure_sampling_speed, prdc,
                             reference_features, sliced_wasserstein, wasserstein2)
from onestep.metrics.features import WEIGHTS_DIR
from onestep.metrics.wasserstein import wasserstein2_1d_squared

DATA_ROOT = Path(os.environ.get("ONESTEP_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- Wasserstein
def test_w2_identical_is_zero_and_translation_is_shift_norm():
    x = torch.randn(300, 3, generator=gen(), dtype=torch.float64)
    shift = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    assert wasserstein2(x, x).item() == pytest.approx(0.0, abs=1e-7)
    # a translation is transported by the identity coupling: W2 = ||shift|| exactly
    assert wasserstein2(x, x + shift).item() == pytest.approx(shift.norm().item(), rel=1e-9)


def test_w2_matches_pot_and_1d_sorted_matching():
    x, y = torch.randn(200, 4, generator=gen(1)), torch.rand(150, 4, generator=gen(2)) * 3
    cost = ot.dist(x.double().numpy(), y.double().numpy())  # squared Euclidean
    expected = math.sqrt(ot.emd2(np.full(200, 1 / 200), np.full(150, 1 / 150), cost))
    assert wasserstein2(x, y).item() == pytest.approx(expected, rel=1e-9)
    u, v = torch.randn(500, 1, generator=gen(3)).double(), torch.randn(500, 1, generator=gen(4)).double() * 2 + 1
    closed = ((u.sort(0).values - v.sort(0).values) ** 2).mean().sqrt().item()
    assert wasserstein2(u, v).item() == pytest.approx(closed, rel=1e-9)


def test_w2_gaussians_close_to_closed_form_and_subsampling_is_seeded():
    # N(0, I) vs N((3, 0), diag(4, 1/4)): W2^2 = 9 + (1 - 2)^2 + (1 - 1/2)^2 = 10.25
    x = torch.randn(1500, 2, generator=gen(5))
    y = torch.randn(1500, 2, generator=gen(6)) * torch.tensor([2.0, 0.5]) + torch.tensor([3.0, 0.0])
    assert wasserstein2(x, y).item() == pytest.approx(math.sqrt(10.25), rel=0.03)
    a, b = wasserstein2(x, y, max_samples=300, seed=3), wasserstein2(x, y, max_samples=300, seed=3)
    assert a.item() == b.item() and a.item() != wasserstein2(x, y, max_samples=300, seed=4).item()


def test_sw2_exact_in_1d_including_unequal_sizes():
    u, v = torch.randn(400, 1, generator=gen(7)), torch.randn(400, 1, generator=gen(8)) + 0.5
    assert sliced_wasserstein(u, v, n_projections=8).item() == pytest.approx(wasserstein2(u, v).item(), rel=1e-9)
    # unequal sizes: the merged-breakpoint quantile integral equals exact 1-D optimal transport
    a, b = torch.randn(7, 1, generator=gen(9)), torch.randn(5, 1, generator=gen(10))
    exact = ot.emd2(np.full(7, 1 / 7), np.full(5, 1 / 5), ot.dist(a.double().numpy(), b.double().numpy()))
    assert wasserstein2_1d_squared(a.double(), b.double()).item() == pytest.approx(exact, rel=1e-9)
    # duplicating every point does not change the measure
    assert wasserstein2_1d_squared(a.double(), a.double().repeat(2, 1)).item() == pytest.approx(0, abs=1e-12)


def test_sw2_is_w2_over_sqrt_dim_for_isotropic_gaussians():
    d = 4
    x = torch.randn(500, d, generator=gen(11))
    shift = torch.tensor([1.0, -2.0, 0.5, 1.5])
    sw = sliced_wasserstein(x, x + shift, n_projections=4000, seed=1).item()
    assert sw * math.sqrt(d) == pytest.approx(shift.norm().item(), rel=0.03)
    # a common scaling is also optimal transport: W2(x, 2x)^2 = mean ||x||^2 and SW2^2 = W2^2 / d
    sw = sliced_wasserstein(x, 2 * x, n_projections=4000, seed=2).item()
    assert sw * math.sqrt(d) == pytest.approx(wasserstein2(x, 2 * x).item(), rel=0.03)


# ----------------------------------------------------------------------------------------- Fréchet
def closed_form_fd(mu1, s1, mu2, s2):
    r = scipy.linalg.sqrtm(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(r @ s2 @ r))))


def test_frechet_from_moments_matches_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    got = frechet_from_moments(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2))).item()
    assert got == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5))
    cov, mu = a @ a.T + np.eye(5), rng.normal(size=5)
    x = torch.from_numpy(rng.multivariate_normal(np.zeros(5), np.eye(5), size=20000))
    y = torch.from_numpy(rng.multivariate_normal(mu, cov, size=20000))
    assert frechet_distance(x, x).item() == pytest.approx(0.0, abs=1e-8)
    expected = closed_form_fd(x.mean(0).numpy(), np.cov(x.numpy().T), y.mean(0).numpy(), np.cov(y.numpy().T))
    assert frechet_distance(x, y).item() == pytest.approx(expected, rel=1e-8)  # same estimator, float64
    assert frechet_distance(x, y).item() == pytest.approx(closed_form_fd(np.zeros(5), np.eye(5), mu, cov), rel=0.05)


def test_frechet_warns_with_fewer_samples_than_dims_and_metric_halves():
    x, y = torch.randn(10, 20, generator=gen(2)), torch.randn(10, 20, generator=gen(3))
    with pytest.warns(UserWarning, match="singular"):
        frechet_distance(x, y)
    x, y = torch.randn(400, 8, generator=gen(4)), torch.randn(300, 8, generator=gen(5)) + 1
    metric = FrechetDistance(8)
    metric.update(fake=x[:150], real=y[:100])
    metric.update(fake=x[150:], real=y[100:])
    assert metric.compute().item() == pytest.approx(frechet_distance(x, y).item(), rel=1e-10)


# ----------------------------------------------------------------------------------------- PRDC
def brute_prdc(real, fake, k):
    real, fake = real.double(), fake.double()
    drr, dff, dfr = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(fake, real)  # full matrices
    r = drr.sort(1).values[:, k]  # index 0 is the point itself
    s = dff.sort(1).values[:, k]
    inside = dfr <= r[None, :]  # (M, N): fake j inside real ball i
    return {"precision": inside.any(1).double().mean().item(),
            "recall": (dfr.T <= s[None, :]).any(1).double().mean().item(),
            "density": inside.double().sum().item() / (k * fake.shape[0]),
            "coverage": (dfr.min(0).values <= r).double().mean().item()}


def test_prdc_equals_brute_force_for_any_chunk_size():
    real, fake = torch.randn(230, 3, generator=gen(6)), torch.randn(170, 3, generator=gen(7)) + 1.5
    expected = brute_prdc(real, fake, 5)
    for chunk in (16, 100, 4096):
        got = {k: v.item() for k, v in prdc(real, fake, k=5, chunk_size=chunk).items()}
        assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1


def test_prdc_identical_disjoint_and_mode_collapse():
    x = torch.randn(300, 2, generator=gen(8))
    same = prdc(x, x.clone())
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    far = prdc(x, x + 100.0)
    assert all(far[k] == 0 for k in ("precision", "recall", "density", "coverage"))
    # mixture of two far modes; the generator only produces mode A
    real = torch.cat([torch.randn(400, 2, generator=gen(9)), torch.randn(400, 2, generator=gen(10)) + 20])
    collapsed = torch.randn(400, 2, generator=gen(11))
    mc = prdc(real, collapsed)
    assert mc["precision"] > 0.9 and mc["recall"] < 0.55 and mc["coverage"] < 0.55
    rev = prdc(collapsed, real)  # the reverse: a generator that covers more than the data
    assert rev["precision"] < 0.55 and rev["recall"] > 0.9


def test_prdc_metric_two_halves_equal_one_update():
    real, fake = torch.randn(120, 4, generator=gen(12)), torch.randn(90, 4, generator=gen(13))
    metric = PRDC(k=3)
    metric.update(fake=fake[:40], real=real[:70])
    metric.update(fake=fake[40:], real=real[70:])
    got, ref = metric.compute(), prdc(real, fake, k=3)
    assert all(got[k].item() == ref[k].item() for k in ref)


def test_w2_sw2_metric_two_halves_equal_one_update():
    x, y = torch.randn(100, 2, generator=gen(14)), torch.randn(80, 2, generator=gen(15))
    for metric, fn in ((Wasserstein2(max_samples=50), lambda a, b: wasserstein2(a, b, max_samples=50)),
                       (SlicedWasserstein2(n_projections=32), lambda a, b: sliced_wasserstein(a, b, 32))):
        metric.update(fake=x[:30], real=y[:50])
        metric.update(fake=x[30:], real=y[50:])
        assert metric.compute().item() == fn(x, y).item()


# ----------------------------------------------------------------------------------------- manifold
def test_manifold_stats_known_distances():
    d = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4, 1.0], dtype=torch.float64)
    stats = manifold_distance_stats(d, threshold=0.1)
    assert stats["mean"].item() == pytest.approx(1.75 / 6)
    assert stats["median"].item() == pytest.approx(0.15)  # mean of the two middle values
    assert stats["p95"].item() == pytest.approx(float(np.quantile(d.numpy(), 0.95)))
    assert stats["offmanifold"].item() == pytest.approx(3 / 6)  # strictly above the threshold
    circle = ManifoldDistance(lambda x: (x.norm(dim=1) - 1).abs(), threshold=0.1)
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.5], [0.95, 0.0], [0.0, 0.0]])
    circle.update(pts[:2])
    circle.update(pts[2:])
    got = circle.compute()
    assert got["mean"].item() == pytest.approx((0 + 0.5 + 0.05 + 1) / 4) and got["offmanifold"].item() == 0.5


def test_measure_sampling_speed_reports_machine(monkeypatch):
    import types

    import onestep.metrics.speed as speed

    # a fake clock that only sampling advances: warm-up calls take 9 s, the timed ones 1, 4 and 2 s
    clock = types.SimpleNamespace(now=0.0, durations=iter([9.0, 9.0, 1.0, 4.0, 2.0]))
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    calls = []

    def sample(n):
        calls.append(n)
        clock.now += next(clock.durations)
        return torch.zeros(n, 2)

    out = measure_sampling_speed(sample, 64, warmup=2, repeats=3)
    assert calls == [64] * 5 and out["seconds_all"] == [1.0, 4.0, 2.0]  # warm-up calls are not timed
    assert out["seconds"] == 2.0 and out["samples_per_s"] == 32.0  # n / median, not mean or fastest
    assert {"processor", "cpu_count", "torch_threads"} <= set(out["machine"])


# ----------------------------------------------------------------------------------------- features
def test_feature_registry_and_pixels():
    assert {"pixels", "lenet-mnist", "lenet-fashion", "inception"} <= set(FEATURES)
    with pytest.raises(ValueError, match="pixels"):
        get_feature_extractor("vgg")
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(get_feature_extractor("pixels")(x), x.reshape(5, 16))


def test_inception_fails_early_with_clear_error(tmp_path):
    with pytest.raises((RuntimeError, FileNotFoundError), match="inception"):
        check_feature_space("inception", tmp_path / "missing.pth")


@pytest.mark.parametrize("name", ["lenet-mnist", "lenet-fashion"])
def test_lenet_features_dimension_and_batch_independence(name):
    extractor = get_feature_extractor(name)
    x = torch.rand(64, 1, 28, 28, generator=gen(16))
    full = extractor(x)
    assert full.shape == (64, 128) and full.dtype == torch.float32
    in_sevens = torch.cat([extractor(chunk) for chunk in x.split(7)])
    assert torch.equal(in_sevens, full)


def test_lenet_sha_mismatch_is_a_clear_error(tmp_path):
    src = WEIGHTS_DIR / "lenet-mnist.pt"
    shutil.copy(src, tmp_path / "lenet-mnist.pt")
    shutil.copy(WEIGHTS_DIR / "manifest.json", tmp_path / "manifest.json")
    load_lenet_state("mnist", tmp_path / "lenet-mnist.pt")  # an intact copy loads
    data = bytearray((tmp_path / "lenet-mnist.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "lenet-mnist.pt").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="corrupted"):
        load_lenet_state("mnist", tmp_path / "lenet-mnist.pt")
    with pytest.raises(RuntimeError, match="corrupted"):
        get_feature_extractor("lenet-mnist", weights_path=tmp_path / "lenet-mnist.pt")


def test_shipped_weights_are_small_and_recorded():
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    for name, minimum in (("lenet-mnist.pt", 0.99), ("lenet-fashion.pt", 0.90)):
        assert (WEIGHTS_DIR / name).stat().st_size < 1_000_000
        assert manifest[name]["test_accuracy"] >= minimum


@pytest.mark.parametrize("dataset,fashion,minimum", [("mnist", False, 0.99), ("fashion", True, 0.90)])
def test_shipped_lenet_accuracy_on_test_images(dataset, fashion, minimum):
    images_dir = DATA_ROOT / ("fashion_mnist" if fashion else "mnist") / "raw"
    if not images_dir.is_dir():
        pytest.skip(f"{images_dir} absent")
    from onestep.data.images import load_mnist
    from onestep.metrics.features import LeNet, lenet_accuracy

    images, labels = load_mnist(DATA_ROOT, "test", fashion=fashion)
    net = LeNet()
    net.load_state_dict(load_lenet_state(dataset))
    assert lenet_accuracy(net, images[:2000], labels[:2000]) > minimum


def test_reference_features_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(3, 2)

    a = reference_features("pixels", "mnist", "test", 3, compute)
    b = reference_features("pixels", "mnist", "test", 3, compute)
    c = reference_features("pixels", "mnist", "test", 4, compute)  # another key: recomputed
    assert torch.equal(a, b) and torch.equal(a, c) and len(calls) == 2
    files = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert files == ["mnist-test-pixels-n3.pt", "mnist-test-pixels-n4.pt"]  # no temp files left


def test_no_warning_with_enough_samples():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(torch.randn(50, 4, generator=gen(17)), torch.randn(50, 4, generator=gen(18)))
