"""Evaluation metrics: pure functions on tensors/arrays plus small feature-extractor classes.

A leaf: imports nothing from the study engine, the training loop, the data package or the
tokenizer/generator models (tests/test_layering.py); a VFM feature space takes a built backbone.

Naming honesty: `fid`/`is`/`kid`/`rfid`/`gfid` come only from `study.metrics.fid` with the real
TF-Inception weights (a local file); offline spaces are `fd_ref` and `fd_vfm:NAME`.
"""

from study.metrics.codebook import code_histogram, codebook_stats, latent_stats
from study.metrics.common import MissingWeightsError, content_hash, to_float_nchw, to_uint8_nchw, to_unit_range
from study.metrics.features import (FeatureSpace, InceptionSpace, RefSpace, VFMSpace, distribution_metrics,
                                    fd_in_space, metric_key)
from study.metrics.fid import (InceptionConfig, InceptionExtractor, ReferenceStats, compute_fid_family,
                               feature_stats, fid_from_features, frechet_distance, gfid, inception_features,
                               inception_score, kernel_inception_distance, precision_recall,
                               reference_stats_from_dataset, reference_stats_from_images,
                               reference_stats_from_npz, resolve_inception_weights, rfid)
from study.metrics.grids import class_grid, make_grid, reconstruction_grid
from study.metrics.image import (lpips_distance, psnr, psnr_per_image, reconstruction_metrics, ssim,
                                 ssim_per_image)
from study.metrics.probes import effective_rank, feature_report, knn_accuracy, linear_probe, pool_tokens, uniformity
from study.metrics.reference import RefCNN, ReferenceClassifier, class_consistency

__all__ = [
    "FeatureSpace", "InceptionConfig", "InceptionExtractor", "InceptionSpace", "MissingWeightsError", "RefCNN",
    "RefSpace", "ReferenceClassifier", "ReferenceStats", "VFMSpace",
    "class_consistency", "class_grid", "code_histogram", "codebook_stats", "compute_fid_family", "content_hash",
    "distribution_metrics", "effective_rank", "fd_in_space", "feature_report", "feature_stats",
    "fid_from_features", "frechet_distance", "gfid", "inception_features", "inception_score",
    "kernel_inception_distance", "knn_accuracy", "latent_stats", "linear_probe", "lpips_distance", "make_grid",
    "metric_key", "pool_tokens", "precision_recall", "psnr", "psnr_per_image", "reconstruction_grid",
    "reconstruction_metrics", "reference_stats_from_dataset", "reference_stats_from_images",
    "reference_stats_from_npz", "resolve_inception_weights", "rfid", "ssim", "ssim_per_image",
    "to_float_nchw", "to_uint8_nchw", "to_unit_range", "uniformity",
]
