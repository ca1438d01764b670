"""What predicts tokenizer quality, and do the objectives differ at all: statistics on the runs frame.

Input is the per-run table of `analysis.results.load_sweep` (one row per cell run) with a group
column (`backbone`), backbone-property columns (e.g. `vfm/spatial_structure`) and quality-metric
columns (e.g. `tok_eval/rfd_ref`).  Call each function on one pipeline's runs at a time, since
VFMTok and VFMAE metrics are on different scales.

- `predictor_table`: Spearman ρ of each property with each metric over all runs (backbones x
  seeds), with a percentile bootstrap interval that resamples *backbones* (all runs of a drawn
  backbone come along).  Seeds of one backbone share its objective, so they are not independent
  samples of the property-quality relation; resampling runs gives intervals that are too
  narrow (on null data with a backbone effect on both sides, 8 backbones x 3 seeds, 300
  draws, 95 % intervals excluded 0 in 22 % of draws when resampling runs, 6 % when
  resampling backbones).  Seeded (`seed`), so the table is reproducible.
  A pair is *resolved* only when that interval excludes 0 and, too, an exact permutation test of
  the backbones (Spearman ρ of the per-backbone means, every relabelling of the backbones; random
  relabellings past 8 backbones) rejects independence after Holm's correction over the table's
  pairs.  The permutation test is what stops a handful of backbones from passing: with n of them
  the smallest attainable p is 2/n!, so 3 backbones (p >= 1/3) can never resolve a predictor,
  however tight a bootstrap over 3 groups looks.
- `predictor_verdict`: one sentence naming the property with the largest |ρ| among the resolved
  pairs, or saying that none is resolved.
- `between_objectives`: Kruskal-Wallis and one-way ANOVA of one headline metric across groups,
  per-group mean and Student-t interval, and a plain sentence.  The rank test leads: with 3
  seeds per group normality cannot be checked; the ANOVA is reported next to it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.stats import mean_ci, welch_p
from study import schema as S

MIN_BACKBONES = 3
EXACT_PERMUTATIONS_UP_TO = 8  # 8! = 40320 relabellings; more backbones draw RANDOM_PERMUTATIONS
RANDOM_PERMUTATIONS = 20000
PREDICTOR_COLUMNS = ["property", "metric", "rho", "low", "high", "p_perm", "p_holm", "n_runs", "n_backbones",
                     "resolved"]


# --------------------------------------------------------------------------- predictors
def _complete(runs: pd.DataFrame, group: str, *numeric: str) -> pd.DataFrame:
    """The group column and the numeric columns, rows with all of them present, index 0..n-1."""
    columns = list(dict.fromkeys([group, *numeric]))
    for column in columns:
        if column not in runs:
            raise KeyError(f"runs frame has no column {column!r} (columns: {', '.join(map(str, runs.columns))})")
    data = runs[columns].copy()
    for column in numeric:
        data[column] = pd.to_numeric(data[column], errors="coerce")
    return data.dropna().reset_index(drop=True)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """ρ, or nan when either side is constant (ρ is undefined there)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def _weighted_ranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank, as scipy's) of x in each resample, where a resample
    repeats run j weights[b, j] times: (n_boot, n) ranks of the n runs."""
    less = (x[None, :] < x[:, None]).astype(float)  # less[i, j]: run j ranks below run i
    equal = (x[None, :] == x[:, None]).astype(float)
    return weights @ less.T + (weights @ equal.T + 1) / 2


def _weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Spearman ρ of each resample given by run multiplicities `weights` (n_boot, n): the Pearson
    correlation of the ranks, weighted by multiplicity; nan where a side is constant."""
    rx, ry = _weighted_ranks(x, weights), _weighted_ranks(y, weights)
    w = weights / weights.sum(1, keepdims=True)
    dx = rx - (w * rx).sum(1, keepdims=True)
    dy = ry - (w * ry).sum(1, keepdims=True)
    vx, vy = (w * dx * dx).sum(1), (w * dy * dy).sum(1)
    defined = (vx > 1e-9) & (vy > 1e-9)  # rank variances are >= 1/n^2 unless a side is constant
    rho = np.full(len(weights), np.nan)
    rho[defined] = (w * dx * dy).sum(1)[defined] / np.sqrt(vx[defined] * vy[defined])
    return rho


def backbone_bootstrap(data: pd.DataFrame, group: str, x: str, y: str, n_boot: int = 2000,
                       seed: int = 0) -> np.ndarray:
    """Spearman ρ of (x, y) in `n_boot` resamples that draw whole groups with replacement.
    Resamples where ρ is undefined (a constant side, e.g. one group drawn every time) are dropped."""
    codes, labels = pd.factorize(data[group], sort=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), (n_boot, len(labels)))  # group indices drawn in each resample
    counts = (draws[:, :, None] == np.arange(len(labels))).sum(1)  # (n_boot, n_groups)
    rhos = _weighted_spearman(data[x].to_numpy(float), data[y].to_numpy(float), counts[:, codes].astype(float))
    return rhos[np.isfinite(rhos)]


