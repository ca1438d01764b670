"""study.metrics: the Fréchet distance and the FID family agree with torch-fidelity, missing weights
are named, fd_ref ranks degradations, probes/kNN separate signal from chance, SSIM/PSNR/codebook
statistics hit known values, grids have the expected size. Everything tiny and on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.metrics import (MissingWeightsError, codebook_stats, effective_rank, frechet_distance,
                           fid_from_features, knn_accuracy, latent_stats, linear_probe, psnr, ssim,
                           uniformity)
from study.metrics.common import to_float_nchw, to_uint8_nchw


# --------------------------------------------------------------------------- Fréchet distance
def _stats(f):
    return f.mean(0), np.cov(f, rowvar=False)


def test_frechet_distance_matches_torch_fidelity_and_sqrtm_formula():
    from scipy import linalg
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    f2 = rng.normal(0.3, 1.0, size=(300, 16)) @ rng.normal(size=(16, 16))
    ours = fid_from_features(f1, f2)
    assert ours == pytest.approx(frechet_distance(*_stats(f1), *_stats(f2)))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(f1)),
                                      fid_features_to_statistics(torch.from_numpy(f2)), False)
    assert abs(ours - theirs["frechet_inception_distance"]) < 1e-6 * max(1.0, abs(ours))
    # the pytorch-fid / TTUR formulation: scipy sqrtm of S1 S2
    (m1, s1), (m2, s2) = _stats(f1), _stats(f2)
    covmean = linalg.sqrtm(s1 @ s2).real
    sqrtm_fd = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert abs(ours - sqrtm_fd) < 1e-6 * max(1.0, abs(ours))
    # known values: identical sets -> 0; equal covariances -> squared mean shift
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(np.zeros(3), np.eye(3), np.full(3, 2.0), np.eye(3)) == pytest.approx(12.0)


# --------------------------------------------------------------------------- Inception FID family
@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    from study.metrics.fid import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth",
                                    calib_images=2)


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images_nhwc: np.ndarray):
        self.x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _naive_precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.: a sample is covered when it lies in some other set's k-NN ball."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(gen[:, None] - real[None], axis=-1)
    precision = (cross <= radii(real)[None]).any(1).mean()
    recall = (cross.T <= radii(gen)[None]).any(1).mean()
    return float(precision), float(recall)


def test_fid_family_matches_torch_fidelity_entry_point(random_inception, tmp_path):
    import torch_fidelity

    from study.metrics.fid import InceptionConfig, compute_fid_family, inception_features, \
        reference_stats_from_images

    n = 8
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    gen = np.clip(real.astype(int) // 2 + rng.integers(0, 90, real.shape), 0, 255).astype(np.uint8)
    cfg = InceptionConfig(weights_path=str(random_inception), resize=None, batch_size=n, kid_subset_size=n,
                          kid_subsets=20, isc_splits=2, cache_dir=str(tmp_path / "stats"), num_samples=n)
    ours = compute_fid_family(gen, real, cfg)
    # torch-fidelity's own entry point on the same images and weights (its PRC would use VGG16
    # features, ADM's uses Inception pool3: PR is checked against a direct implementation below)
    theirs = torch_fidelity.calculate_metrics(
        input1=_TensorDataset(gen), input2=_TensorDataset(real), fid=True, isc=True, kid=True,
        isc_splits=2, kid_subset_size=n, kid_subsets=20, cuda=False, batch_size=n, save_cpu_ram=True,
        cache=False, verbose=False, feature_extractor_weights_path=str(random_inception))
    print(f"fid ours {ours['fid']:.9g} torch-fidelity {theirs['frechet_inception_distance']:.9g}")
    assert ours["fid"] > 1.0  # a real difference, not a degenerate extractor
    assert abs(ours["fid"] - theirs["frechet_inception_distance"]) < 1e-6 * ours["fid"]
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5, abs=1e-9)
    # reference statistics were cached by content hash: no second extraction of the real set
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1
    cached = reference_stats_from_images(real, cfg)
    assert cached.features is not None and cached.features.shape == (n, 2048)
    gen_pool = inception_features(gen, cfg)
    precision, recall = _naive_precision_recall(gen_pool, cached.features)
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall))


def test_adm_npz_statistics_are_used_as_given(tmp_path):
    from study.metrics.fid import InceptionConfig, reference_stats_from_npz

    mu, sigma = np.arange(4.0), np.diag([1.0, 2.0, 3.0, 4.0])
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    stats = reference_stats_from_npz(tmp_path / "VIRTUAL_imagenet256_labeled.npz", InceptionConfig())
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, sigma)
    assert stats.features is None  # no arr_0: KID/PR cannot be computed, FID can


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    from study.metrics.fid import INCEPTION_FILENAME, InceptionConfig, compute_fid_family, inception_features

    monkeypatch.delenv("VFMSTUDY_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = InceptionConfig(weights_path=str(tmp_path / "weights" / INCEPTION_FILENAME))
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(MissingWeightsError) as err:
        inception_features(images, cfg)
    message = str(err.value)
    assert INCEPTION_FILENAME in message and str(tmp_path / "weights") in message
    assert "github.com/toshas/torch-fidelity" in message  # where an online machine gets it
    with pytest.raises(MissingWeightsError):
        compute_fid_family(images, images, cfg)
    monkeypatch.setenv("VFMSTUDY_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        inception_features(images, InceptionConfig())


# --------------------------------------------------------------------------- fd_ref
@pytest.fixture(scope="module")
def shapes_and_classifier(tmp_path_factory):
    from study.data import DataConfig, build_dataset
    from study.pipeline.reference import RefClassifierConfig, train_reference_classifier

    root = tmp_path_factory.mktemp("ref")
    data = DataConfig(train_size=1000, val_size=200, cache_dir=str(root / "data"))
    train, val = build_dataset(data, "train"), build_dataset(data, "val")
    cfg = RefClassifierConfig(width=8, steps=120, batch_size=32, lr=5e-3, cache_dir=str(root / "cache"),
                              min_val_acc=0.0)
    clf = train_reference_classifier(train, val, cfg)
    return train, val, cfg, clf


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return x
    r = int(3 * sigma + 0.5)
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.transpose(2, 3), groups=3)


def test_fd_ref_ranks_blur_and_noise_monotonically(shapes_and_classifier):
    from study.metrics import RefSpace, class_consistency, distribution_metrics, fd_in_space
    from study.pipeline.reference import classifier_dir, train_reference_classifier

    train, val, cfg, clf = shapes_and_classifier
    assert (classifier_dir(cfg, train) / "classifier.pt").is_file()
    assert train_reference_classifier(train, val, cfg).identity == clf.identity  # cached, not retrained
    space = RefSpace(clf)
    ref = train.images[:200]
    clean = to_float_nchw(val.images)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=gen)
    blur_fd = [fd_in_space(space, ref, _blur(clean, s)) for s in (0.0, 0.7, 1.2, 2.0)]
    noise_fd = [fd_in_space(space, ref, (clean + s * noise).clamp(-1, 1)) for s in (0.0, 0.2, 0.4, 0.8)]
    print(f"val acc {clf.val_acc:.3f} fd_ref blur {np.round(blur_fd, 3)} noise {np.round(noise_fd, 3)}")
    assert all(a < b for a, b in zip(blur_fd, blur_fd[1:])), blur_fd
    assert all(a < b for a, b in zip(noise_fd, noise_fd[1:])), noise_fd
    # the classifier learned something (10 classes: chance 0.1) and noise images are not consistent
    assert clf.val_acc > 0.2  # 2x chance after 120 tiny steps; the default config trains far longer
    assert class_consistency(clf, val.images, val.labels) == pytest.approx(clf.val_acc, abs=1e-6)
    garbage = torch.rand(len(val), 3, 32, 32, generator=gen) * 2 - 1
    assert class_consistency(clf, garbage, val.labels) < 0.3
    out = distribution_metrics(space, val.images, ref)
    assert set(out) == {"fd_ref", "precision_ref", "recall_ref"}
    assert 0.0 <= out["precision_ref"] <= 1.0 and out["fd_ref"] == pytest.approx(blur_fd[0])


# --------------------------------------------------------------------------- probes
def test_linear_probe_and_knn_separate_signal_from_chance():
    rng = np.random.default_rng(0)
    n_cls, dim = 4, 16
    centres = rng.normal(0, 6, size=(n_cls, dim))
    y_tr, y_va = rng.integers(0, n_cls, 240), rng.integers(0, n_cls, 200)
    x_tr = centres[y_tr] + rng.normal(size=(240, dim))
    x_va = centres[y_va] + rng.normal(size=(200, dim))
    sep = linear_probe(x_tr, y_tr, x_va, y_va)
    assert sep["linear_acc"] >= 0.98 and sep["linear_C"] > 0
    assert knn_accuracy(x_tr, y_tr, x_va, y_va) >= 0.98
    # random features, random labels: chance (0.25) within sampling error
    r_tr, r_va = rng.normal(size=(240, dim)), rng.normal(size=(200, dim))
    chance = linear_probe(r_tr, y_tr, r_va, y_va)
    knn_chance = knn_accuracy(r_tr, y_tr, r_va, y_va, weighting="uniform")
    print(f"probe separable {sep['linear_acc']:.3f} random {chance['linear_acc']:.3f} knn random {knn_chance:.3f}")
    assert abs(chance["linear_acc"] - 0.25) < 0.12
    assert abs(knn_chance - 0.25) < 0.12


def test_effective_rank_and_uniformity_known_values():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(64, 5)))
    assert effective_rank(q @ np.diag([3.0] * 5) @ rng.normal(size=(5, 5)).T @ np.eye(5)) <= 5.0 + 1e-6
    assert effective_rank(q * 3.0) == pytest.approx(5.0, rel=1e-6)  # 5 equal singular values
    assert effective_rank(np.outer(rng.normal(size=64), rng.normal(size=8))) == pytest.approx(1.0, rel=1e-4)
    collapsed = np.tile(rng.normal(size=(1, 8)), (50, 1))
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-9)  # all on one point: log 1
    spread = rng.normal(size=(200, 8))
    assert uniformity(spread) < -2.0


# --------------------------------------------------------------------------- image metrics
def test_ssim_and_psnr_known_values():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    smooth = (torch.linspace(-1, 1, 32).view(1, 1, 1, 32) * torch.ones(2, 3, 32, 1))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(smooth, smooth, gaussian=True) == pytest.approx(1.0)
    noise = rng.integers(0, 256, img.shape, dtype=np.uint8)
    assert ssim(smooth, torch.rand(2, 3, 32, 32) * 2 - 1) < 0.1
    assert ssim(img, noise) < 0.1
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = np.full((2, 16, 16, 3), 110, np.uint8)
    assert psnr(a, b) == pytest.approx(20 * np.log10(255 / 10), rel=1e-9)  # MSE = (10/255)^2
    # float [-1, 1] inputs are compared in [0, 1]: a shift of 0.2 in [-1, 1] is 0.1 -> 20 dB
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x, x + 0.2) == pytest.approx(20.0, rel=1e-6)


def test_class_mean_psnr_is_the_psnr_of_each_class_mean_image():
    """Known answer: two classes of constant images (train 90 and 110 -> mean 100 / train 190 and 210
    -> mean 200); val images 105 and 195 are both 5 grey levels off their class mean."""
    from study.metrics.image import class_mean_psnr
    train = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (90, 110, 190, 210)])
    val = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (105, 195)])
    assert class_mean_psnr(train, [0, 0, 1, 1], val, [0, 1]) == pytest.approx(20 * np.log10(255 / 5), rel=1e-5)
    assert class_mean_psnr(train, [0, 0, 1, 1], val, [1, 0]) < 10  # the wrong class's mean is far off


def test_ssim_matches_skimage():
    from skimage import metrics  # a dev extra: missing it is a failure, not a skip
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    for gaussian in (False, True):
        ref = np.mean([metrics.structural_similarity(x / 255.0, y / 255.0, channel_axis=-1, data_range=1.0,
                                                     gaussian_weights=gaussian, use_sample_covariance=not gaussian)
                       for x, y in zip(a, b)])
        assert ssim(a, b, gaussian=gaussian) == pytest.approx(ref, abs=1e-9)


def test_lpips_without_local_weights_raises(tmp_path, monkeypatch):
    from study.metrics.image import lpips_distance

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(MissingWeightsError, match="lpips|alexnet"):
        lpips_distance(x, x)


# --------------------------------------------------------------------------- codebook / latents
def test_codebook_perplexity_usage_entropy():
    k = 16
    uniform = codebook_stats(np.tile(np.arange(k), 5), k)
    assert uniform["perplexity"] == pytest.approx(k) and uniform["usage"] == 1.0
    assert uniform["entropy_bits"] == pytest.approx(4.0)
    single = codebook_stats(torch.full((4, 8), 3), k)
    assert single["perplexity"] == pytest.approx(1.0) and single["usage"] == pytest.approx(1 / k)
    assert single["entropy_bits"] == pytest.approx(0.0)
    half = codebook_stats(np.arange(8), k)
    assert half["usage"] == 0.5 and half["perplexity"] == pytest.approx(8)
    with pytest.raises(ValueError):
        codebook_stats(np.array([k]), k)


def test_latent_stats_per_channel():
    z = torch.stack([torch.full((4, 4), 1.0), torch.arange(16.0).view(4, 4)]).unsqueeze(0).repeat(3, 1, 1, 1)
    stats = latent_stats(z)
    assert stats["channel_mean"] == pytest.approx([1.0, 7.5])
    assert stats["channel_std"][0] == pytest.approx(0.0)
    assert stats["mean"] == pytest.approx(4.25)


# --------------------------------------------------------------------------- grids and layout
def test_grids_write_pngs_of_expected_size(tmp_path):
    from PIL import Image

    from study.metrics import class_grid, reconstruction_grid

    x = torch.rand(10, 3, 16, 16) * 2 - 1
    path = reconstruction_grid(x, x.flip(0), tmp_path / "recon.png", n=6, pad=2)
    assert Image.open(path).size == (6 * 16 + 7 * 2, 2 * 16 + 3 * 2)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    path = class_grid(x, labels, tmp_path / "cls.png", num_classes=4, per_class=3, pad=1)
    img = np.asarray(Image.open(path))
    assert img.shape == (4 * 16 + 5, 3 * 16 + 4, 3)
    first = to_uint8_nchw(x[:1])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(img[1:17, 1:17], first)  # class 0, first image
    assert (img[3 * 17 + 1:, :] == 255).all()  # class 3 has no samples: blank row


def test_image_layout_conversions_round_trip():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    f = to_float_nchw(u8)
    assert f.shape == (2, 3, 8, 8) and f.min() >= -1 and f.max() <= 1
    np.testing.assert_array_equal(to_uint8_nchw(f).permute(0, 2, 3, 1).numpy(), u8)


def test_vfm_space_names_and_features():
    from study.metrics import VFMSpace, distribution_metrics
    from tokenizer.vfm import build_vfm

    space = VFMSpace(build_vfm("random:vit_tiny_p4"), batch_size=8)
    assert space.name.startswith("vfm:")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    feats = space.features(a)
    assert feats.dtype == np.float64 and feats.shape == (8, space.vfm.width)
    np.testing.assert_allclose(space.features(to_float_nchw(a)), feats, rtol=1e-5, atol=1e-6)
    out = distribution_metrics(space, a, a[::-1].copy())
    assert f"fd_{space.name}" in out and out[f"fd_{space.name}"] == pytest.approx(0.0, abs=1e-6)
