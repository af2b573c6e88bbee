"""Tests for onestep.data: manifolds (sampling, distances), IDX / CIFAR loaders, the datamodule."""

from __future__ import annotations

import gzip
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onestep.data import DATASETS, MANIFOLDS, OneStepDataModule, get_manifold
from onestep.data.images import load_cifar10, load_mnist, read_idx, write_idx
from onestep.data.manifolds import EmbeddedManifold, Helix3D, Spiral2D, Torus3D

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_mnist = pytest.mark.skipif(not (SHARED / "mnist" / "raw").is_dir(), reason="shared MNIST copy absent")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- manifolds
@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_manifold_shapes_reproducibility_and_support(name):
    m = get_manifold(name)
    assert m.name == name and 0 <= m.intrinsic_dim <= m.ambient_dim
    x = m.sample(500, gen(3))
    assert x.shape == (500, m.ambient_dim) and x.dtype == torch.float32
    assert torch.equal(x, m.sample(500, gen(3)))
    assert not torch.equal(x, m.sample(500, gen(4)))
    clean = m.sample_clean(1000, gen(1))
    d = m.distance(clean)
    assert d.shape == (1000,) and d.dtype == torch.float32
    assert d.max().item() < 1e-4
    assert x.abs().max() < 10  # unit-to-a-few-units scale
    if m.noise_std > 0:
        assert m.distance(x).mean() > 1e-3


def test_noise_std_settable_and_validated():
    m = get_manifold("rings2d", noise_std=0.0)
    assert torch.equal(m.sample(50, gen()), m.sample_clean(50, gen()))
    m.noise_std = 0.3
    assert m.noise_std == 0.3
    with pytest.raises(ValueError, match="noise_std.*>= 0"):
        get_manifold("rings2d", noise_std=-1.0)
    with pytest.raises(ValueError, match="Unknown manifold 'nope'.*8gaussians"):
        get_manifold("nope")
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        get_manifold("torus3d").distance(torch.zeros(4, 2))


def test_eight_gaussians_matches_torchcfm():
    m = get_manifold("8gaussians")
    assert m.noise_std == pytest.approx(0.1**0.25)
    centers = m.centers
    assert torch.allclose(centers.norm(dim=1), torch.full((8,), 5.0, dtype=torch.float64))
    x = m.sample(8000, gen()).double()
    nearest = torch.cdist(x, centers).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert (counts - 1000).abs().max() < 150
    residual = x - centers[nearest]
    assert residual.std(dim=0).sub(0.1**0.25).abs().max() < 0.03
    v = torch.tensor([[0.18, -0.24]], dtype=torch.float64)  # |v| = 0.3
    assert m.distance(centers + v).sub(0.3).abs().max() < 1e-6


def test_moons_statistics_and_arc_distance():
    m = get_manifold("moons2d")
    assert m.noise_std == pytest.approx(0.6)
    x = m.sample_clean(20000, gen()).double()
    assert torch.allclose(x.mean(dim=0), torch.tensor([0.5, -0.25], dtype=torch.float64), atol=0.05)
    s = torch.linspace(0.2, math.pi - 0.2, 7, dtype=torch.float64)
    unit = torch.stack([torch.cos(s), torch.sin(s)], dim=1)
    outer = torch.tensor([-1.0, -1.0], dtype=torch.float64) + 3.3 * unit  # pushed out by 0.3
    inner = torch.tensor([2.0, 0.5], dtype=torch.float64) - 2.7 * unit  # pushed towards its centre
    assert m.distance(outer).sub(0.3).abs().max() < 1e-6
    assert m.distance(inner).sub(0.3).abs().max() < 1e-6
    beyond_end = torch.tensor([[-4.3, -1.5]], dtype=torch.float64)  # outer arc ends at (-4, -1)
    assert m.distance(beyond_end).item() == pytest.approx(math.hypot(0.3, 0.5), abs=1e-9)