@functools.lru_cache(maxsize=None)
def _all_orders(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))))


def backbone_permutation_p(data: pd.DataFrame, group: str, x: str, y: str, seed: int = 0) -> float:
    """Two-sided p-value of Spearman ρ between the per-backbone means of x and y: the share of
    relabellings of the backbones (all of them up to EXACT_PERMUTATIONS_UP_TO backbones) whose |ρ|
    reaches the observed one. nan when ρ of the means is undefined."""
    means = data.groupby(group)[[x, y]].mean()
    rx, ry = sps.rankdata(means[x].to_numpy(float)), sps.rankdata(means[y].to_numpy(float))
    n = len(rx)
    if n < 2 or np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    if n <= EXACT_PERMUTATIONS_UP_TO:
        orders = _all_orders(n)
    else:
        rng = np.random.default_rng(seed)
        orders = np.argsort(rng.random((RANDOM_PERMUTATIONS, n)), axis=1)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    rhos = (dx[orders] @ dy) / np.sqrt((dx @ dx) * (dy @ dy))
    observed = abs(float(dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)))
    return float(np.mean(np.abs(rhos) >= observed - 1e-12))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (nan entries stay nan, not counted)."""
    p = np.asarray(p, float)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def predictor_table(runs: pd.DataFrame, properties: Sequence[str], metrics: Sequence[str], *,
                    group: str = S.BACKBONE, n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """One row per (property, metric): ρ over all runs, its backbone-bootstrap interval (nan with
    fewer than MIN_BACKBONES backbones), the backbone permutation p-value and its Holm adjustment
    over the table's rows, the numbers of runs and backbones, and whether the pair is resolved
    (interval excludes 0 and adjusted p < 1 - confidence)."""
    rows = []
    tail = (1 - confidence) / 2 * 100
    for prop in properties:
        for metric in metrics:
            data = _complete(runs, group, prop, metric)
            rho = _spearman(data[prop].to_numpy(float), data[metric].to_numpy(float)) if len(data) > 2 else np.nan
            n_groups = data[group].nunique()
            # with 2 backbones every resample holds 1 or 2 of them: no interval worth the name
            enough = np.isfinite(rho) and n_groups >= MIN_BACKBONES
            boots = backbone_bootstrap(data, group, prop, metric, n_boot, seed) if enough else []
            low, high = np.percentile(boots, [tail, 100 - tail]) if len(boots) else (np.nan, np.nan)
            p_perm = backbone_permutation_p(data, group, prop, metric, seed) if enough else np.nan
            rows.append({"property": prop, "metric": metric, "rho": rho, "low": float(low), "high": float(high),
                         "p_perm": p_perm, "n_runs": len(data), "n_backbones": int(n_groups),
                         "interval_excludes_0": bool(low > 0 or high < 0)})
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=PREDICTOR_COLUMNS)
    table["p_holm"] = holm(table["p_perm"].to_numpy(float))
    table["resolved"] = table.pop("interval_excludes_0") & (table["p_holm"] < 1 - confidence)
    return table[PREDICTOR_COLUMNS]


def predictor_verdict(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """One sentence: the best resolved predictor (largest |ρ|), or that none is resolved."""
    if table.empty or not np.isfinite(table["rho"]).any():
        return "No backbone property could be correlated with a quality metric (too few runs with both)."
    if not np.isfinite(table["low"]).any():
        return (f"No predictor can be resolved from {table['n_backbones'].max()} backbones: the backbone "
                f"bootstrap needs at least {MIN_BACKBONES}.")
    pct = f"{confidence:.0%}"
    resolved = table[table["resolved"]]
    if resolved.empty:
        return (f"No backbone property is a resolved predictor: none has both a {pct} bootstrap interval of "
                f"Spearman ρ that excludes 0 and a backbone permutation test that holds after Holm's correction "
                f"(smallest adjusted p {np.nanmin(table['p_holm']):.2g}; up to {table['n_runs'].max()} runs of "
                f"{table['n_backbones'].max()} backbones).")
    best = resolved.loc[resolved["rho"].abs().idxmax()]
    return (f"The best predictor is {best['property']}: Spearman ρ = {best['rho']:.2f} "
            f"({pct} CI {best['low']:.2f} to {best['high']:.2f}; permutation p = {best['p_perm']:.2g}, "
            f"{best['p_holm']:.2g} after Holm) with {best['metric']}, over "
            f"{best['n_runs']} runs of {best['n_backbones']} backbones.")


def predictor_display(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The report's predictor table: one row per property, one 'ρ [low, high]' column per metric."""
    cells = table.assign(cell=[f"{r:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(r) else "n/a"
                               for r, lo, hi in zip(table["rho"], table["low"], table["high"])])
    wide = cells.pivot(index="property", columns="metric", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(table["property"])), columns=list(dict.fromkeys(table["metric"])))
    wide.columns = [f"ρ with {m} ({confidence:.0%} CI)" for m in wide.columns]
    return wide.reset_index()


