"""The study's figures, drawn from the runs frame of `analysis.results.load_sweep`.

Every function takes (runs, out_dir, ...) and returns `Plot(path, numbers, missing)`: the PNG it
wrote, the numbers it plotted (a DataFrame, or a dict of them), and, instead of an empty plot,
`missing` = a sentence saying which data was absent (then `path` is None).  Figures are built
with matplotlib's object API on the Agg canvas, so importing this never changes the pyplot
backend of a notebook.  Error bars are mean ± Student-t intervals over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import stats
from study import schema as S
from analysis.results import artifact, direction, histories

# first present wins: real-Inception names only exist when real weights were used. Without them a
# tokenizer is judged by its PSNR, not rfd_ref: the reference classifier recognises a class-mean blob as
# its class, so backbones whose tokenizers only reproduce the class-mean image got the lowest rfd_ref
# of the objectives study
TOKENIZER_QUALITY = (S.metric(S.TOK_EVAL, S.RFID), S.metric(S.TOK_EVAL, S.PSNR), S.metric(S.TOK_EVAL, S.RFD_REF))
GENERATION_QUALITY = (S.metric(S.GEN_EVAL, S.GFID), S.metric(S.GEN_EVAL, S.FD_REF))
PROBE = (S.metric(S.TOK_EVAL, S.PROBE_ACC), S.metric(S.VFM, S.PROBE_ACC))
VFM_QUALITY = (S.metric(S.VFM, S.PROBE_ACC), S.metric(S.VFM, S.KNN_ACC), S.metric(S.VFM, S.EFFECTIVE_RANK))
CONVERGENCE = S.metric(S.GENERATOR, S.FD_REF)
GUIDANCE = (S.metric(S.GEN_EVAL, S.FD_REF), S.metric(S.GEN_EVAL, S.guided(S.FD_REF)))
SERIES = "series"  # tokenizer+generator pipeline, or "all" when the runs do not say
ABLATIONS = (S.NUM_QUERIES, S.SAMPLER, S.SEMANTIC)


class Plot(NamedTuple):
    path: Optional[Path]
    numbers: Any
    missing: Optional[str] = None


def pick(runs: pd.DataFrame, options: tuple[str, ...]) -> Optional[str]:
    return next((m for m in options if m in runs and runs[m].notna().any()), None)


def _with_series(runs: pd.DataFrame) -> pd.DataFrame:
    out = runs.copy()
    out[SERIES] = runs["pipeline"].fillna("all").astype(str) if "pipeline" in runs else "all"
    out[S.BACKBONE] = runs[S.BACKBONE].fillna("?").astype(str) if S.BACKBONE in runs else "?"
    return out


def main_setting(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs at each pipeline's most common value of every ablation factor, so that per-backbone
    comparisons are not pooled with ablation cells (those have their own figures)."""
    data = _with_series(runs)
    keep = pd.Series(True, index=runs.index)
    for factor in (f for f in ABLATIONS if f in runs):
        for _, group in data.groupby(SERIES):
            values = group[factor].dropna()
            if values.nunique() > 1:
                keep[group.index] &= group[factor] == values.mode().iloc[0]
    return runs[keep.fillna(False).astype(bool)]


def seed_table(runs: pd.DataFrame, metric: str, by: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """mean, ci (half-width), n and the per-seed values of `metric` for each group."""
    rows = []
    for key, group in runs.dropna(subset=[metric]).groupby(by, sort=True):
        ci = stats.mean_ci(group[metric], confidence)
        rows.append({**dict(zip(by, key)), "metric": metric, "mean": ci.mean, "ci": ci.half, "n": ci.n,
                     "values": group[metric].tolist()})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "ci", "n", "values"])


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _bars(ax, table: pd.DataFrame, x: str, hue: str, ylabel: str) -> None:
    """Grouped bars with interval whiskers (none drawn for a single seed)."""
    cats = sorted(table[x].astype(str).unique())
    hues = sorted(table[hue].astype(str).unique())
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sel = table[table[hue].astype(str) == h]
        sub = sel.set_index(sel[x].astype(str)).reindex(cats)
        pos = np.arange(len(cats)) + (j - (len(hues) - 1) / 2) * width
        ax.bar(pos, sub["mean"], width, yerr=sub["ci"].fillna(0), capsize=3, label=h)
    ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if len(hues) > 1:
        ax.legend(fontsize=7)