def test_rings_and_checker_distances():
    rings = get_manifold("rings2d")
    angle = torch.rand(20, generator=gen(), dtype=torch.float64) * 2 * math.pi
    unit = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    assert rings.distance(4.3 * unit).sub(0.3).abs().max() < 1e-9
    assert rings.distance(0.7 * unit).sub(0.3).abs().max() < 1e-9
    checker = get_manifold("checker2d")
    assert checker.noise_std == 0 and checker.intrinsic_dim == 2
    points = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [-4.3, -3.0], [4.3, 3.5], [-4.3, -4.4]], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0, 0.3, 0.3, 0.5], dtype=torch.float64)  # black cell (0,0) is [-4,-2]^2
    assert torch.allclose(checker.distance(points), expected, atol=1e-9)
    assert (checker.distance(checker.sample(1000, gen())) == 0).all()


def test_spiral_and_helix_normal_push():
    spiral = Spiral2D()
    theta = torch.linspace(math.pi, 3 * math.pi, 9, dtype=torch.float64)
    point = spiral.curve(theta)
    tangent = torch.func.vmap(torch.func.jacfwd(spiral.curve))(theta)
    normal = torch.stack([-tangent[:, 1], tangent[:, 0]], dim=1)
    normal = normal / normal.norm(dim=1, keepdim=True)
    for sign in (1.0, -1.0):
        assert spiral.distance(point + sign * 0.3 * normal).sub(0.3).abs().max() < 1e-6
    helix = Helix3D()
    t = torch.linspace(-5.0, 5.0, 9, dtype=torch.float64)
    radial = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], dim=1)
    assert helix.distance(helix.curve(t) + 0.3 * radial).sub(0.3).abs().max() < 1e-6
    assert helix.distance(helix.curve(t) - 0.3 * radial).sub(0.3).abs().max() < 1e-6


@pytest.mark.parametrize("manifold", [Spiral2D(), Helix3D()], ids=["spiral2d", "helix3d"])
def test_numeric_distance_matches_brute_force(manifold):
    x = manifold.sample_clean(60, gen(5)).double() + 0.8 * torch.randn(60, manifold.ambient_dim, generator=gen(6))
    spiral = isinstance(manifold, Spiral2D)
    t_lo, t_hi = (manifold.theta_min, manifold.theta_max) if spiral else (manifold.t_min, manifold.t_max)
    dense = manifold.curve(torch.linspace(t_lo, t_hi, 400_000, dtype=torch.float64))
    brute = torch.cdist(x, dense).min(dim=1).values
    numeric = manifold.distance(x)
    assert (numeric <= brute + 1e-9).all()
    assert (brute - numeric).max() < 1e-5


def test_torus_normal_push():
    torus = Torus3D()
    u = torch.rand(50, generator=gen(1), dtype=torch.float64) * 2 * math.pi
    v = torch.rand(50, generator=gen(2), dtype=torch.float64) * 2 * math.pi
    outward = torch.stack([torch.cos(u) * torch.cos(v), torch.cos(u) * torch.sin(v), torch.sin(u)], dim=1)
    ring = torch.stack([2.0 * torch.cos(v), 2.0 * torch.sin(v), torch.zeros_like(v)], dim=1)
    for offset in (0.3, -0.3):
        point = ring + (0.7 + offset) * outward
        assert torus.distance(point).sub(0.3).abs().max() < 1e-9


