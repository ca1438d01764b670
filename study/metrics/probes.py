"""Representation probes (arrays in, numbers out): linear probe, kNN, effective rank, uniformity.

Used for VFM pooled features and for tokenizer latents alike; inputs of rank > 2 are flattened
per sample (pool tokens first with `pool_tokens` if a permutation-invariant summary is wanted).

Protocols:
- linear probe: features standardised on the train split (StandardScaler), multinomial
  LogisticRegression (max_iter 1000; Newton-Cholesky for up to NEWTON_MAX_PARAMS weights,
  lbfgs above: both solve the same convex problem, Newton in a few iterations where lbfgs
  needs hundreds at weak regularisation); C chosen by stratified k-fold cross-validation on
  the train split over `Cs`; accuracy of the refit model on the val split.
- kNN: cosine similarity, k = 20 neighbours, votes weighted by exp(sim / 0.07) (the DINO
  protocol); `weighting="uniform"` gives plain majority.
- effective rank: exp of the entropy of the normalised singular values of the (uncentred)
  feature matrix (RankMe, Garrido et al. 2023), in [1, min(N, D)].
- uniformity: log E_{i != j} exp(-2 ||u_i - u_j||²) on l2-normalised features
  (Wang & Isola 2020); lower = more uniform on the sphere.
"""

from __future__ import annotations

import numpy as np
import torch

from study.metrics.common import as_features

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Newton-Cholesky's Hessian has (features x classes)^2 entries: fast for pooled VFM features
# (64 x 10: 10x faster than lbfgs at C = 10), hopeless for flattened tokenizer latents (512 x 10)
NEWTON_MAX_PARAMS = 2048


def pool_tokens(x, mode: str = "mean") -> np.ndarray:
    """(N, T, C) tokens or (N, C, h, w) maps -> (N, C) by mean, or (N, T*C) with mode='flatten'."""
    x = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
    if mode == "flatten" or x.ndim == 2:
        return x.reshape(len(x), -1)
    if x.ndim == 3:  # (N, T, C)
        return x.mean(1)
    if x.ndim == 4:  # (N, C, h, w)
        return x.mean((2, 3))
    raise ValueError(f"cannot pool shape {x.shape}")


def linear_probe(train_x, train_y, val_x, val_y, *, Cs=DEFAULT_CS, folds: int = 3, seed: int = 0,
                 max_iter: int = 1000) -> dict[str, float]:
    """{"linear_acc", "linear_C", "linear_cv_acc"} (see module docstring for the protocol)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xva = as_features(train_x), as_features(val_x)
    ytr, yva = np.asarray(train_y), np.asarray(val_y)
    counts = np.bincount(np.unique(ytr, return_inverse=True)[1])
    n_folds = int(min(folds, counts.min()))
    solver = "newton-cholesky" if xtr.shape[1] * len(counts) <= NEWTON_MAX_PARAMS else "lbfgs"
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, solver=solver))
    if n_folds >= 2 and len(Cs) > 1:
        search = GridSearchCV(pipe, {"logisticregression__C": list(Cs)},
                              cv=StratifiedKFold(n_folds, shuffle=True, random_state=seed), refit=True)
        search.fit(xtr, ytr)
        model, best_c, cv_acc = search.best_estimator_, search.best_params_["logisticregression__C"], \
            float(search.best_score_)
    else:  # too few samples per class for CV: the middle C
        best_c = float(Cs[len(Cs) // 2])
        model = pipe.set_params(logisticregression__C=best_c).fit(xtr, ytr)
        cv_acc = float("nan")
    return {"linear_acc": float((model.predict(xva) == yva).mean()), "linear_C": float(best_c),
            "linear_cv_acc": cv_acc}


def knn_accuracy(train_x, train_y, val_x, val_y, *, k: int = 20, temperature: float = 0.07,
                 weighting: str = "exp") -> float:
    """Cosine kNN classification accuracy on val (see module docstring)."""
    xtr = torch.as_tensor(as_features(train_x))
    xva = torch.as_tensor(as_features(val_x))
    ytr, yva = torch.as_tensor(np.asarray(train_y)), np.asarray(val_y)
    classes, ytr_idx = torch.unique(ytr, return_inverse=True)
    xtr = torch.nn.functional.normalize(xtr, dim=1)
    xva = torch.nn.functional.normalize(xva, dim=1)
    k = min(k, len(xtr))
    sims, idx = (xva @ xtr.T).topk(k, dim=1)
    if weighting == "exp":
        weights = (sims / temperature).exp()
    elif weighting == "uniform":
        weights = torch.ones_like(sims)
    else:
        raise ValueError(f"weighting must be 'exp' or 'uniform', got {weighting!r}")
    votes = torch.zeros(len(xva), len(classes), dtype=torch.float64)
    votes.scatter_add_(1, ytr_idx[idx], weights)
    pred = classes[votes.argmax(1)].numpy()
    return float((pred == yva).mean())


def effective_rank(features, eps: float = 1e-12) -> float:
    """exp(entropy of s / sum(s)) for the singular values s of the (N, D) feature matrix."""
    s = np.linalg.svd(as_features(features), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def uniformity(features, t: float = 2.0) -> float:
    """log mean_{i<j} exp(-t ||u_i - u_j||²), u = l2-normalised features."""
    u = torch.nn.functional.normalize(torch.as_tensor(as_features(features)), dim=1)
    if len(u) < 2:
        raise ValueError("uniformity needs at least 2 samples")
    d2 = torch.pdist(u).pow(2)
    return float(torch.logsumexp(-t * d2, 0) - np.log(len(d2)))


def feature_report(train_x, train_y, val_x, val_y, *, prefix: str = "", knn_k: int = 20,
                   Cs=DEFAULT_CS, folds: int = 3) -> dict[str, float]:
    """All probes and statistics of one representation, keys prefixed (e.g. 'vfm/')."""
    out = linear_probe(train_x, train_y, val_x, val_y, Cs=Cs, folds=folds)
    out["knn_acc"] = knn_accuracy(train_x, train_y, val_x, val_y, k=knn_k)
    out["effective_rank"] = effective_rank(val_x)
    out["uniformity"] = uniformity(val_x)
    return {f"{prefix}{k}": v for k, v in out.items()}