# --------------------------------------------------------------------------- per-backbone bars
def backbone_bars(runs: pd.DataFrame, out_dir: Path, confidence: float = 0.95) -> Plot:
    """Tokenizer quality, generation quality and probe accuracy per backbone."""
    metrics = [m for m in (pick(runs, TOKENIZER_QUALITY), pick(runs, GENERATION_QUALITY), pick(runs, PROBE)) if m]
    if not metrics:
        return Plot(None, pd.DataFrame(), f"no runs with any of {TOKENIZER_QUALITY + GENERATION_QUALITY + PROBE}")
    data = _with_series(main_setting(runs))
    tables = [seed_table(data, m, [S.BACKBONE, SERIES], confidence) for m in metrics]
    fig = Figure(figsize=(4.5 * len(metrics), 3.8))
    for ax, metric, table in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, tables):
        _bars(ax, table, S.BACKBONE, SERIES, metric)
        better = "lower" if direction(metric) == "min" else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
    return Plot(_save(fig, out_dir, "backbones"), pd.concat(tables, ignore_index=True))


# --------------------------------------------------------------------------- family scatter
def family_scatter(runs: pd.DataFrame, out_dir: Path, n_boot: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> Plot:
    """VFM representation quality vs tokenizer quality, one point per backbone (seed means),
    coloured by objective family; Spearman ρ with a bootstrap interval per tokenizer kind."""
    x, y = pick(runs, VFM_QUALITY), pick(runs, TOKENIZER_QUALITY)
    if not x or not y:
        return Plot(None, {}, f"no runs with both a VFM metric {VFM_QUALITY} and a tokenizer metric {TOKENIZER_QUALITY}")
    runs = main_setting(runs)
    data = _with_series(runs)
    data[S.FAMILY] = runs[S.FAMILY].fillna("?").astype(str) if S.FAMILY in runs else "?"
    data["kind"] = runs[S.TOKENIZER_KIND].fillna("all").astype(str) if S.TOKENIZER_KIND in runs else "all"
    points = data.dropna(subset=[x, y]).groupby(["kind", S.BACKBONE, S.FAMILY], as_index=False)[[x, y]].mean()
    corr = []
    for kind, group in points.groupby("kind"):
        if group[S.BACKBONE].nunique() >= 3:
            c = stats.spearman_ci(group[x], group[y], n_boot, confidence, seed)
            corr.append({"kind": kind, "x": x, "y": y, "rho": c.rho, "p": c.p, "low": c.low, "high": c.high, "n": c.n})
    if not corr:
        return Plot(None, {"points": points}, f"fewer than 3 backbones with both {x} and {y}: no rank correlation")
    corr = pd.DataFrame(corr)
    kinds = list(corr["kind"])
    fig = Figure(figsize=(4.5 * len(kinds), 4))
    for ax, (_, c) in zip(fig.subplots(1, len(kinds), squeeze=False)[0], corr.iterrows()):
        group = points[points["kind"] == c["kind"]]
        for family, fam in group.groupby(S.FAMILY):
            ax.scatter(fam[x], fam[y], label=family, s=40)
        for _, p in group.iterrows():
            ax.annotate(p[S.BACKBONE], (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=x, ylabel=y)
        ax.set_title(f"{c['kind']}: Spearman ρ = {c['rho']:.2f}, {confidence:.0%} CI [{c['low']:.2f}, {c['high']:.2f}]",
                     fontsize=9)
        ax.legend(fontsize=7, title=S.FAMILY, title_fontsize=7)
    return Plot(_save(fig, out_dir, "family_scatter"), {"points": points, "correlations": corr})


# --------------------------------------------------------------------------- convergence
def convergence(runs: pd.DataFrame, out_dir: Path, metric: str = CONVERGENCE, baseline: Optional[str] = None,
                level: Optional[float] = None, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> Plot:
    """`metric` vs training step per backbone (mean over seeds, min–max band), and the speed-up:
    steps the baseline needs to reach `level` ÷ steps the fastest backbone needs (interpolated).
    Defaults: the baseline is the backbone that ends worst; the level is where it ends."""
    runs = main_setting(runs)
    long = histories(runs, metric) if len(runs) else pd.DataFrame()
    if long.empty or long.groupby("run_id")["step"].nunique().max() < 2:
        return Plot(None, {}, f"no runs with a {metric} history over several steps")
    lower = direction(metric) != "max"
    long["kind"] = long[S.GENERATOR_KIND].fillna("all").astype(str) if S.GENERATOR_KIND in long else "all"
    long[S.BACKBONE] = long[S.BACKBONE].fillna("?").astype(str) if S.BACKBONE in long else "?"
    kinds = sorted(long["kind"].unique())
    fig = Figure(figsize=(5 * len(kinds), 4))
    curves, speeds = [], []
    for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds):
        matrices = _seed_matrices(long[long["kind"] == kind])
        mean = {b: (m.columns.to_numpy(), m.to_numpy().mean(0)) for b, m in matrices.items()}
        base = baseline if baseline in mean else _worst(mean, lower)
        # a speed-up compares backbones: with one there is nothing to compare it with
        result = stats.speedup(mean, base, level, lower) if len(mean) > 1 else None
        for b, m in matrices.items():
            ax.plot(m.columns, mean[b][1], marker="o", ms=3, label=b)
            ax.fill_between(m.columns, m.min(axis=0), m.max(axis=0), alpha=0.2)
            curves += [{"kind": kind, S.BACKBONE: b, "step": s, "mean": v, "n": len(m)} for s, v in zip(*mean[b])]
        if result is not None:
            low, high = stats.speedup_ci({b: m.to_numpy() for b, m in matrices.items()}, mean[base][0], base,
                                         level, lower, n_boot, confidence, seed)
            speeds.append({"kind": kind, "baseline": base, "best": result.best, "level": result.level,
                           "steps_baseline": result.steps_baseline, "steps_best": result.steps_best,
                           "speedup": result.ratio, "low": low, "high": high})
            ax.axhline(result.level, ls="--", c="gray", lw=1)
            title = (f"{kind}: {result.best} reaches {result.level:.3g} {result.ratio:.2f}× faster than {base}"
                     if np.isfinite(result.ratio) else
                     f"{kind}: {result.best} is at {result.level:.3g} from its first evaluation (vs {base}: not resolved)")
            ax.set_title(title, fontsize=9)
        ax.set(xlabel="training step", ylabel=metric)
        ax.legend(fontsize=7)
    numbers = {"curves": pd.DataFrame(curves), "speedups": pd.DataFrame(speeds)}
    return Plot(_save(fig, out_dir, "convergence"), numbers)


def _seed_matrices(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """backbone -> (runs × steps) values, on the steps every run of that backbone logged."""
    out = {}
    for backbone, group in long.groupby(S.BACKBONE):
        matrix = group.pivot_table(index="run_id", columns="step", values="value").dropna(axis=1)
        if matrix.shape[1] >= 2:
            out[backbone] = matrix
    return out


def _worst(mean: dict[str, tuple], lower: bool) -> str:
    final = {b: v[-1] for b, (_, v) in mean.items()}
    return max(final, key=final.get) if lower else min(final, key=final.get)


# --------------------------------------------------------------------------- guidance
def guidance(runs: pd.DataFrame, out_dir: Path, confidence: float = 0.95) -> Plot:
    """gen_eval/fd_ref without vs with guidance (CFG for AR, AutoGuidance for DiT), paired by run."""
    plain, guided = GUIDANCE
    if plain not in runs or guided not in runs or runs[[plain, guided]].dropna().empty:
        return Plot(None, pd.DataFrame(), f"no runs with both {plain} and {guided}")
    data = _with_series(main_setting(runs)).dropna(subset=[plain, guided])
    data["gain"] = data[plain] - data[guided]  # > 0: guidance lowers (improves) fd_ref
    rows = []
    for (backbone, series), g in data.groupby([S.BACKBONE, SERIES]):
        ci = {k: stats.mean_ci(g[m], confidence) for k, m in (("plain", plain), ("guided", guided), ("gain", "gain"))}
        rows.append({S.BACKBONE: backbone, SERIES: series, "n": len(g),
                     **{f"{k}_{a}": getattr(v, b) for k, v in ci.items() for a, b in (("mean", "mean"), ("ci", "half"))}})
    table = pd.DataFrame(rows)
    labels = table[S.BACKBONE] + "\n" + table[SERIES]
    pos = np.arange(len(table))
    fig = Figure(figsize=(max(5, 1.2 * len(table)), 4))
    ax = fig.subplots()
    ax.bar(pos - 0.2, table["plain_mean"], 0.4, yerr=table["plain_ci"].fillna(0), capsize=3, label="no guidance")
    ax.bar(pos + 0.2, table["guided_mean"], 0.4, yerr=table["guided_ci"].fillna(0), capsize=3, label="guided")
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set(ylabel=f"{plain} (lower is better)", title="with vs without guidance")
    ax.legend(fontsize=7)
    return Plot(_save(fig, out_dir, "guidance"), table)


# --------------------------------------------------------------------------- ablations
def ablation(runs: pd.DataFrame, out_dir: Path, factor: str, confidence: float = 0.95) -> Plot:
    """Quality vs `factor` (num_queries, sampler, semantic) within the backbone × pipeline groups
    where the factor actually varies (elsewhere it is confounded with everything else)."""
    metrics = [m for m in (pick(runs, TOKENIZER_QUALITY), pick(runs, GENERATION_QUALITY)) if m]
    if factor not in runs or not metrics:
        return Plot(None, pd.DataFrame(), f"no runs with {factor} varying")
    data = _with_series(runs).dropna(subset=[factor])
    data[factor] = data[factor].astype(object)
    varied = data.groupby([S.BACKBONE, SERIES])[factor].transform("nunique") >= 2
    data = data[varied]
    if data.empty:
        return Plot(None, pd.DataFrame(), f"no runs with {factor} varying")
    tables = [seed_table(data, m, [S.BACKBONE, SERIES, factor], confidence) for m in metrics]
    fig = Figure(figsize=(4.5 * len(metrics), 3.8))
    for ax, metric, table in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, tables):
        table["group"] = table[S.BACKBONE] + " " + table[SERIES]
        levels = pd.Series(list(table[factor]))
        if pd.api.types.is_numeric_dtype(levels) and not pd.api.types.is_bool_dtype(levels):
            for group, g in table.groupby("group"):
                ax.errorbar(g[factor].astype(float), g["mean"], yerr=g["ci"].fillna(0), marker="o", capsize=3, label=group)
            ax.set(xlabel=factor, ylabel=metric)
            ax.legend(fontsize=7)
        else:
            _bars(ax, table.assign(**{factor: table[factor].astype(str)}), factor, "group", metric)
        ax.set_title(f"{metric} vs {factor}", fontsize=9)
    return Plot(_save(fig, out_dir, f"ablation_{factor}"), pd.concat(tables, ignore_index=True))


# --------------------------------------------------------------------------- image grids
def image_grids(runs: pd.DataFrame, out_dir: Path, name: str = S.SAMPLES_GRID) -> Plot:
    """The run artifact `name` of one run (lowest seed) per backbone × pipeline, side by side."""
    from matplotlib.image import imread

    data = _with_series(main_setting(runs))
    order = [c for c in (S.BACKBONE, SERIES, S.SEED) if c in data]
    rows = []
    for (backbone, series), g in data.sort_values(order).groupby([S.BACKBONE, SERIES]):
        for run_id in g["run_id"]:
            local = artifact(runs, run_id, name, Path(out_dir) / "artifacts")
            if local is not None:
                rows.append({S.BACKBONE: backbone, SERIES: series, "run_id": run_id, "file": local})
                break
    if not rows:
        return Plot(None, pd.DataFrame(), f"no runs with an artifact {name}")
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(3 * len(table), 3.4))
    for ax, (_, r) in zip(fig.subplots(1, len(table), squeeze=False)[0], table.iterrows()):
        ax.imshow(imread(r["file"]))
        ax.set_title(f"{r[S.BACKBONE]}\n{r[SERIES]}", fontsize=8)
        ax.axis("off")
    return Plot(_save(fig, out_dir, Path(name).stem), table)
