"""EvaluationCallback on tiny fake models/datamodules, pictures and loggers."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from onestep.callbacks import EvaluationCallback, make_loggers, save_image_grid, save_scatter
from onestep.callbacks.evaluation import split_counts
from onestep.metrics import frechet_distance, get_feature_extractor
from conftest import SHARED_DATA, needs_mnist

KEYS = {"eval/w2", "eval/sw2", "eval/manifold_dist_mean", "eval/manifold_dist_median", "eval/manifold_dist_p95",
        "eval/offmanifold", "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/nfe",
        "eval/samples_per_s"}
CENTERS = 2.0 * torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)])
PNG = b"\x89PNG\r\n\x1a\n"


class EightPoints:
    """Noiseless support: the 8 centres; distance = distance to the nearest centre."""

    def distance(self, x):
        return torch.cdist(x.float(), CENTERS.to(x.device)).min(1).values


def eight_gaussians(n, generator, std=0.02):
    k = torch.randint(0, 8, (n,), generator=generator)
    return CENTERS[k] + std * torch.randn(n, 2, generator=generator)


class ToyData(L.LightningDataModule):
    """8 gaussians in raw units; normalised space is raw / 2 (so denormalisation matters)."""

    dataset, is_image, data_shape, seed = "toy8", False, (2,), 0

    def __init__(self):
        super().__init__()
        self.manifold = EightPoints()
        self.train_data = self.normalize(eight_gaussians(256, torch.Generator().manual_seed(1)))

    def normalize(self, x):
        return x / 2

    def denormalize(self, x):
        return x * 2

    def reference(self, split="test", n=None):
        return eight_gaussians(n or 512, torch.Generator().manual_seed(2))

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train_data, torch.arange(len(self.train_data))), batch_size=32)


class ToyImages(ToyData):
    dataset, is_image, data_shape = "mnist", True, (1, 28, 28)

    def __init__(self):
        L.LightningDataModule.__init__(self)
        self.manifold = None
        self.train_data = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def normalize(self, x):
        return x * 2 - 1

    def denormalize(self, x):
        return (x + 1) / 2

    def reference(self, split="test", n=None):
        return torch.rand(n or 64, 1, 28, 28, generator=torch.Generator().manual_seed(2))


class FakeGenerator(L.LightningModule):
    """``good``: samples the data distribution itself; otherwise collapsed at the data mean."""

    nfe = 1

    def __init__(self, good=True, image=False):
        super().__init__()
        self.good, self.image = good, image
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((batch[0].mean() - self.w) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @torch.no_grad()
    def sample_chunked(self, n, chunk_size=4096, generator=None):
        if self.image:
            return torch.rand(n, 1, 28, 28, generator=generator) * 2 - 1
        if not self.good:
            return torch.zeros(n, 2) + 1e-3 * torch.randn(n, 2, generator=generator)
        return eight_gaussians(n, generator) / 2


def fit(tmp_path, model, data, callback, max_steps=4, **trainer_kwargs):
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=CSVLogger(tmp_path, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return trainer


def test_good_model_scores_better_than_collapsed_and_files_are_written(tmp_path):
    results = {}
    for good in (True, False):
        callback = EvaluationCallback(every_n_steps=2, n_samples=256, w2_max_samples=256, seed=3)
        trainer = fit(tmp_path / str(good), FakeGenerator(good), ToyData(), callback)
        log_dir = Path(trainer.log_dir)
        lines = [json.loads(line) for line in (log_dir / "eval.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [2, 4]  # every 2 steps; the end (step 4) is not repeated
        assert set(lines[-1]["metrics"]) == KEYS
        protocol = lines[-1]["protocol"]
        assert {"n_samples": 256, "reference_split": "test", "feature_space": None, "seed": 3,
                "w2_max_samples": 256, "world_size": 1}.items() <= protocol.items()
        assert callback.final_metrics == lines[-1]["metrics"]
        assert (log_dir / "samples_step4.png").read_bytes()[:8] == PNG
        assert "eval/w2" in (log_dir / "metrics.csv").read_text().splitlines()[0]
        results[good] = callback.final_metrics
    good, bad = results[True], results[False]
    # collapsed at the origin: W2 = radius 2; the good model only pays for mode-weight fluctuations
    assert bad["eval/w2"] == pytest.approx(2.0, abs=0.05) and good["eval/w2"] < 0.4 * bad["eval/w2"]
    assert good["eval/offmanifold"] < 0.01 and bad["eval/offmanifold"] == 1.0
    assert good["eval/recall"] > 0.9 and bad["eval/recall"] < 0.05 and good["eval/nfe"] == 1


class GlobalStreamGenerator(FakeGenerator):
    """A generator that also draws from the global torch stream while sampling (dropout, a default
    generator somewhere in a network): the evaluation must not let that shift training's randomness."""

    draws = 0

    def sample_chunked(self, n, chunk_size=4096, generator=None):
        GlobalStreamGenerator.draws += 1
        torch.rand(n)
        return super().sample_chunked(n, chunk_size, generator)


