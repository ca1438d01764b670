"""The study's answer as numbers and sentences: the headline table, the between-objective tests,
the predictor table, and the two or three sentences that open the report and the results page.

Everything is computed per pipeline (VFMTok + GPT and VFMAE + DiT metrics are on different
scales) on the runs of the main setting (`figures.main_setting`: ablation cells left out), with
the backbone as the group: in an objectives study each backbone is one pretraining objective.
Each function says why it has nothing to give (one seed, one backbone, a metric never logged)
instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import predictors, stats
from analysis.figures import GENERATION_QUALITY, PROBE, SERIES, TOKENIZER_QUALITY, _with_series, main_setting, pick
from analysis.results import direction
from study import schema as S

# the backbone properties that might predict quality (vfm stage), probes first
PROPERTIES = tuple(S.metric(S.VFM, k) for k in (S.PROBE_ACC, S.KNN_ACC, S.SPATIAL_STRUCTURE, S.MUTUAL_KNN,
                                                S.CKNNA, S.RANKME))
GROUP_COLUMNS = [SERIES, "metric", S.BACKBONE, "mean", "low", "high", "n"]
# the floors a number must clear before it says anything about a backbone: chance for its probe, the
# per-class mean image for a reconstruction (below a gain of RECOGNISABLE_DB the reconstructions read as
# class-mean blobs, not the image's shape)
BACKBONE_PROBE = S.metric(S.VFM, S.PROBE_ACC)
RECON_GAIN = (S.metric(S.TOK_EVAL, S.PSNR), S.metric(S.TOK_EVAL, S.PSNR_CLASS_MEAN))
RECOGNISABLE_DB = 4.0
PROBE_N = ("params.pretrain.eval.val_samples", "params.data.val_size")  # the probe scores min() of these
CLASSES = "params.data.num_classes"
TEST_COLUMNS = [SERIES, "metric", "kruskal_h", "kruskal_p", "anova_f", "anova_p", "runner_up", "top_two_p", "sentence"]


@dataclass
class Evidence:
    metrics: list[str]  # headline metrics present: tokenizer quality, generation quality, probe
    table: pd.DataFrame  # the one table: backbone x pipeline, mean and interval of each headline metric
    groups: pd.DataFrame  # per (pipeline, metric, backbone): mean and Student-t interval over seeds
    tests: pd.DataFrame  # per (pipeline, metric): Kruskal-Wallis and ANOVA across backbones
    untested: dict[tuple[str, str], str] = field(default_factory=dict)  # (pipeline, metric) -> why no test
    predictors: pd.DataFrame = field(default_factory=pd.DataFrame)  # long predictor table with a pipeline column
    verdict: str = ""
    answer: list[str] = field(default_factory=list)
    single_seed: bool = False  # some number rests on one seed: the report says so once
    floors: pd.DataFrame = field(default_factory=pd.DataFrame)  # per backbone: probe vs chance, recon gain
    floor_sentences: list[str] = field(default_factory=list)  # what the run can and cannot conclude


def headline_metrics(runs: pd.DataFrame) -> list[str]:
    return [m for m in (pick(runs, TOKENIZER_QUALITY), pick(runs, GENERATION_QUALITY), pick(runs, PROBE)) if m]


def _pipelines(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    data = _with_series(main_setting(runs))
    return {str(series): g for series, g in data.groupby(SERIES, sort=True)}


def _interval_text(mean: float, low: float, high: float) -> str:
    return f"{mean:.4g}" if not np.isfinite(low) else f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def headline_table(pipelines: dict[str, pd.DataFrame], metrics: list[str], confidence: float) -> pd.DataFrame:
    """backbone, pipeline, seeds, label sampling and 'mean [low, high]' of each headline metric."""
    rows = []
    for series, data in pipelines.items():
        for backbone, g in data.groupby(S.BACKBONE, sort=True):
            row = {S.BACKBONE: backbone, SERIES: series, "seeds": len(g)}
            if S.LABEL_SAMPLING in g:
                row[S.LABEL_SAMPLING] = ", ".join(sorted(map(str, g[S.LABEL_SAMPLING].dropna().unique()))) or "n/a"
            for metric in metrics:
                ci = stats.mean_ci(g[metric].dropna(), confidence) if metric in g else stats.mean_ci([])
                row[metric] = "n/a" if ci.n == 0 else _interval_text(ci.mean, ci.mean - ci.half, ci.mean + ci.half)
            rows.append(row)
    return pd.DataFrame(rows)


def objective_tests(pipelines: dict[str, pd.DataFrame], metrics: list[str], confidence: float
                    ) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[str, str], str]]:
    """(per-group intervals, tests, why a (pipeline, metric) cannot be tested)."""
    groups, tests, untested = [], [], {}
    for series, data in pipelines.items():
        for metric in metrics:
            if metric not in data or data[metric].isna().all():
                continue
            try:
                test = predictors.between_objectives(data, metric, confidence=confidence, alpha=1 - confidence,
                                                     lower_is_better=direction(metric) == "min")
            except ValueError as err:
                untested[series, metric] = str(err).removeprefix(f"{metric}: ")
                continue
            groups.append(test.groups.assign(**{SERIES: series, "metric": metric}))
            tests.append({SERIES: series, "metric": metric, "kruskal_h": test.kruskal_h, "kruskal_p": test.kruskal_p,
                          "anova_f": test.anova_f, "anova_p": test.anova_p, "runner_up": test.runner_up,
                          "top_two_p": test.top_two_p, "sentence": test.sentence})
    group_frame = pd.concat(groups, ignore_index=True)[GROUP_COLUMNS] if groups else pd.DataFrame(columns=GROUP_COLUMNS)
    return group_frame, pd.DataFrame(tests, columns=TEST_COLUMNS), untested


def predictor_rows(pipelines: dict[str, pd.DataFrame], quality: list[str], *, n_boot: int, confidence: float,
                   seed: int) -> pd.DataFrame:
    """Spearman ρ of every backbone property with every quality metric, per pipeline."""
    tables = []
    for series, data in pipelines.items():
        props = [p for p in PROPERTIES if p in data and data[p].notna().any()]
        present = [m for m in quality if m in data and data[m].notna().any()]
        if props and present:
            table = predictors.predictor_table(data, props, present, n_boot=n_boot, confidence=confidence, seed=seed)
            tables.append(table.assign(**{SERIES: series}))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[*predictors.PREDICTOR_COLUMNS,
                                                                                       SERIES])


def _best_by_mean(data: pd.DataFrame, metric: str) -> tuple[str, float]:
    means = data.groupby(S.BACKBONE)[metric].mean().dropna()
    best = means.idxmin() if direction(metric) == "min" else means.idxmax()
    return str(best), float(means[best])


def _answer_part(series: str, metric: str, data: pd.DataFrame, tests: pd.DataFrame,
                 untested: dict[tuple[str, str], str], alpha: float) -> str:
    row = tests[(tests[SERIES] == series) & (tests["metric"] == metric)]
    best, mean = _best_by_mean(data, metric)
    if row.empty:
        return f"on {series} {best} has the best mean ({mean:.4g}), untested: {untested.get((series, metric), '')}"
    t = row.iloc[0]
    p = f"Kruskal-Wallis p = {t['kruskal_p']:.3g}, ANOVA p = {t['anova_p']:.3g}"
    if t["kruskal_p"] < alpha and t["anova_p"] < alpha:
        if t["top_two_p"] < alpha:
            return (f"on {series} {best} is best (mean {mean:.4g}; the backbones differ, {p}; ahead of the "
                    f"runner-up {t['runner_up']}, Welch p = {t['top_two_p']:.3g})")
        return (f"on {series} the backbones differ ({p}) but the best mean, {best} ({mean:.4g}), is not "
                f"distinguishable from the runner-up {t['runner_up']} at this budget (Welch p = {t['top_two_p']:.3g})")
    if t["kruskal_p"] >= alpha and t["anova_p"] >= alpha:
        return f"on {series} the backbones are not distinguishable at this budget ({p}; best mean {best}, {mean:.4g})"
    return f"on {series} unresolved: the two tests disagree ({p}; best mean {best}, {mean:.4g})"


def answer_sentences(pipelines: dict[str, pd.DataFrame], metrics: list[str], tests: pd.DataFrame,
                     untested: dict[tuple[str, str], str], verdict: str, alpha: float) -> list[str]:
    """One sentence per quality metric (tokenizer, generation) over the pipelines, then the verdict
    on predictors: the answer and its uncertainty, or 'not distinguishable at this budget'."""
    out = []
    for metric in metrics[:2]:
        parts = [_answer_part(series, metric, data, tests, untested, alpha) for series, data in pipelines.items()
                 if metric in data and data[metric].notna().any()]
        if parts:
            out.append(f"Which backbone gives the best {metric}: " + "; ".join(parts) + ".")
    return [*out, verdict] if verdict else out


def floor_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per backbone: its probe accuracy against chance (in binomial standard errors under chance) and,
    per pipeline, the mean PSNR gain of its reconstructions over the per-class mean image."""
    data = _with_series(main_setting(runs))
    rows = []
    for backbone, g in data.groupby(S.BACKBONE, sort=True):
        row: dict = {S.BACKBONE: backbone}
        if BACKBONE_PROBE in g and g[BACKBONE_PROBE].notna().any() and CLASSES in g:
            chance = 1.0 / float(g[CLASSES].dropna().iloc[0])
            n = min(float(g[col].dropna().iloc[0]) for col in PROBE_N if col in g and g[col].notna().any())
            se = float(np.sqrt(chance * (1 - chance) / n))
            acc = float(g[BACKBONE_PROBE].mean())
            row.update(probe=acc, chance=chance, probe_se=se, above_chance_se=(acc - chance) / se)
        if all(c in g for c in RECON_GAIN):
            for series, part in g.groupby(SERIES, sort=True):
                gain = (part[RECON_GAIN[0]] - part[RECON_GAIN[1]]).dropna()
                if len(gain):
                    row[f"psnr_gain_db ({series})"] = float(gain.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def floor_sentences(floors: pd.DataFrame, single_seed: bool) -> list[str]:
    """Which backbones clear chance and which reconstructions the class-mean image, and what the run
    can and cannot conclude from that."""
    out = []
    if "above_chance_se" in floors:
        probed = floors.dropna(subset=["above_chance_se"])
        clear = probed[probed["above_chance_se"] > 1]
        miss = probed[probed["above_chance_se"] <= 1]
        first = probed.iloc[0]
        line = (f"Backbone probes against chance ({first['chance']:.3g}, binomial standard error "
                f"{first['probe_se']:.2g}): above it by more than one standard error: "
                f"{', '.join(f'{b} ({a:.3g})' for b, a in zip(clear[S.BACKBONE], clear['probe'])) or 'none'}")
        if len(miss):
            line += f"; not: {', '.join(f'{b} ({a:.3g})' for b, a in zip(miss[S.BACKBONE], miss['probe']))}"
        out.append(line + ".")
    for col in [c for c in floors.columns if c.startswith("psnr_gain_db")]:
        gains = floors.dropna(subset=[col])
        low = gains[gains[col] < RECOGNISABLE_DB]
        series = col[col.index("(") + 1:-1]
        listed = ", ".join(f"{b} {v:+.1f} dB" for b, v in zip(gains[S.BACKBONE], gains[col]))
        verdict = (f"all at least {RECOGNISABLE_DB:g} dB, shapes rather than class-mean blobs" if low.empty else
                   f"below {RECOGNISABLE_DB:g} dB (class-mean blobs rather than shapes): "
                   f"{', '.join(map(str, low[S.BACKBONE]))}")
        out.append(f"Reconstructions on {series} against the per-class mean image: {listed}; {verdict}.")
    if out and single_seed:
        out.append("What this run can conclude: which backbones clear these floors. What it cannot: which backbone "
                   "is best, because each cell ran one seed and no difference between backbones has an interval; "
                   "rank them with several seeds (sweeps/objectives.yaml runs three).")
    return out


def gather(runs: pd.DataFrame, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Evidence:
    """Every number and sentence of the study's answer, from a runs frame (`analysis.results.load_sweep`)."""
    metrics = headline_metrics(runs)
    if runs.empty or not metrics or S.BACKBONE not in runs:
        return Evidence(metrics, pd.DataFrame(), pd.DataFrame(columns=GROUP_COLUMNS), pd.DataFrame(columns=TEST_COLUMNS),
                        answer=["No run has a headline metric yet, so the study has no answer (run the sweep to "
                                "the tok_eval and gen_eval stages)."])
    pipelines = _pipelines(runs)
    groups, tests, untested = objective_tests(pipelines, metrics, confidence)
    quality = [m for m in metrics if m not in PROBE]
    preds = predictor_rows(pipelines, quality, n_boot=n_boot, confidence=confidence, seed=seed)
    labelled = preds.assign(metric=preds["metric"] + " (" + preds[SERIES] + ")")
    verdict = predictors.predictor_verdict(labelled, confidence)
    table = headline_table(pipelines, metrics, confidence)
    single = bool(len(table)) and bool((table["seeds"] < 2).any())
    answer = answer_sentences(pipelines, metrics, tests, untested, verdict, 1 - confidence)
    floors = floor_table(runs)
    return Evidence(metrics, table, groups, tests, untested, preds, verdict, answer, single, floors,
                    floor_sentences(floors, single))