# --------------------------------------------------------------------------- between objectives
@dataclass
class ObjectiveTest:
    metric: str
    groups: pd.DataFrame  # group, mean, low, high, n
    kruskal_h: float
    kruskal_p: float
    anova_f: float
    anova_p: float
    sentence: str
    runner_up: str = ""  # the second-best group, and Welch's p for best vs runner-up (nan: untested)
    top_two_p: float = float("nan")


def _group_intervals(values: dict[str, np.ndarray], group: str, confidence: float) -> pd.DataFrame:
    rows = []
    for name, x in values.items():
        ci = mean_ci(x, confidence)
        rows.append({group: name, "mean": ci.mean, "low": ci.mean - ci.half, "high": ci.mean + ci.half, "n": ci.n})
    return pd.DataFrame(rows, columns=[group, "mean", "low", "high", "n"])


def top_two(values: dict[str, np.ndarray], groups: pd.DataFrame, group: str,
            lower_is_better: Optional[bool]) -> tuple[str, float]:
    """(runner-up, Welch's p of best vs runner-up): the groups differing does not make the best
    mean better than the next one."""
    if lower_is_better is None or len(groups) < 2:
        return "", float("nan")
    ranked = groups.sort_values("mean", ascending=lower_is_better)
    best, second = ranked[group].iloc[0], ranked[group].iloc[1]
    return str(second), welch_p(values[best], values[second])


def _objective_sentence(metric: str, groups: pd.DataFrame, group: str, p_kw: float, p_anova: float,
                        alpha: float, lower_is_better: Optional[bool], runner_up: str = "",
                        top_p: float = float("nan")) -> str:
    sizes = groups["n"]
    design = f"{len(groups)} {group}s x {sizes.min()}" + (f"-{sizes.max()}" if sizes.max() != sizes.min() else "") \
        + " seeds"
    tests = f"Kruskal-Wallis p = {p_kw:.3g}, one-way ANOVA p = {p_anova:.3g}; {design}"
    if p_kw >= alpha and p_anova >= alpha:
        return f"{metric}: the {group}s are not distinguishable at this budget ({tests})."
    if p_kw >= alpha or p_anova >= alpha:
        return f"{metric}: unresolved, the two tests disagree at the {alpha:g} level ({tests})."
    if lower_is_better is None:
        return f"{metric} differs between {group}s ({tests})."
    ranked = groups.sort_values("mean", ascending=lower_is_better)
    best = ranked.iloc[0]
    lead = ("ahead of" if top_p < alpha else "not distinguishable from") + f" the runner-up {runner_up} " \
        f"(Welch p = {top_p:.3g})"
    return (f"{metric} differs between {group}s ({tests}); best: {best[group]} "
            f"(mean {best['mean']:.3g}, interval {best['low']:.3g} to {best['high']:.3g}), {lead}.")


def between_objectives(runs: pd.DataFrame, metric: str, *, group: str = S.BACKBONE, alpha: float = 0.05,
                       confidence: float = 0.95, lower_is_better: Optional[bool] = None) -> ObjectiveTest:
    """Is the between-group spread of `metric` larger than the seed-to-seed spread?"""
    data = _complete(runs, group, metric)
    values = {str(name): g[metric].to_numpy(float) for name, g in data.groupby(group, sort=True)}
    if len(values) < 2:
        raise ValueError(f"{metric}: need runs of at least 2 {group}s to compare, got {len(values)}")
    if sum(len(v) for v in values.values()) <= len(values):
        raise ValueError(f"{metric}: need more than one seed in some {group} to measure the seed spread")
    groups = _group_intervals(values, group, confidence)
    samples = list(values.values())
    if np.ptp(np.concatenate(samples)) == 0:  # every run equal: no spread on either side
        kw, anova = (np.nan, 1.0), (np.nan, 1.0)
    else:
        kw, anova = sps.kruskal(*samples), sps.f_oneway(*samples)
    runner_up, top_p = top_two(values, groups, group, lower_is_better)
    sentence = _objective_sentence(metric, groups, group, float(kw[1]), float(anova[1]), alpha, lower_is_better,
                                   runner_up, top_p)
    return ObjectiveTest(metric, groups, float(kw[0]), float(kw[1]), float(anova[0]), float(anova[1]), sentence,
                         runner_up, top_p)