def test_evaluation_leaves_training_rng_untouched(tmp_path):
    callback = EvaluationCallback(every_n_steps=1, n_samples=64, pictures=False)
    torch.manual_seed(0)
    fit(tmp_path, GlobalStreamGenerator(), ToyData(), callback, max_steps=1)
    after_eval = torch.rand(3)
    assert GlobalStreamGenerator.draws >= 1 and callback.final_metrics is not None  # it did sample
    torch.manual_seed(0)
    fit(tmp_path, GlobalStreamGenerator(), ToyData(), EvaluationCallback(every_n_steps=None, at_end=False),
        max_steps=1)
    assert torch.equal(after_eval, torch.rand(3))


def test_image_dataset_uses_pixels_and_lenet_and_caches_real_features(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    callback = EvaluationCallback(every_n_steps=None, n_samples=64, seed=1)
    trainer = fit(tmp_path, FakeGenerator(image=True), ToyImages(), callback, max_steps=1)
    metrics = callback.final_metrics
    assert {"eval/fd_pixels", "eval/fd_lenet-mnist", "eval/w2", "eval/precision"} <= set(metrics)
    assert "eval/offmanifold" not in metrics and callback.final_protocol["prdc_space"] == "lenet-mnist"
    assert len(callback.final_protocol["feature_weights_sha256"]["lenet-mnist"]) == 64
    assert len(list((tmp_path / "cache" / "features").glob("mnist-test-lenet-mnist-n64-*.pt"))) == 1
    assert (Path(trainer.log_dir) / "samples_step1.png").read_bytes()[:8] == PNG
    # the FD values themselves: the generated images in [0, 1] (denormalised) against the reference
    fake = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1 + 1) / 2
    real = ToyImages().reference("test", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer samples than pixel dimensions: expected here
        for name in ("pixels", "lenet-mnist"):
            features = get_feature_extractor(name)
            expected = frechet_distance(features(fake), features(real)).item()
            assert metrics[f"eval/fd_{name}"] == pytest.approx(expected, rel=1e-5), name


class MnistTrainImages(FakeGenerator):
    """'Generates' the first n MNIST training images (normalised to [-1, 1], as a model would)."""

    def sample_chunked(self, n, chunk_size=4096, generator=None):
        return self.trainer.datamodule.train_data[:n].float()


@needs_mnist
def test_lenet_fd_of_mnist_train_against_test_through_the_callback(tmp_path):
    """Real MNIST train images scored against the test images in LeNet space, through the whole
    pipeline (denormalisation, reference features, cache): the value equals LeNet features of both sets
    in [0, 1] (the range LeNet was trained on) and sits near the data's own floor (11.4 measured with
    2000 images a side; 20.4 when the reference is fed on [-1, 1])."""
    from onestep.data import OneStepDataModule

    data = OneStepDataModule("mnist", batch_size=64, n_train=2000, n_test=2000, root=str(SHARED_DATA))
    callback = EvaluationCallback(every_n_steps=None, n_samples=2000, pictures=False, feature_space="lenet-mnist",
                                  cache_dir=str(tmp_path / "cache"), w2_max_samples=256)  # W2 not under test
    fit(tmp_path, MnistTrainImages(), data, callback, max_steps=1)
    lenet = get_feature_extractor("lenet-mnist")
    train01, test01 = data.denormalize(data.train_data[:2000].float()), data.reference("test", 2000)
    assert 0 <= float(train01.min()) and float(train01.max()) <= 1 and float(test01.max()) <= 1
    expected = frechet_distance(lenet(train01), lenet(test01)).item()
    assert callback.final_metrics["eval/fd_lenet-mnist"] == pytest.approx(expected, rel=1e-4)
    assert 10.5 < expected < 12.5  # 11.35 measured (2000 a side; 1.23 with 10000 a side)


def test_extra_eval_metrics_hook_and_unknown_feature_space(tmp_path):
    class WithExtra(FakeGenerator):
        def extra_eval_metrics(self, samples_raw):
            return {"intrinsic_logdensity": samples_raw.shape[0]}

    callback = EvaluationCallback(every_n_steps=None, n_samples=100, pictures=False, feature_space="pixels")
    fit(tmp_path, WithExtra(), ToyData(), callback, max_steps=1)
    assert callback.final_metrics["eval/intrinsic_logdensity"] == 100 and "eval/fd_pixels" in callback.final_metrics
    with pytest.raises(ValueError, match="lenet-mnist"):
        fit(tmp_path, FakeGenerator(), ToyData(), EvaluationCallback(feature_space="nope"), max_steps=1)


def test_split_counts():
    assert split_counts(10, 3) == [4, 3, 3] and sum(split_counts(2048, 7)) == 2048


def test_pictures_are_pngs_for_every_dimension(tmp_path):
    g = torch.Generator().manual_seed(0)
    for dim in (1, 2, 3, 6):
        path = save_scatter(torch.randn(200, dim, generator=g), torch.randn(300, dim, generator=g),
                            tmp_path / f"s{dim}.png", title=f"D={dim}")
        assert path.read_bytes()[:8] == PNG
    save_image_grid(torch.rand(10, 1, 28, 28, generator=g), tmp_path / "grid.png", nrow=4)
    save_image_grid(torch.rand(4, 3, 32, 32, generator=g), tmp_path / "rgb.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    with pytest.raises(ValueError, match="N, 1|3"):
        save_image_grid(torch.rand(4, 2, 8, 8), tmp_path / "bad.png")


def test_make_loggers(tmp_path):
    loggers = make_loggers(tmp_path, "run")
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install wandb"):
            make_loggers(tmp_path, "run", wandb=True)
        return
    loggers = make_loggers(tmp_path, "run", wandb=True, group="toy", config={"method": "fake"})
    assert type(loggers[1]).__name__ == "WandbLogger"


def test_wandb_offline_run_has_metrics_and_picture(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = make_loggers(tmp_path, "run", wandb=True, group="toy", config={"method": "fake"})
    callback = EvaluationCallback(every_n_steps=2, n_samples=128)
    trainer = L.Trainer(max_steps=2, callbacks=[callback], logger=loggers, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(FakeGenerator(), datamodule=ToyData())
    import wandb

    wandb.finish()
    # finish() returns once the service has the run's records, not once its writer has flushed the offline
    # file (under load the file held only its header); teardown() waits for the service process to exit,
    # which closes the file: read it only then
    wandb.teardown()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    history = next(run_dir.glob("run-*.wandb")).read_bytes()  # the offline run's protobuf records
    assert b"eval/w2" in history and b"eval/offmanifold" in history and b"eval/samples" in history
    assert list((run_dir / "files" / "media" / "images").rglob("samples*.png"))
