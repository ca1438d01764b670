"""Token figures: sampling points over the image per backbone, codebook usage per backbone."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis.figures_tokens import reach, sampling_points_figure, spread_queries, token_usage_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path is not None and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def _grid_reference(side: int) -> np.ndarray:
    centres = (np.arange(side) + 0.5) / side
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)  # (side^2, 2) raster order


def _synthetic_points(offset: float, B=2, layers=1, heads=2, levels=1, n_points=2) -> dict[str, np.ndarray]:
    """Every point sits `offset` to the right of its query's reference point, equal weights."""
    reference = _grid_reference(4)
    Q = len(reference)
    loc = np.broadcast_to(reference[None, None, :, None, None, None, :],
                          (B, layers, Q, heads, levels, n_points, 2)).copy()
    loc[..., 0] += offset
    weights = np.full((B, layers, Q, heads, levels, n_points), 1 / (levels * n_points), np.float32)
    images = np.random.default_rng(0).integers(0, 255, (B, 32, 32, 3), dtype=np.uint8)
    return {"images": images, "locations": loc, "weights": weights, "reference": reference}


def test_reach_and_outside_share_have_known_values():
    numbers = reach(_synthetic_points(offset=0.2))
    assert numbers["mean_reach"] == pytest.approx(0.2)
    # the right-most column of anchors (x = 0.875) lands at 1.075, outside the image: 4 of 16 queries
    assert numbers["outside_share"] == pytest.approx(0.25)


def test_spread_queries_are_distinct_and_start_near_the_top_left_quarter():
    reference = _grid_reference(8)
    chosen = spread_queries(reference, 4)
    assert len(set(chosen)) == 4
    assert np.abs(reference[chosen[0]] - 0.25).max() <= 1 / 16
    assert np.ptp(reference[chosen], 0).min() >= 0.5  # spread across both axes


def test_sampling_points_figure_from_saved_arrays(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", **_synthetic_points(0.1))
    plot = sampling_points_figure({"inhouse:dino": tmp_path / "a.npz", "inhouse:mae": _synthetic_points(0.3)},
                                  tmp_path / "figs")
    assert _is_png(plot.path) and plot.missing is None
    assert list(plot.numbers["backbone"]) == ["inhouse:dino", "inhouse:mae"]
    assert plot.numbers["mean_reach"].tolist() == pytest.approx([0.1, 0.3])


def test_sampling_points_figure_draws_the_arrays_a_tokenizer_returns(tmp_path):
    from tokenizer.model import TokenizerConfig, VFMTokenizer
    from tokenizer.sampling_points import sampling_points
    from tokenizer.vfm import build_vfm
    torch.manual_seed(0)
    cfg = TokenizerConfig(num_queries=16, dim=32, enc_depth=1, enc_heads=2, enc_ffn=64, codebook_size=32,
                          code_dim=4, dec_depth=1, dec_heads=2, cnn_ch=8, cnn_groups=4)
    model = VFMTokenizer(cfg, build_vfm("random:vit_micro_p4")).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez_compressed(tmp_path / "points.npz", images=uint8, **sampling_points(model, images))
    plot = sampling_points_figure({"random": tmp_path / "points.npz"}, tmp_path, image=1)
    assert _is_png(plot.path)
    # at init head h looks along its compass direction at 1..P feature pixels of the 8x8 grid
    assert plot.numbers["mean_reach"].iloc[0] == pytest.approx(np.mean([1, 2, 3, 4]) / 8, rel=1e-5)


def test_missing_array_is_named(tmp_path):
    points = _synthetic_points(0.1)
    del points["images"]
    np.savez(tmp_path / "p.npz", **points)
    with pytest.raises(KeyError, match=r"p.npz: no \['images'\] array"):
        sampling_points_figure({"b": tmp_path / "p.npz"}, tmp_path)


def test_token_usage_figure_bars_are_seed_means_with_t_intervals(tmp_path):
    runs = pd.DataFrame({"backbone": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                         "tok_eval/codebook_usage": [0.5, 0.6, 0.7, 0.2, 0.25, 0.3],
                         "tok_eval/perplexity": [100.0, 120.0, 110.0, 40.0, 50.0, np.nan]})
    plot = token_usage_figure(runs, tmp_path)
    assert _is_png(plot.path)
    table = plot.numbers.set_index(["metric", "backbone"])
    usage_a = np.array([0.5, 0.6, 0.7])
    assert table.loc[("tok_eval/codebook_usage", "a"), "mean"] == pytest.approx(0.6)
    assert table.loc[("tok_eval/codebook_usage", "a"), "ci"] == pytest.approx(
        stats.t.ppf(0.975, 2) * usage_a.std(ddof=1) / np.sqrt(3))
    assert table.loc[("tok_eval/perplexity", "b"), "n"] == 2


def test_token_usage_figure_says_what_is_missing(tmp_path):
    plot = token_usage_figure(pd.DataFrame({"backbone": ["a"], "tok_eval/psnr": [20.0]}), tmp_path)
    assert plot.path is None and "tok_eval/codebook_usage" in plot.missing