@pytest.mark.parametrize("name", ["sphere64", "helix64"])
def test_embedded_manifold_orthogonal_offset(name):
    m = get_manifold(name)
    assert isinstance(m, EmbeddedManifold) and m.ambient_dim == 64
    frame = m.frame
    assert torch.allclose(frame.T @ frame, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(frame, get_manifold(name).frame)  # fixed seed
    base_point = m.base.sample_clean(20, gen(2)).double()
    if name == "sphere64":
        in_plane = base_point * (1 + 0.3 / base_point.norm(dim=1, keepdim=True))  # radial push 0.3
    else:
        in_plane = base_point + 0.3 * torch.nn.functional.pad(base_point[:, :2] / 2.0, (0, 1))
    complement = torch.randn(20, 64, generator=gen(3), dtype=torch.float64)
    complement = complement - complement @ frame @ frame.T
    complement = 0.4 * complement / complement.norm(dim=1, keepdim=True)
    x = m.embed(in_plane) + complement
    assert m.distance(x).sub(0.5).abs().max() < 1e-6


# --------------------------------------------------------------------------- IDX and CIFAR files
def test_read_idx_valid_wrong_magic_truncated(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for suffix in ("", ".gz"):
        path = write_idx(tmp_path / f"ok-idx3-ubyte{suffix}", images)
        assert np.array_equal(read_idx(path, expected_magic=2051), images)
    raw = (tmp_path / "ok-idx3-ubyte").read_bytes()
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match=r"magic.*corrupted|corrupted.*magic"):
        read_idx(tmp_path / "magic")
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        read_idx(tmp_path / "ok-idx3-ubyte", expected_magic=2049)
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match=r"short.*corrupted or truncated.*needs 40 bytes, file has 35.*download"):
        read_idx(tmp_path / "short")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(ValueError, match="short.gz.*corrupted or truncated"):
        read_idx(tmp_path / "short.gz")


def test_read_idx_refuses_trailing_bytes(tmp_path):
    """A file longer than its header says is not silently cut: the extra bytes mean another layout."""
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 3, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00" * 7)
    with pytest.raises(ValueError, match=r"x-idx3-ubyte.*needs 40 bytes, file has 47"):
        read_idx(path)


