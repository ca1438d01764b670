"""FID / IS / KID / precision-recall with the standard TF-Inception port of torch-fidelity.

Only the real weights (`pt_inception-2015-12-05-6726825d.pth` / torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`, the same 2015-12-05 TF graph ported to PyTorch) give
numbers that may be called `fid`, `is`, `kid`, `rfid`, `gfid`. Nothing is downloaded: without the
file every entry point raises `MissingWeightsError` saying where to put it.

Protocol (ADM's evaluation suite):
- images are resized to `InceptionConfig.resize` (256) with PIL bicubic, then torch-fidelity's
  extractor resizes to 299 with its TF1-exact bilinear and takes pool3 (2048) and unbiased logits;
- gFID: samples vs reference statistics, either an ADM reference batch npz
  (`VIRTUAL_imagenet256_labeled.npz`: `mu`/`sigma` used as-is, `arr_0` images for PR/KID)
  or a dataset split; rFID: reconstructions vs the originals they came from;
- reference statistics are cached by content hash (images bytes + extractor identity).

The Fréchet distance is our own function (`frechet_distance`), checked in the tests against
torch-fidelity's and pytorch-fid's formulas; IS, KID and PR call torch-fidelity's functions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from study.config import nonsemantic
from study.fsio import atomic_write, cache_root
from study.metrics.common import (MissingWeightsError, as_features, content_hash,
                                  pick_device, to_uint8_nchw)

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "VFMSTUDY_INCEPTION_WEIGHTS"


@dataclass
class InceptionConfig:
    weights_path: str = nonsemantic(f"~/.cache/vfmstudy/weights/{INCEPTION_FILENAME}")
    resize: Optional[int] = 256  # ADM: images at 256 px before Inception; None keeps them as they are
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set size
    isc_splits: int = 10
    prc_k: int = 3
    num_samples: int = 50000  # the protocol's sample count (callers generate this many)
    batch_size: int = nonsemantic(64)
    device: str = nonsemantic("auto")
    cache_dir: Optional[str] = nonsemantic(None)  # None: $VFMSTUDY_CACHE or ~/.cache/vfmstudy


# --------------------------------------------------------------------------- Fréchet distance
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), in float64.

    tr((S1 S2)^½) is computed as Σ sqrt(eig(A S2 A)) with A = S1^½ (symmetric PSD, so the
    eigenvalues are real; tiny negative round-off is clipped), which equals the
    sqrtm / eigvals formulations of pytorch-fid and torch-fidelity.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features (unbiased covariance, as TTUR/ADM)."""
    f = as_features(features)
    if len(f) < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(f1, f2) -> float:
    """Fréchet distance between two feature sets (any feature space)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# --------------------------------------------------------------------------- Inception weights
def _candidates(cfg: InceptionConfig) -> list[Path]:
    paths = []
    if os.environ.get(WEIGHTS_ENV):
        paths.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    configured = Path(cfg.weights_path).expanduser()
    paths += [configured, configured.with_name(TORCH_FIDELITY_FILENAME)]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()
    paths.append(torch_home / "hub" / "checkpoints" / TORCH_FIDELITY_FILENAME)
    return paths


def resolve_inception_weights(cfg: InceptionConfig) -> Path:
    """The local Inception weights file, or MissingWeightsError naming it and where to get it."""
    if os.environ.get(WEIGHTS_ENV) and not Path(os.environ[WEIGHTS_ENV]).expanduser().is_file():
        raise MissingWeightsError(f"${WEIGHTS_ENV}={os.environ[WEIGHTS_ENV]} is not a file")
    for path in _candidates(cfg):
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in _candidates(cfg))
    raise MissingWeightsError(
        f"TF-Inception weights not found: {INCEPTION_FILENAME} (tried {tried}). "
        f"On an online machine get torch-fidelity's port from {TORCH_FIDELITY_URL} and put it at "
        f"{Path(cfg.weights_path).expanduser()} (either file name), or set ${WEIGHTS_ENV} / "
        f"inception.weights_path. Without it use the offline spaces fd_ref / fd_vfm:NAME, not fid.")


def random_inception_weights(path: str | Path, seed: int = 0, calib_images: int = 4) -> Path:
    """Write a *randomly initialised* state dict of torch-fidelity's Inception architecture.
    For tests and benchmarks only: numbers computed with it are not FID."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)
    gen = torch.manual_seed(seed)
    model = _Random("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    # calibrate BatchNorm running statistics on random images so activations neither vanish nor
    # explode through the ~90 layers (a default init gives ~1e-8 features and degenerate distances)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (calib_images, 3, 64, 64), dtype=torch.uint8, generator=gen))
    model.eval()
    torch.save(model.state_dict(), path)
    return path


class InceptionExtractor:
    """torch-fidelity's FeatureExtractorInceptionV3 loaded from a local file. `__call__`
    returns (pool3 (N, 2048), unbiased logits (N, 1008)) float64 numpy."""

    def __init__(self, cfg: InceptionConfig | None = None, weights_path: str | Path | None = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.cfg = cfg or InceptionConfig()
        path = Path(weights_path) if weights_path is not None else resolve_inception_weights(self.cfg)
        if not path.is_file():
            raise MissingWeightsError(f"Inception weights file {path} does not exist")
        self.weights_path = path
        self.device = pick_device(self.cfg.device)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        ).to(self.device)
        # identity of the extractor for caches: weights file name + size + the resize protocol
        self.identity = f"tf-inception:{path.name}:{path.stat().st_size}:resize={self.cfg.resize}"

    def prepare(self, images) -> torch.Tensor:
        x = to_uint8_nchw(images)
        size = self.cfg.resize
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        from PIL import Image

        out = np.empty((len(x), size, size, 3), np.uint8)
        for i, img in enumerate(x.permute(0, 2, 3, 1).numpy()):
            out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        pools, logits = [], []
        for start in range(0, n, self.cfg.batch_size):
            batch = self.prepare(images[start:start + self.cfg.batch_size]).to(self.device)
            pool, logit = self.model(batch)
            pools.append(pool.double().cpu().numpy())
            logits.append(logit.double().cpu().numpy())
        return np.concatenate(pools), np.concatenate(logits)


_EXTRACTORS: dict[tuple, InceptionExtractor] = {}


def _extractor(cfg: InceptionConfig) -> InceptionExtractor:
    path = resolve_inception_weights(cfg)
    key = (str(path), cfg.resize, cfg.batch_size, cfg.device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(cfg, path)
    return _EXTRACTORS[key]


def inception_features(images, cfg: InceptionConfig | None = None, *, return_logits: bool = False):
    """pool3 features (N, 2048) float64 of uint8 or [-1, 1] images (and logits if asked)."""
    pool, logits = _extractor(cfg or InceptionConfig())(images)
    return (pool, logits) if return_logits else pool


# --------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    """Reference side of FID: mu/sigma always; pool3 features when images were available
    (needed for KID and precision/recall)."""
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None
    identity: str = ""

    def save(self, path: str | Path) -> Path:
        arrays = {"mu": self.mu, "sigma": self.sigma, "identity": np.array(self.identity)}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        return atomic_write(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        with np.load(path) as z:
            feats = z["features"].astype(np.float64) if "features" in z.files else None
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), feats, str(z["identity"]))


def _stats_cache_dir(cfg: InceptionConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "fid_stats"


def reference_stats_from_images(images, cfg: InceptionConfig | None = None, *, cache: bool = True,
                                data_id: str | None = None) -> ReferenceStats:
    """Inception statistics of a real image set, cached by content hash (images + extractor).
    `data_id` (e.g. a dataset's `identity`) replaces hashing the images when given."""
    cfg = cfg or InceptionConfig()
    extractor = _extractor(cfg)
    key = content_hash(data_id if data_id is not None else np.asarray(to_uint8_nchw(images)),
                       extractor.identity)
    path = _stats_cache_dir(cfg) / f"{key}.npz"
    if cache and path.is_file():
        return ReferenceStats.load(path)
    feats, _ = extractor(images)
    stats = ReferenceStats(*feature_stats(feats), feats, identity=key)
    if cache:
        stats.save(path)
    return stats


def reference_stats_from_dataset(dataset, cfg: InceptionConfig | None = None, *,
                                 max_images: int | None = None, cache: bool = True) -> ReferenceStats:
    """Reference statistics of a dataset split (its uint8 `images`, keyed by its `identity`)."""
    images = dataset.images if max_images is None else dataset.images[:max_images]
    data_id = f"{dataset.identity}:{len(images)}" if getattr(dataset, "identity", None) else None
    return reference_stats_from_images(images, cfg, cache=cache, data_id=data_id)


def reference_stats_from_npz(path: str | Path, cfg: InceptionConfig | None = None, *,
                             cache: bool = True) -> ReferenceStats:
    """ADM reference batch: `mu`/`sigma` (precomputed with the TF graph) are used as they are;
    `arr_0` images, when present, give pool3 features for KID/PR (and mu/sigma if absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} not found (ADM: VIRTUAL_imagenet256_labeled.npz)")
    with np.load(path) as z:
        files = set(z.files)
        mu = z["mu"].astype(np.float64) if "mu" in files else None
        sigma = z["sigma"].astype(np.float64) if "sigma" in files else None
        images = z["arr_0"] if "arr_0" in files else None
    if images is None and mu is None:
        raise ValueError(f"{path}: needs keys mu/sigma or arr_0 (has {sorted(files)})")
    feats = None
    if images is not None:
        ref = reference_stats_from_images(images, cfg, cache=cache)
        feats = ref.features
        if mu is None:
            mu, sigma = ref.mu, ref.sigma
    return ReferenceStats(mu, sigma, feats, identity=f"npz:{path.name}")


# --------------------------------------------------------------------------- the FID family
def inception_score(logits, splits: int = 10) -> float:
    """IS from unbiased logits (torch-fidelity's split/shuffle convention)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    return float(isc_features_to_metric(logits, splits=min(splits, len(logits)))[KEY_METRIC_ISC_MEAN])


def kernel_inception_distance(f_gen, f_ref, subsets: int = 100, subset_size: int = 1000) -> float:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    size = min(subset_size, len(f_gen), len(f_ref))
    out = kid_features_to_metric(torch.as_tensor(as_features(f_gen)), torch.as_tensor(as_features(f_ref)),
                                 kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN])


def precision_recall(f_gen, f_real, k: int = 3) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al., k-NN balls) in any feature space,
    via torch-fidelity's implementation. precision: generated inside the real manifold."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.as_tensor(as_features(f_gen))
    r = torch.as_tensor(as_features(f_real))
    if min(len(g), len(r)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    p, rc = calculate_precision_recall_full(g, r, neighborhood=k, batch_size=10000)
    return {"precision": float(p), "recall": float(rc)}


def compute_fid_family(gen_images, ref, cfg: InceptionConfig | None = None) -> dict[str, float]:
    """{"fid", "is", "kid", "precision", "recall"} of generated (or reconstructed) images against
    `ref`: real images (array/tensor), a dataset (with `images`), or `ReferenceStats`.
    kid/precision/recall are left out when `ref` holds statistics without features."""
    cfg = cfg or InceptionConfig()
    if isinstance(ref, ReferenceStats):
        ref_stats = ref
    elif hasattr(ref, "images") and hasattr(ref, "identity"):
        ref_stats = reference_stats_from_dataset(ref, cfg)
    else:
        ref_stats = reference_stats_from_images(ref, cfg)
    if len(gen_images) < cfg.num_samples:
        warnings.warn(f"{len(gen_images)} samples < protocol {cfg.num_samples}: FID is biased upwards "
                      "and not comparable to published numbers", stacklevel=2)
    pool, logits = inception_features(gen_images, cfg, return_logits=True)
    out = {"fid": frechet_distance(*feature_stats(pool), ref_stats.mu, ref_stats.sigma),
           "is": inception_score(logits, cfg.isc_splits)}
    if ref_stats.features is not None:
        out["kid"] = kernel_inception_distance(pool, ref_stats.features, cfg.kid_subsets, cfg.kid_subset_size)
        out.update(precision_recall(pool, ref_stats.features, cfg.prc_k))
    return out


def rfid(reconstructions, originals, cfg: InceptionConfig | None = None) -> dict[str, float]:
    """rFID family: reconstructions vs the originals they came from (keys prefixed `r`)."""
    return {f"r{k}" if k in ("fid", "is") else k: v
            for k, v in compute_fid_family(reconstructions, originals, cfg).items()}


def gfid(samples, reference, cfg: InceptionConfig | None = None) -> dict[str, float]:
    """gFID family: samples vs reference (npz stats / dataset split / images)."""
    out = compute_fid_family(samples, reference, cfg)
    out["gfid"] = out.pop("fid")
    return out
