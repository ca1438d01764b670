"""Backbone-property metrics against cases with known answers and against independent recomputes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.metrics.representation import (cknna, knn_mask, mutual_knn, property_report, rankme, spatial_structure,
                                          u_centred)


def _smooth_maps(B=4, h=16, C=32, seed=0) -> torch.Tensor:
    """(B, h, h, C): random 4x4 maps bilinearly upsampled, so neighbouring patches agree."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(B, C, 4, 4, generator=g)
    return F.interpolate(coarse, size=h, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))[0]


# --------------------------------------------------------------------------- spatial structure
def test_spatial_structure_high_for_smooth_maps_and_zero_for_noise():
    assert spatial_structure(_smooth_maps()) > 0.5
    noise = torch.randn(8, 16, 16, 64, generator=torch.Generator().manual_seed(1))
    assert abs(spatial_structure(noise)) < 0.01


def test_spatial_structure_equals_a_pairwise_loop():
    feats = np.random.default_rng(0).normal(size=(2, 5, 6, 3)) + 0.5
    expected = []
    for img in feats:
        cells = [(i, j) for i in range(5) for j in range(6)]
        near, far = [], []
        for (i1, j1) in cells:
            for (i2, j2) in cells:
                d = abs(i1 - i2) + abs(j1 - j2)
                u, v = img[i1, j1], img[i2, j2]
                cos = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
                if d == 1:
                    near.append(cos)
                elif d >= 4:
                    far.append(cos)
        expected.append(np.mean(near) - np.mean(far))
    assert spatial_structure(feats, far=4) == pytest.approx(np.mean(expected), abs=1e-12)


def test_spatial_structure_rejects_a_grid_without_far_pairs():
    with pytest.raises(ValueError, match="smaller far"):
        spatial_structure(torch.randn(1, 2, 2, 4), far=6)


# --------------------------------------------------------------------------- mutual kNN
def test_mutual_knn_equals_a_neighbour_set_loop():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = a[:, :4] + 0.7 * rng.normal(size=(40, 4))
    k = 5

    def neighbours(x):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = u @ u.T
        return [set(np.argsort(-np.where(np.arange(len(x)) == i, -np.inf, sims[i]))[:k]) for i in range(len(x))]

    expected = np.mean([len(na & nb) / k for na, nb in zip(neighbours(a), neighbours(b))])
    assert mutual_knn(a, b, k) == pytest.approx(expected, abs=1e-12)


def test_mutual_knn_is_one_for_a_rotation_and_at_chance_for_independent_data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 32, generator=g)
    assert mutual_knn(a, 2.5 * a @ _orthogonal(32, 1), k=10) == 1.0
    independent = mutual_knn(a, torch.randn(300, 16, generator=g), k=10)
    assert independent == pytest.approx(10 / 299, abs=0.01)


# --------------------------------------------------------------------------- CKNNA
def _u_centred(K: np.ndarray) -> np.ndarray:
    """Székely-Rizzo U-centring; <U(K), U(L)> / (m (m - 3)) is the unbiased HSIC."""
    m = len(K)
    K = K - np.diag(np.diag(K))
    U = K - K.sum(0, keepdims=True) / (m - 2) - K.sum(1, keepdims=True) / (m - 2) + K.sum() / ((m - 1) * (m - 2))
    np.fill_diagonal(U, 0)
    return U


