"""Backbone properties that might predict tokenizer quality (arrays in, numbers out).

Definitions follow the published reference implementations, re-derived here:

- spatial structure (LDS, "local vs distant similarity" of patch features): per image, the mean
  cosine similarity of 4-neighbour patch pairs (Manhattan distance 1 on the patch grid) minus
  the mean cosine similarity of pairs at Manhattan distance >= `far` (6 by default); averaged
  over images.  High when nearby patches agree and distant ones do not; about 0 for features
  with no spatial layout.
- mutual kNN alignment: rows are l2-normalised, each sample's k nearest neighbours (inner
  product, itself excluded) are found in both representations, and the score is the mean
  fraction of neighbours the two share; chance level is about k / (N - 1).
- CKNNA (centered kernel nearest-neighbour alignment): linear kernels K = A A^T and L = B B^T
  of the l2-normalised rows are centred (the U-centring of the unbiased HSIC estimator), then
  the centred products are summed over the pairs (i, j) where j is among i's k nearest
  neighbours (itself excluded) in both representations; the sum is normalised by each centred
  kernel's squares summed over its own neighbourhoods.  Centring before restricting makes the
  score a Cauchy-Schwarz ratio (the mutual pairs are among each side's own), so it lies in [-1, 1].
  The reference code restricts first and takes the unbiased HSIC of the restricted kernels;
  those are asymmetric, so the HSIC of one with itself is no squared norm, and the mutual
  pairs are fewer than either side's own, so with tied neighbourhoods (collapsed codes, many
  identical rows) that ratio exceeds 1.  1 for identical neighbourhood geometry, about 0 for
  independent representations, 0 when a centred kernel vanishes on its own neighbourhoods
  (e.g. every row the same); invariant to orthogonal transforms and isotropic scaling of either
  side.  With k = N - 1 it is the unbiased linear CKA.  The reference pipeline also clamps
  outliers at the 95th percentile of |x| before normalising; that is skipped here because it
  is not rotation invariant.
- RankMe: exp of the entropy of the normalised singular values of the (uncentred) N x D
  embedding matrix, in [1, min(N, D)] (the same quantity as `probes.effective_rank`).

All functions accept numpy arrays or tensors and compute in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from study.metrics.probes import effective_rank


def _float64(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().cpu().double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _rows(x, name: str) -> torch.Tensor:
    """(N, D) float64 tensor of l2-normalised rows."""
    t = _float64(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(t.shape)}")
    return F.normalize(t, dim=1)


# --------------------------------------------------------------------------- spatial structure
def manhattan_distances(h: int, w: int) -> torch.Tensor:
    """(h*w, h*w) Manhattan distances between the cells of an h x w grid, row-major."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([yy.flatten(), xx.flatten()], 1)  # (h*w, 2)
    return (cells[:, None] - cells[None]).abs().sum(-1)


def spatial_structure(feats, far: int = 6) -> float:
    """Near-pair minus far-pair cosine similarity of patch features `feats` (B, h, w, C)."""
    x = _float64(feats)
    if x.ndim != 4:
        raise ValueError(f"feats must be (B, h, w, C) patch features, got shape {tuple(x.shape)}")
    B, h, w, C = x.shape
    dist = manhattan_distances(h, w)
    near, distant = dist == 1, dist >= far
    if not near.any() or not distant.any():
        raise ValueError(f"a {h}x{w} patch grid has no pairs at distance 1 and >= {far} (pass a smaller far)")
    u = F.normalize(x.reshape(B, h * w, C), dim=-1)
    cos = u @ u.transpose(1, 2)  # (B, h*w, h*w)
    per_image = cos[:, near].mean(1) - cos[:, distant].mean(1)  # (B,)
    return float(per_image.mean())


# --------------------------------------------------------------------------- alignment
def knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(N, N) 0/1 matrix: row i marks the k largest entries of kernel row i, i itself excluded."""
    n = len(kernel)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    scores = kernel.clone().fill_diagonal_(-torch.inf)
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(kernel).scatter_(1, idx, 1.0)


def _paired(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = _rows(a, "A"), _rows(b, "B")
    if len(A) != len(B):
        raise ValueError(f"A and B must describe the same samples, got {len(A)} and {len(B)} rows")
    return A, B


def mutual_knn(a, b, k: int = 10) -> float:
    """Mean fraction of k nearest neighbours shared by representations a (N, D) and b (N, E)."""
    A, B = _paired(a, b)
    shared = knn_mask(A @ A.T, k) * knn_mask(B @ B.T, k)
    return float(shared.sum(1).mean() / k)


def u_centred(K: torch.Tensor) -> torch.Tensor:
    """Székely-Rizzo U-centring of an (m, m) symmetric kernel, m >= 4, diagonal ignored:
    <U(K), U(L)> / (m (m - 3)) is the unbiased HSIC estimator of Song et al. (2012)."""
    m = len(K)
    if m < 4:
        raise ValueError(f"U-centring needs at least 4 samples, got {m}")
    K = K.clone().fill_diagonal_(0)
    U = K - K.sum(0, keepdim=True) / (m - 2) - K.sum(1, keepdim=True) / (m - 2) + K.sum() / ((m - 1) * (m - 2))
    return U.fill_diagonal_(0)


def cknna(a, b, k: int = 10) -> float:
    """CKNNA alignment of a (N, D) and b (N, E) over their mutual k-nearest-neighbour pairs."""
    if k < 2:
        raise ValueError(f"CKNNA needs k >= 2, got {k}")
    A, B = _paired(a, b)
    K, L = A @ A.T, B @ B.T
    mask_k, mask_l = knn_mask(K, k), knn_mask(L, k)
    UK, UL = mask_k * u_centred(K), mask_l * u_centred(L)  # each restricted to its own neighbourhoods
    if _vanishes(UK) or _vanishes(UL):
        return 0.0
    return float((UK * UL).sum() / ((UK ** 2).sum() * (UL ** 2).sum()).sqrt())


def _vanishes(U: torch.Tensor) -> bool:
    """Zero up to the rounding of U-centring's sums of N cosines (every row the same): such a
    kernel shares no geometry with anything, and a ratio of it would be rounding noise."""
    return bool(U.abs().max() <= 4 * len(U) * torch.finfo(U.dtype).eps)


# --------------------------------------------------------------------------- rank
def rankme(z) -> float:
    """RankMe effective rank of embeddings z (N, D): exp(entropy of s / sum(s))."""
    return effective_rank(z)


# --------------------------------------------------------------------------- all of them
def property_report(patches, reference=None, *, k: int = 10, far: int = 6, prefix: str = "") -> dict[str, float]:
    """The properties of one representation of N images, keys prefixed (e.g. 'vfm/'):
    patches (N, h, w, C) -> spatial_structure, and rankme of the mean-pooled (N, C) features;
    with reference (N, E), features of the same images in a fixed space shared by every backbone,
    also mutual_knn and cknna of the pooled features against it."""
    x = _float64(patches)
    if x.ndim != 4:
        raise ValueError(f"patches must be (N, h, w, C), got shape {tuple(x.shape)}")
    pooled = x.mean((1, 2))  # (N, C)
    out = {"spatial_structure": spatial_structure(x, far), "rankme": rankme(pooled)}
    if reference is not None:
        out.update(mutual_knn=mutual_knn(pooled, reference, k), cknna=cknna(pooled, reference, k))
    return {f"{prefix}{key}": value for key, value in out.items()}
