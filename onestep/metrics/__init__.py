"""Evaluation metrics (plain functions and DDP-correct torchmetrics ``Metric`` classes) and feature spaces."""
from onestep.metrics.features import (FEATURES, FeatureExtractor, LeNet, check_feature_space, default_cache_dir,
                                      get_feature_extractor, load_lenet_state, main_train_features,
                                      reference_features, sha256_file, train_lenet)
from onestep.metrics.frechet import FrechetDistance, frechet_distance, frechet_from_moments
from onestep.metrics.manifold import ManifoldDistance, manifold_distance_stats
from onestep.metrics.prdc import PRDC, prdc
from onestep.metrics.speed import describe_machine, measure_sampling_speed, synchronize, timed
from onestep.metrics.suite import METRIC_GROUPS, MetricOptions, evaluate_samples
from onestep.metrics.wasserstein import SlicedWasserstein2, Wasserstein2, sliced_wasserstein, wasserstein2

__all__ = [
    "FEATURES", "FeatureExtractor", "LeNet", "check_feature_space", "default_cache_dir", "get_feature_extractor",
    "load_lenet_state", "main_train_features", "reference_features", "sha256_file", "train_lenet",
    "FrechetDistance", "frechet_distance", "frechet_from_moments", "ManifoldDistance", "manifold_distance_stats",
    "PRDC", "prdc", "describe_machine", "measure_sampling_speed", "synchronize", "timed",
    "METRIC_GROUPS", "MetricOptions", "evaluate_samples",
    "SlicedWasserstein2", "Wasserstein2", "sliced_wasserstein", "wasserstein2",
]
