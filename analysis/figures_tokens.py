"""Figures about the tokens themselves: where each query looks, and how the codebook is used.

Both take saved results, never models, and return `Plot(path, numbers, missing)` like the
other figures:

- `sampling_points_figure`: per backbone, one image with the deformable sampling points of a
  few queries drawn over it (marker area = attention weight, x = the query's reference point),
  from the arrays a tokenizer evaluation saved (`tokenizer.sampling_points` + the images).
  Its numbers are, per backbone, how far the queries reach from their anchor cell and how much
  attention falls outside the image (where the sampler reads zero padding).
- `token_usage_figure`: codebook usage and perplexity per backbone, mean and interval over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import Plot, seed_table
from analysis.results import artifact
from study import schema as S

POINT_ARRAYS = ("images", "locations", "weights", "reference")
QUERY_COLOURS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:pink")
Points = Union[str, Path, Mapping[str, np.ndarray]]


def load_points(source: Points) -> dict[str, np.ndarray]:
    """The four arrays of one backbone, from an .npz path or a mapping; a clear error when one is absent."""
    arrays = np.load(source) if isinstance(source, (str, Path)) else source
    missing = [k for k in POINT_ARRAYS if k not in arrays]
    if missing:
        raise KeyError(f"{source if isinstance(source, (str, Path)) else 'sampling points'}: no {missing} array "
                       f"(save images (B, H, W, 3) uint8 with the output of tokenizer.sampling_points)")
    return {k: np.asarray(arrays[k]) for k in POINT_ARRAYS}


def spread_queries(reference: np.ndarray, count: int) -> list[int]:
    """`count` queries whose reference points are spread over the image (farthest-point order,
    starting from the one nearest the top-left quarter point)."""
    chosen = [int(np.argmin(((reference - 0.25) ** 2).sum(1)))]
    while len(chosen) < min(count, len(reference)):
        dist = ((reference[:, None] - reference[chosen][None]) ** 2).sum(-1).min(1)
        chosen.append(int(np.argmax(dist)))
    return chosen


def reach(points: dict[str, np.ndarray], layer: int = -1) -> dict[str, float]:
    """Attention-weighted distance of the sampling points from their query's reference point (in
    image widths) and the attention share of points outside the image, over images, queries and heads."""
    loc = points["locations"][:, layer]  # (B, Q, H, L, P, 2)
    w = points["weights"][:, layer]  # (B, Q, H, L, P)
    ref = points["reference"][None, :, None, None, None, :]
    share = w / w.shape[2]  # weights sum to 1 over (L, P) per head: shares sum to 1 per query
    dist = np.sqrt(((loc - ref) ** 2).sum(-1))
    outside = ((loc < 0) | (loc > 1)).any(-1)
    return {"mean_reach": float((share * dist).sum((2, 3, 4)).mean()),
            "outside_share": float((share * outside).sum((2, 3, 4)).mean())}


def sampling_points_figure(points: Mapping[str, Points], out_dir: Path, *, image: int = 0, layer: int = -1,
                           queries: Optional[Sequence[int]] = None, n_queries: int = 4,
                           name: str = "sampling_points") -> Plot:
    """One panel per backbone: image `image` of the batch and the points of `queries` (default:
    `n_queries` spread over the anchor grid) in encoder layer `layer`."""
    if not points:
        return Plot(None, pd.DataFrame(), "no saved sampling points (only VFMTok/VFMAE with sampler: region save them)")
    loaded = {backbone: load_points(source) for backbone, source in points.items()}
    numbers = pd.DataFrame([{S.BACKBONE: b, **reach(p, layer)} for b, p in loaded.items()])
    cols = min(4, len(loaded))
    rows = -(-len(loaded) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (backbone, p), (_, row) in zip(axes, loaded.items(), numbers.iterrows()):
        chosen = list(queries) if queries is not None else spread_queries(p["reference"], n_queries)
        _draw_points(ax, p, image, layer, chosen)
        ax.set_title(f"{backbone}\nreach {row['mean_reach']:.2f}, outside {row['outside_share']:.0%}", fontsize=8)
    for ax in axes[len(loaded):]:
        ax.set_visible(False)
    return Plot(_save(fig, out_dir, name), numbers)


def _draw_points(ax, p: dict[str, np.ndarray], image: int, layer: int, queries: Sequence[int]) -> None:
    ax.imshow(p["images"][image], extent=(0, 1, 1, 0), interpolation="nearest")
    heads = p["weights"].shape[3]
    for i, q in enumerate(queries):
        colour = QUERY_COLOURS[i % len(QUERY_COLOURS)]
        loc = p["locations"][image, layer, q].reshape(-1, 2)  # (H*L*P, 2)
        share = p["weights"][image, layer, q].reshape(-1) / heads  # sums to 1 per query
        ax.scatter(loc[:, 0], loc[:, 1], s=400 * share, c=colour, alpha=0.7, edgecolors="none")
        ax.scatter(*p["reference"][q], marker="x", s=60, c=colour, linewidths=2)
    ax.set_xlim(-0.15, 1.15)
    ax.set_ylim(1.15, -0.15)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- codebook use
TOKEN_USAGE_METRICS = (S.metric(S.TOK_EVAL, S.CODEBOOK_USAGE), S.metric(S.TOK_EVAL, S.PERPLEXITY))


def token_usage_figure(runs: pd.DataFrame, out_dir: Path, *, metrics: Sequence[str] = TOKEN_USAGE_METRICS,
                       group: str = S.BACKBONE, confidence: float = 0.95, name: str = "token_usage") -> Plot:
    """Bars of each codebook metric per backbone with Student-t whiskers over seeds and the seeds as dots.
    Pass runs of one setting (e.g. the main VFMTok cells), since ablations change the token count."""
    present = [m for m in metrics if m in runs and runs[m].notna().any()]
    if not present:
        return Plot(None, pd.DataFrame(), f"no runs with any of {tuple(metrics)} (VFMTok runs only)")
    tables = [seed_table(runs, m, [group], confidence) for m in present]
    fig = Figure(figsize=(4.5 * len(present), 3.8))
    for ax, metric, table in zip(fig.subplots(1, len(present), squeeze=False)[0], present, tables):
        pos = np.arange(len(table))
        ax.bar(pos, table["mean"], 0.6, yerr=table["ci"].fillna(0), capsize=3, color="tab:blue", alpha=0.6)
        for x, values in zip(pos, table["values"]):
            ax.scatter(np.full(len(values), x), values, s=12, c="black", zorder=3)
        ax.set_xticks(pos, table[group].astype(str), rotation=30, ha="right")
        ax.set_title(f"{metric} (higher: more codes in use)", fontsize=9)
    return Plot(_save(fig, out_dir, name), pd.concat(tables, ignore_index=True))


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def run_points(runs: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """backbone -> the sampling-points file tok_eval saved for its first run (lowest seed) that has one."""
    found: dict[str, Path] = {}
    if S.BACKBONE not in runs:
        return found
    order = [c for c in (S.BACKBONE, S.SEED) if c in runs]
    for backbone, g in runs.sort_values(order).groupby(S.BACKBONE, sort=True):
        for run_id in g["run_id"]:
            local = artifact(runs, run_id, S.SAMPLING_POINTS, Path(out_dir))
            if local is not None:
                found[str(backbone)] = local
                break
    return found