def test_mnist_images_and_labels_of_different_counts_are_refused(tmp_path):
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"do not match: images \(5, 28, 28\), labels \(4,\)"):
        load_mnist(tmp_path, "test")
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    images, labels = load_mnist(tmp_path, "test")
    assert images.shape == (5, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(["u1", "i1", "i2", "i4", "f4", "f8"]),
)
def test_idx_round_trip(tmp_path_factory, shape, dtype):
    array = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    path = write_idx(tmp_path_factory.mktemp("idx") / "a.idx", array)
    back = read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_missing_mnist_file_names_path_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist/raw/train-images-idx3-ubyte\.gz.*https://.*ONESTEP_DATA"):
        load_mnist(tmp_path, "train")
    dm = OneStepDataModule("fashion_mnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "fashion_mnist" / "raw")):
        dm.setup()


def test_fake_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.full((5, 28, 28), 255, dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    images, labels = load_mnist(tmp_path, "test")
    assert images.shape == (5, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]


def _write_cifar(tmp_path: Path, as_tarball: bool) -> np.ndarray:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 3}
    first = None
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data if first is None else first
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": list(range(n))}))
    if as_tarball:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    return first


@pytest.mark.parametrize("as_tarball", [False, True], ids=["folder", "tarball"])
def test_cifar10_loader(tmp_path, as_tarball):
    first = _write_cifar(tmp_path, as_tarball)
    images, labels = load_cifar10(tmp_path, "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert np.array_equal(images[:4].numpy().reshape(4, -1), first) and labels[:4].tolist() == [0, 1, 2, 3]
    assert load_cifar10(tmp_path, "test")[0].shape == (3, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz.*toronto"):
        load_cifar10(tmp_path / "empty", "train")


@needs_mnist
def test_real_mnist_test_split():
    images, labels = load_mnist(SHARED, "test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9
    assert images.max() == 255 and images.min() == 0


# --------------------------------------------------------------------------- datamodule
def test_datamodule_synthetic_splits_and_loader():
    dm = OneStepDataModule("torus3d", batch_size=64, n_train=1000, n_val=100, n_test=200, seed=1)
    assert dm.data_shape == (3,) and not dm.is_image and dm.manifold.name == "torus3d"
    dm.setup()
    assert dm.train_data.shape == (1000, 3) and dm.val_data.shape == (100, 3) and dm.test_data.shape == (200, 3)
    assert not torch.equal(dm.val_data[:100], dm.test_data[:100])
    again = OneStepDataModule("torus3d", batch_size=64, n_train=1000, n_val=100, n_test=200, seed=1)
    again.setup()
    assert torch.equal(dm.train_data, again.train_data)
    order = [idx for _, idx in dm.train_dataloader()]
    assert len(order) == 1000 // 64 and all(len(i) == 64 for i in order)
    assert torch.equal(torch.cat(order), torch.cat([idx for _, idx in again.train_dataloader()]))
    x, idx = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and idx.dtype == torch.int64 and torch.equal(dm.train_data[idx], x)
    assert torch.equal(dm.reference("test", 50), dm.test_data[:50])
    # beyond the stored split: fresh draws from the split's own seed (reproducible, not the test split's)
    val = dm.reference("val", 500)
    assert val.shape == (500, 3) and torch.equal(val, again.reference("val", 500))
    assert not torch.isclose(val[:, None], dm.reference("test", 500)[None]).all(-1).any()
    assert dm.manifold.distance(val).median() < 3 * dm.manifold.noise_std + 1e-3  # on the torus, not elsewhere
    small = OneStepDataModule("rings2d", batch_size=64, n_train=10)
    assert [len(i) for _, i in small.train_dataloader()] == [10]  # no drop_last below one batch
    assert OneStepDataModule("8gaussians").n_train == 20000
    assert OneStepDataModule("moons2d", noise_std=0.1).manifold.noise_std == 0.1


def test_datamodule_rejects_bad_options():
    with pytest.raises(ValueError, match=r"dataset='nope'.*known datasets: 8gaussians.*mnist.*cifar10"):
        OneStepDataModule("nope")
    for option, value in [("batch_size", 0), ("n_train", 0), ("n_val", -1), ("n_test", 0)]:
        with pytest.raises(ValueError, match=rf"{option}={value}.*integer >= 1"):
            OneStepDataModule("rings2d", **{option: value})
    with pytest.raises(ValueError, match="noise_std.*only to synthetic"):
        OneStepDataModule("mnist", noise_std=0.1)
    with pytest.raises(ValueError, match="split='bogus'"):
        OneStepDataModule("rings2d").reference("bogus")
    assert {"mnist", "fashion_mnist", "cifar10", *MANIFOLDS} <= set(DATASETS)


def test_image_shapes_known_before_setup_and_normalisation(tmp_path):
    assert OneStepDataModule("cifar10", root=str(tmp_path)).data_shape == (3, 32, 32)
    dm = OneStepDataModule("fashion_mnist", root=str(tmp_path))
    assert dm.data_shape == (1, 28, 28) and dm.is_image and dm.manifold is None
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(dm.denormalize(dm.normalize(x)), x, atol=1e-6)
    pixels = torch.tensor([0, 255], dtype=torch.uint8)
    assert dm.normalize(pixels).tolist() == [-1.0, 1.0]
    synthetic = OneStepDataModule("rings2d")
    assert torch.equal(synthetic.denormalize(synthetic.normalize(x)), x)


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_DATA", str(tmp_path))
    assert OneStepDataModule("mnist").root == tmp_path
    assert OneStepDataModule("mnist", root=str(tmp_path / "x")).root == tmp_path / "x"


@needs_mnist
def test_mnist_datamodule(monkeypatch):
    monkeypatch.delenv("ONESTEP_DATA", raising=False)
    dm = OneStepDataModule("mnist", batch_size=32, n_train=500, n_val=100, n_test=300)
    assert dm.root.resolve() == SHARED.resolve()
    dm.setup()
    assert dm.train_data.shape == (500, 1, 28, 28) and dm.train_data.dtype == torch.float32
    assert dm.train_data.min() >= -1 and dm.train_data.max() <= 1
    assert dm.val_data.shape == (100, 1, 28, 28) and dm.test_data.shape == (300, 1, 28, 28)
    x, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and torch.equal(dm.train_data[idx], x)
    ref = dm.reference("test", 10)
    assert ref.min() >= 0 and ref.max() <= 1 and torch.allclose(dm.normalize(ref), dm.test_data[:10])
    labels = dm.labels("train")
    assert labels.shape == (500,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    assert dm.labels("val").shape == (100,)
