"""The statistics behind the report's claims: seed confidence intervals, rank correlation with
a bootstrap interval, a bootstrap test of a ranking, and steps-to-quality / speed-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import stats


@dataclass
class Interval:
    mean: float
    half: float  # half-width of the interval (nan with a single seed)
    n: int

    def text(self, fmt: str = ".3g") -> str:
        # one seed: the mean alone; the report says once that such numbers carry no interval
        spread = f" ± {self.half:{fmt}}" if np.isfinite(self.half) else ""
        return f"{self.mean:{fmt}}{spread}"


def mean_ci(values, confidence: float = 0.95) -> Interval:
    """Mean ± Student-t interval over seeds (the seeds are the only replicates we have)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return Interval(float(x.mean()) if len(x) else np.nan, np.nan, len(x))
    half = stats.sem(x) * stats.t.ppf((1 + confidence) / 2, len(x) - 1)
    return Interval(float(x.mean()), float(half), len(x))


@dataclass
class Correlation:
    rho: float
    p: float  # scipy's test of rho = 0
    low: float
    high: float
    n: int


def spearman_ci(x, y, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Correlation:
    """Spearman ρ and a percentile bootstrap interval, resampling (x, y) pairs.  Resamples in
    which either side is constant have no ρ and are skipped."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    res = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            boots.append(stats.spearmanr(x[idx], y[idx]).statistic)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail]) if boots else (np.nan, np.nan)
    return Correlation(float(res.statistic), float(res.pvalue), float(low), float(high), len(x))


def bootstrap_order_p(a, b, n_boot: int = 10000, seed: int = 0) -> float:
    """Two-sided bootstrap p-value that mean(a) and mean(b) are in the observed order by chance:
    twice the share of resamples (seeds drawn with replacement in each group) that flip it."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    observed = np.sign(a.mean() - b.mean())
    diffs = rng.choice(a, (n_boot, len(a))).mean(1) - rng.choice(b, (n_boot, len(b))).mean(1)
    flipped = np.mean(np.sign(diffs) != observed)
    return float(min(1.0, 2 * flipped))


def welch_p(a, b) -> float:
    """Welch's t-test p-value: a parametric check next to the bootstrap, which is coarse with
    few seeds (3 seeds have only 10 distinct resamples)."""
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def p_text(p: float, n_boot: int) -> str:
    """A bootstrap p of 0 only means 'below the resolution of n_boot resamples'."""
    return f"< {1 / n_boot:.0g}" if p == 0 else f"= {p:.3g}"


# --------------------------------------------------------------------------- convergence
def steps_to_reach(steps, values, level: float, lower_is_better: bool = True) -> Optional[float]:
    """First training step at which the curve reaches `level`, linearly interpolated between the
    two logged points around the crossing; None if it never does."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = v <= level if lower_is_better else v >= level
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    if i == 0:
        return float(s[0])
    frac = (level - v[i - 1]) / (v[i] - v[i - 1])
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


@dataclass
class Speedup:
    baseline: str
    best: str
    level: float
    steps_baseline: float
    steps_best: float

    @property
    def ratio(self) -> float:
        return self.steps_baseline / self.steps_best if self.steps_best > 0 else np.inf


def speedup(curves: dict[str, tuple], baseline: str, level: Optional[float] = None,
            lower_is_better: bool = True) -> Optional[Speedup]:
    """How much sooner the fastest curve reaches `level` than the baseline's curve does.
    `curves`: name -> (steps, values).  `level` defaults to the baseline's best value, i.e.
    "reaches the quality the baseline ends at N× faster".  None if the baseline never gets there."""
    b_steps, b_vals = curves[baseline]
    if level is None:
        level = float(np.min(b_vals) if lower_is_better else np.max(b_vals))
    reached = {name: steps_to_reach(s, v, level, lower_is_better) for name, (s, v) in curves.items()}
    reached = {k: v for k, v in reached.items() if v is not None}
    if baseline not in reached:
        return None
    best = min(reached, key=reached.get)
    return Speedup(baseline, best, level, reached[baseline], reached[best])


def speedup_ci(runs: dict[str, np.ndarray], steps, baseline: str, level: Optional[float] = None,
               lower_is_better: bool = True,
               n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the speed-up ratio over seeds: `runs` maps a backbone to its
    (seeds, steps) curves; seeds are resampled within each backbone and curves re-averaged.
    A `level` of None is re-derived in each resample, as `speedup` does; resamples in which the
    baseline never reaches a fixed level are dropped."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n_boot):
        means = {k: (steps, m[rng.integers(0, len(m), len(m))].mean(0)) for k, m in runs.items()}
        result = speedup(means, baseline, level, lower_is_better)
        if result is not None:
            ratios.append(result.ratio)
    tail = (1 - confidence) / 2 * 100
    return tuple(np.percentile(ratios, [tail, 100 - tail])) if ratios else (np.nan, np.nan)
