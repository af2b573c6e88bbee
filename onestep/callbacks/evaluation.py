"""``EvaluationCallback``: the evaluation protocol, run every N steps and at the end of training.

Protocol (recorded with every result): ``n_samples`` generated samples are drawn with the EMA weights
(``pl_module.sample_chunked``), split across processes (rank r draws ``n_r`` of them, the first
``n % world_size`` ranks one more, from a generator seeded with ``seed + 1_000_003 * r``), denormalised
to raw units and compared with ``datamodule.reference(reference_split, n_samples)`` (split across ranks
in contiguous blocks). Every metric is a torchmetrics ``Metric`` whose states are gathered (cat) or summed
across processes and computed on every rank, so all ranks log the same numbers, equal to a single process
holding the same samples. W2/SW2 are computed in raw units; FD in each named feature space
(``eval/fd_<feature>``); precision/recall/density/coverage in the last feature space (raw units for
synthetic data); distance-to-manifold statistics when the datamodule has a ``manifold``. These numbers come
from :func:`onestep.metrics.suite.evaluate_samples`, the code the benchmark's data floor and NFE sweep use.
``eval/samples_per_s`` times the evaluation's own ``sample_chunked`` call on each rank (after a small
untimed warm-up call, CUDA synchronised) and averages ``n_r / seconds`` over ranks (per-device throughput);
``eval/nfe`` is ``pl_module.nfe``. A model may add metrics with ``extra_eval_metrics(samples_raw) -> dict``
(called on every rank with all ranks' samples).

Results go to every logger (rank 0) and, as one JSON line ``{"step", "metrics", "protocol"}``, to
``<log_dir>/eval.jsonl``. ``final_metrics`` holds the last result.

A staged model (teacher then student, autoencoder then generator) is not scored before the stage its samples
come from (``untrained_sampler()``): the evaluation is skipped with a warning, ``skipped`` says why, and a
skipped final evaluation leaves ``final_metrics`` at ``None`` (the benchmark runner then fails the cell).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from onestep.callbacks.visuals import run_title, save_image_grid, save_scatter
from onestep.data.datamodule import SPLITS
from onestep.data.image_sets import RegistryView, lenet_spellings
from onestep.metrics import check_feature_space, get_feature_extractor, reference_features, sha256_file
from onestep.metrics.features import FEATURES, WEIGHTS_DIR
from onestep.metrics.speed import timed
from onestep.metrics.suite import FeatureSpaces, MetricOptions, evaluate_samples
from onestep.modules import eval_mode

#: dataset spelling -> its default LeNet feature space, read from the image-dataset registry
LENET_FOR_DATASET = RegistryView(lambda: {k: e.feature_space for k, e in lenet_spellings().items()})
RANK_SEED_STRIDE = 1_000_003


def split_counts(n: int, world_size: int) -> list[int]:
    """How many of ``n`` samples each rank draws (the first ``n % world_size`` ranks one more)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_evaluation_options(every_n_steps: Any, n_samples: Any, reference_split: Any, feature_space: Any,
                             w2_max_samples: Any, offmanifold_threshold: Any, seed: Any, prdc_k: Any,
                             sw_projections: Any, chunk_size: Any) -> None:
    """Refuse a bad evaluation option when the callback is built, i.e. before training: an option that only
    fails at the first evaluation would cost the whole run (the final evaluation comes after the last step).

    ``n_samples >= prdc_k + 1``: PRDC's k-NN radius of a real point needs k other real points."""
    def bad(option: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"--eval.{option}={value!r} is not allowed; use {allowed}")

    if every_n_steps is not None and (not _is_int(every_n_steps) or every_n_steps < 0):
        raise bad("every_n_steps", every_n_steps, "an integer >= 1 (evaluate every N training steps), "
                  "or 0 / null for no periodic evaluation (the final one is --eval.at_end)")
    if not _is_int(prdc_k) or prdc_k < 1:
        raise bad("prdc_k", prdc_k, "an integer >= 1 (neighbours of the PRDC radius)")
    if not _is_int(n_samples) or n_samples < prdc_k + 1:
        raise bad("n_samples", n_samples, f"an integer >= {prdc_k + 1} (PRDC with --eval.prdc_k={prdc_k} needs "
                  f"k + 1 samples; a few thousand give stable metrics)")
    if reference_split not in SPLITS:
        raise bad("reference_split", reference_split, f"one of {', '.join(SPLITS)}")
    names = [feature_space] if isinstance(feature_space, str) else feature_space
    if names is not None:
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise bad("feature_space", feature_space, f"a name or a list of names among {', '.join(sorted(FEATURES))}"
                      ", or null (the dataset's default)")
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise bad("feature_space", feature_space, f"names among {', '.join(sorted(FEATURES))}, or null (the "
                      f"dataset's default); unknown: {', '.join(unknown)}")
    if w2_max_samples is not None and (not _is_int(w2_max_samples) or w2_max_samples < 2):
        raise bad("w2_max_samples", w2_max_samples, "an integer >= 2, or null (all samples; exact OT is cubic)")
    if (isinstance(offmanifold_threshold, bool) or not isinstance(offmanifold_threshold, (int, float))
            or not math.isfinite(offmanifold_threshold) or offmanifold_threshold <= 0):
        raise bad("offmanifold_threshold", offmanifold_threshold, "a finite number > 0 (a distance in data units)")
    if not _is_int(seed) or seed < 0:
        raise bad("seed", seed, "an integer >= 0")
    for option, value in (("sw_projections", sw_projections), ("chunk_size", chunk_size)):
        if not _is_int(value) or value < 1:
            raise bad(option, value, "an integer >= 1")