def _unbiased_cka(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    ka, kb = _u_centred(a @ a.T), _u_centred(b @ b.T)
    return float((ka * kb).sum() / np.sqrt((ka * ka).sum() * (kb * kb).sum()))


def _hsic_song(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator as Song et al. (2012) write it (diagonals ignored)."""
    m = len(K)
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((K * L.T).sum() + K.sum() * L.sum() / ((m - 1) * (m - 2)) - 2 * (K @ L).sum() / (m - 2)) / (m * (m - 3))


def test_u_centred_inner_product_is_the_unbiased_hsic():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 5))
    K, L = torch.as_tensor(x @ x.T), torch.as_tensor(np.tanh(y @ y.T))
    m = len(K)
    assert float((u_centred(K) * u_centred(L)).sum() / (m * (m - 3))) == pytest.approx(float(_hsic_song(K, L)),
                                                                                     rel=1e-10)
    assert u_centred(K).numpy() == pytest.approx(_u_centred(K.numpy()), abs=1e-12)


def test_cknna_equals_a_pairwise_loop_over_mutual_neighbours():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(25, 6))
    b = a[:, :3] + 0.5 * rng.normal(size=(25, 3))
    k = 6
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b)]
    UK, UL = (_u_centred(u @ u.T) for u in unit)
    near = [[set(np.argsort(-np.where(np.arange(25) == i, -np.inf, (u @ u.T)[i]))[:k]) for i in range(25)] for u in unit]
    cross = sum(UK[i, j] * UL[i, j] for i in range(25) for j in near[0][i] & near[1][i])
    own_k = sum(UK[i, j] ** 2 for i in range(25) for j in near[0][i])
    own_l = sum(UL[i, j] ** 2 for i in range(25) for j in near[1][i])
    assert cknna(a, b, k) == pytest.approx(cross / np.sqrt(own_k * own_l), rel=1e-10)


def _mostly_one_code(n: int, distinct: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """Collapsed codes: n rows of one vector, `distinct` of them replaced by fresh ones, shuffled."""
    x = torch.randn(1, dim, generator=g, dtype=torch.float64).repeat(n, 1)
    x[:distinct] = torch.randn(distinct, dim, generator=g, dtype=torch.float64)
    return x[torch.randperm(n, generator=g)]


def _restricted_then_hsic(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The reference code's order: restrict each kernel to the kNN pairs, then unbiased HSIC."""
    A, B = F.normalize(a, dim=1), F.normalize(b, dim=1)
    K, L = A @ A.T, B @ B.T
    mk, ml = knn_mask(K, k), knn_mask(L, k)
    return float(_hsic_song(mk * ml * K, mk * ml * L) / (_hsic_song(mk * K, mk * K) * _hsic_song(ml * L, ml * L)).sqrt())


def test_cknna_stays_within_one_on_collapsed_codes():
    g = torch.Generator().manual_seed(0)
    a, b = _mostly_one_code(30, 3, 16, g), _mostly_one_code(30, 2, 8, g)
    assert _restricted_then_hsic(a, b, k=10) > 1  # the tied neighbourhoods break the restrict-first ratio
    assert -1 <= cknna(a, b, k=10) <= 1
    assert cknna(a, a, k=10) == pytest.approx(1.0, abs=1e-12)


def test_cknna_is_zero_when_every_row_is_the_same():
    g = torch.Generator().manual_seed(1)
    same = torch.randn(1, 16, generator=g).repeat(50, 1)
    assert cknna(same, torch.randn(50, 8, generator=g), k=5) == 0.0


def test_cknna_with_all_neighbours_is_unbiased_linear_cka():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 8))
    b = np.tanh(a @ rng.normal(size=(8, 6))) + 0.3 * rng.normal(size=(30, 6))
    assert cknna(a, b, k=29) == pytest.approx(_unbiased_cka(a, b), rel=1e-10)


def test_cknna_is_one_for_identical_representations_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 24, generator=g)
    assert cknna(a, a, k=10) == pytest.approx(1.0, abs=1e-12)
    assert cknna(a, 0.1 * a @ _orthogonal(24, 2), k=10) == pytest.approx(1.0, abs=1e-6)
    b = a[:, :12] + 0.8 * torch.randn(200, 12, generator=g)
    rotated = cknna(7.0 * a @ _orthogonal(24, 3), 0.5 * b @ _orthogonal(12, 4), k=10)
    assert rotated == pytest.approx(cknna(a, b, k=10), abs=1e-6)  # float32 rotations


def test_cknna_near_zero_for_independent_and_between_for_related_representations():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 32, generator=g)
    independent = cknna(a, torch.randn(400, 32, generator=g), k=10)
    related = cknna(a, a[:, :16] + 0.5 * torch.randn(400, 16, generator=g), k=10)
    assert abs(independent) < 0.05
    assert 0.1 < related < 0.9


def test_alignment_rejects_mismatched_samples_and_bad_k():
    with pytest.raises(ValueError, match="same samples"):
        cknna(torch.randn(10, 3), torch.randn(11, 3), k=3)
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(torch.randn(10, 3), torch.randn(10, 3), k=10)


# --------------------------------------------------------------------------- RankMe
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_rankme_equals_the_rank_of_isotropic_low_rank_data(rank):
    g = torch.Generator().manual_seed(rank)
    left = torch.linalg.qr(torch.randn(200, rank, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(48, rank, generator=g, dtype=torch.float64))[0]
    z = 3.0 * left @ right.T  # (200, 48), `rank` equal singular values
    assert rankme(z) == pytest.approx(rank, abs=1e-6)


def test_rankme_of_gaussian_data_in_a_subspace_is_close_to_its_dimension():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 8, generator=g))[0]  # (64, 8) orthonormal columns
    z = torch.randn(5000, 8, generator=g) @ basis.T
    assert rankme(z) == pytest.approx(8, abs=0.05)


def test_property_report_combines_the_metrics_on_pooled_features():
    patches = _smooth_maps(B=40, h=8, C=16)
    reference = torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    report = property_report(patches, reference, k=5, prefix="vfm/")
    pooled = patches.mean((1, 2))
    assert report == pytest.approx({"vfm/spatial_structure": spatial_structure(patches), "vfm/rankme": rankme(pooled),
                                    "vfm/mutual_knn": mutual_knn(pooled, reference, 5),
                                    "vfm/cknna": cknna(pooled, reference, 5)})
    assert set(property_report(patches)) == {"spatial_structure", "rankme"}