class EvaluationCallback(Callback):
    """Evaluate the EMA generator every ``every_n_steps`` training steps (``global_step``; under manual
    optimisation, generator updates) and at the end of training.

    Args:
        every_n_steps: evaluate every this many training steps (0 or null: only at the end).
        n_samples: generated samples per evaluation, compared with as many reference samples (> prdc_k).
        reference_split: data split the samples are compared with: train, val or test.
        feature_space: Fréchet distance / PRDC feature space(s): pixels, lenet-mnist, lenet-fashion, inception
            (needs feature_weights_path), or a list of them. Default: none for synthetic data (raw units),
            pixels plus the dataset's LeNet for MNIST-like images.
        w2_max_samples: exact W2 (POT) on at most this many points per side (null: all; cost grows as n^3).
        offmanifold_threshold: distance to the data manifold (raw units) beyond which a sample is off-manifold.
        seed: seed of the evaluation's sampling noise (the same for every evaluation of a run).
        at_end: evaluate once more when training ends.
        pictures: draw a sample grid (images) or a scatter against the data (vectors) at each evaluation.
        prdc_k: neighbours k of precision / recall / density / coverage.
        sw_projections: random directions of the sliced W2.
        chunk_size: samples generated per forward pass (memory bound).
        feature_weights_path: weights file of the feature network (default: the shipped LeNet weights).
        cache_dir: cache of the reference features (default: $ONESTEP_CACHE, else ~/.cache/onestep).
    """

    def __init__(self, every_n_steps: int | None = 1000, n_samples: int = 2048,
                 reference_split: Literal["train", "val", "test"] = "test",
                 feature_space: str | Sequence[str] | None = None, w2_max_samples: int | None = 2048,
                 offmanifold_threshold: float = 0.1, seed: int = 0, at_end: bool = True, pictures: bool = True,
                 prdc_k: int = 5, sw_projections: int = 256, chunk_size: int = 4096,
                 feature_weights_path: str | None = None, cache_dir: str | None = None):
        super().__init__()
        check_evaluation_options(every_n_steps=every_n_steps, n_samples=n_samples, reference_split=reference_split,
                                 feature_space=feature_space, w2_max_samples=w2_max_samples,
                                 offmanifold_threshold=offmanifold_threshold, seed=seed, prdc_k=prdc_k,
                                 sw_projections=sw_projections, chunk_size=chunk_size)
        self.every_n_steps, self.n_samples, self.reference_split = every_n_steps, int(n_samples), reference_split
        self.feature_space = [feature_space] if isinstance(feature_space, str) else feature_space
        self.w2_max_samples, self.offmanifold_threshold, self.seed = w2_max_samples, offmanifold_threshold, seed
        self.at_end, self.pictures, self.prdc_k = at_end, pictures, prdc_k
        self.sw_projections, self.chunk_size = sw_projections, chunk_size
        self.feature_weights_path, self.cache_dir = feature_weights_path, cache_dir
        self.final_metrics: dict[str, float] | None = None
        self.skipped: str | None = None  # why the last evaluation was skipped (an untrained sampler), if it was
        self.history: list[dict[str, Any]] = []
        self._spaces: list[str] | None = None
        self._extractors: dict[str, Any] = {}
        self._reference: Tensor | None = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------ set-up
    def resolve_feature_spaces(self, datamodule) -> list[str]:
        """Explicit names are checked (errors raised now, before training); ``None`` means: none for
        synthetic data, ``pixels`` plus the dataset's LeNet (when its weights load) for MNIST-like images."""
        if self.feature_space is not None:
            for name in self.feature_space:
                check_feature_space(name, self.feature_weights_path if name != "pixels" else None)
            return list(self.feature_space)
        if not getattr(datamodule, "is_image", False):
            return []
        spaces = ["pixels"]
        lenet = LENET_FOR_DATASET.get(str(getattr(datamodule, "dataset", "")).lower())
        if lenet is not None:
            try:
                check_feature_space(lenet)
                spaces.append(lenet)
            except Exception as err:  # missing/corrupted weights: evaluate in pixels only, loudly
                warnings.warn(f"{lenet} features unavailable ({err}); evaluating FD/PRDC in pixels only")
        return spaces

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.datamodule is None:
            raise RuntimeError("EvaluationCallback needs trainer.datamodule (a OneStepDataModule); "
                               "pass datamodule=... to trainer.fit")
        self._spaces = self.resolve_feature_spaces(trainer.datamodule)
        self._reference = None

    def protocol(self, trainer: Trainer) -> dict[str, Any]:
        dm = trainer.datamodule
        spaces = self._spaces or []
        weights = {}
        for name in spaces:
            if name.startswith("lenet-"):
                path = Path(self.feature_weights_path or WEIGHTS_DIR / f"{name}.pt")
                weights[name] = sha256_file(path)
        protocol = {"n_samples": self.n_samples, "reference_split": self.reference_split,
                    "feature_space": spaces or None, "seed": self.seed, "w2_max_samples": self.w2_max_samples,
                    "world_size": trainer.world_size, "prdc_k": self.prdc_k,
                    "prdc_space": spaces[-1] if spaces else "raw", "sw_projections": self.sw_projections,
                    "offmanifold_threshold": self.offmanifold_threshold,
                    "dataset": getattr(dm, "dataset", None), "feature_weights_sha256": weights or None}
        if "inception" in spaces and getattr(dm, "dataset", "") in LENET_FOR_DATASET:
            protocol["note"] = "Inception FD on MNIST-like data is not comparable to published FID"
        if getattr(dm, "skipped_metrics", None):  # e.g. a file of points: no support, no manifold metrics
            protocol["skipped_metrics"] = dict(dm.skipped_metrics)
        return protocol

    # ------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end and (trainer.global_step != self._last_step or self.skipped):  # skipped: say it ended so
            self.evaluate(trainer, pl_module, final=True)

    # ------------------------------------------------------------------------------------ evaluation
    def _gather(self, trainer: Trainer, x: Tensor, counts: list[int]) -> Tensor:
        """All ranks' samples in rank order (padded all_gather, then trimmed to the known counts)."""
        if trainer.world_size == 1:
            return x
        padded = torch.cat([x, x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))])
        gathered = trainer.strategy.all_gather(padded)
        return torch.cat([gathered[r, :c] for r, c in enumerate(counts)])

    def _real_features(self, name: str, reference: Tensor, dm) -> Tensor:
        extractor = self._extractor(name)
        if name == "pixels":
            return extractor(reference)
        tag = [f"seed{getattr(dm, 'seed', 'na')}"]
        if name.startswith("lenet-"):
            tag.insert(0, sha256_file(self.feature_weights_path or WEIGHTS_DIR / f"{name}.pt")[:12])
        feats = reference_features(name, getattr(dm, "dataset", "data"), self.reference_split, self.n_samples,
                                   lambda: extractor(reference), self.cache_dir, tag="-".join(tag))
        return feats.to(reference.device)

    def _extractor(self, name: str):
        if name not in self._extractors:
            use_path = self.feature_weights_path is not None and name != "pixels"
            kw = {"weights_path": self.feature_weights_path} if use_path else {}
            self._extractors[name] = get_feature_extractor(name, **kw)
        return self._extractors[name]

    def _feature_spaces(self, dm, reference: Tensor, world: int, rank: int) -> FeatureSpaces:
        """name -> (extractor, this rank's share of the reference features), in ``self._spaces`` order."""
        with torch.no_grad():
            return {name: (self._extractor(name), torch.tensor_split(self._real_features(name, reference, dm),
                                                                     world)[rank]) for name in self._spaces}

    def _sample(self, pl_module: LightningModule, n: int, rank: int) -> tuple[Tensor, float]:
        """This rank's ``n`` samples (EMA weights, eval mode, training's RNG untouched) and their time."""
        device = pl_module.device
        with eval_mode(pl_module), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.no_grad():
            warm = torch.Generator(device=device).manual_seed(self.seed + RANK_SEED_STRIDE * rank + 7)
            pl_module.sample_chunked(min(n, 16), chunk_size=self.chunk_size, generator=warm)  # warm-up, untimed
            gen = torch.Generator(device=device).manual_seed(self.seed + RANK_SEED_STRIDE * rank)
            # this module's clock: the DDP tests replace it with a fake one
            return timed(lambda: pl_module.sample_chunked(n, chunk_size=self.chunk_size, generator=gen), device,
                         clock=time.perf_counter)

    def metric_options(self) -> MetricOptions:
        return MetricOptions(seed=self.seed, w2_max_samples=self.w2_max_samples, sw_projections=self.sw_projections,
                             prdc_k=self.prdc_k, offmanifold_threshold=self.offmanifold_threshold)

    def compute_metrics(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], Tensor]:
        """Run the protocol on every rank; returns (metrics, all ranks' raw samples or None)."""
        dm, device = trainer.datamodule, pl_module.device
        world, rank = trainer.world_size, trainer.global_rank
        counts = split_counts(self.n_samples, world)
        if self._spaces is None:
            self._spaces = self.resolve_feature_spaces(dm)
        samples, seconds = self._sample(pl_module, counts[rank], rank)
        fake = dm.denormalize(samples).detach().to(device)
        if self._reference is None:
            self._reference = dm.reference(self.reference_split, self.n_samples).detach().to(device)
        real = torch.tensor_split(self._reference, world)[rank]
        suite = evaluate_samples(fake, real, getattr(dm, "manifold", None),
                                 self._feature_spaces(dm, self._reference, world, rank), self.metric_options(),
                                 sync=True)
        metrics: dict[str, Any] = {f"eval/{k}": v for k, v in suite.items()}
        speed = torch.tensor(counts[rank] / max(seconds, 1e-12), dtype=torch.float64, device=device)
        metrics["eval/samples_per_s"] = trainer.strategy.reduce(speed, reduce_op="mean")
        if getattr(pl_module, "nfe", None) is not None:
            metrics["eval/nfe"] = torch.tensor(float(pl_module.nfe))
        everything = None
        if self.pictures or hasattr(pl_module, "extra_eval_metrics"):
            everything = self._gather(trainer, fake, counts)
        if hasattr(pl_module, "extra_eval_metrics"):
            extra = pl_module.extra_eval_metrics(everything) or {}
            metrics.update({(k if k.startswith("eval/") else f"eval/{k}"): v for k, v in extra.items()})
        return {k: float(v) for k, v in metrics.items()}, everything

    @staticmethod
    def untrained_reason(pl_module: LightningModule) -> str | None:
        """Why ``pl_module``'s samples would come from untrained networks (a staged model before its sampling
        stage, :meth:`onestep.generators.staged.StagedTraining.untrained_sampler`), or ``None``."""
        untrained = getattr(pl_module, "untrained_sampler", None)
        return untrained() if callable(untrained) else None

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, final: bool = False) -> dict[str, float]:
        """Compute the metrics (all ranks), then log, append to eval.jsonl and draw (rank 0)."""
        step = trainer.global_step
        self._last_step = step
        reason = self.untrained_reason(pl_module)
        if reason:  # a staged model before the stage its samples come from: nothing trained to score
            self.skipped = f"no evaluation at step {step}: {reason}"
            if final:
                self.final_metrics = None
            if trainer.is_global_zero:
                warnings.warn(self.skipped + ("; training ended before it: raise trainer.max_steps (or the "
                                              "suite's minutes) or move the stage switch earlier" if final else ""))
            return {}
        self.skipped = None
        metrics, everything = self.compute_metrics(trainer, pl_module)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: call on every rank
        record = {"step": step, "metrics": metrics, "protocol": self.protocol(trainer)}
        self.final_metrics, self.final_protocol = metrics, record["protocol"]
        self.history.append(record)
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                if final:
                    logger.save()
            with open(log_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.pictures and everything is not None:
                try:
                    self._draw(trainer, everything, log_dir / f"samples_step{step}.png", step, metrics)
                except Exception as err:  # a picture must never stop training
                    warnings.warn(f"could not draw the samples of step {step}: {err}")
        return metrics

    def _draw(self, trainer: Trainer, samples: Tensor, path: Path, step: int,
              metrics: dict[str, float] | None = None) -> None:
        title = run_title(type(trainer.lightning_module).__name__, getattr(trainer.datamodule, "dataset", None),
                          step, metrics)
        if samples.dim() == 4:
            real = self._reference[:8].to(samples.device) if self._reference is not None else None
            save_image_grid(samples[:56], path, nrow=8, title=title, real=real)
        else:
            save_scatter(samples, self._reference, path, title=title)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger (and others with the same API)
                try:
                    logger.log_image(key="eval/samples", images=[str(path)], step=step)
                except Exception as err:  # a picture must never stop training
                    warnings.warn(f"could not send {path.name} to {type(logger).__name__}: {err}")
