"""Predictor table and between-objective test against scipy, hand formulas and exact enumeration."""

import itertools
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.predictors import (backbone_bootstrap, between_objectives, predictor_display, predictor_table,
                                 predictor_verdict)


def _runs(n_backbones=8, n_seeds=3, seed=0) -> pd.DataFrame:
    """Per-run table: `good` predicts rfd (monotone in it), `noise` does not; one missing value."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_backbones):
        base = rng.normal()
        for s in range(n_seeds):
            good = base + 0.1 * rng.normal()
            rows.append({"backbone": f"inhouse:b{b}", "seed": s, "vfm/good": good, "vfm/noise": rng.normal(),
                         "tok_eval/rfd_ref": 50 - 10 * good, "tok_eval/psnr": 15 + good + 0.5 * rng.normal()})
    runs = pd.DataFrame(rows)
    runs.loc[0, "tok_eval/psnr"] = np.nan
    return runs


# --------------------------------------------------------------------------- predictor table
def test_rho_is_scipy_spearman_over_all_complete_runs():
    runs = _runs()
    table = predictor_table(runs, ["vfm/good", "vfm/noise"], ["tok_eval/rfd_ref", "tok_eval/psnr"], n_boot=200)
    for row in table.itertuples():
        both = runs[[row.property, row.metric]].dropna()
        assert row.rho == pytest.approx(stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic, abs=1e-12)
        assert row.n_runs == len(both) and row.n_backbones == 8
        assert row.low <= row.high
    assert table.set_index(["property", "metric"]).loc[("vfm/good", "tok_eval/psnr"), "n_runs"] == 23


def test_backbone_bootstrap_matches_the_exact_resampling_distribution():
    """3 backbones x 2 seeds: enumerate all 27 equally likely backbone draws and compare frequencies."""
    runs = pd.DataFrame({"backbone": list("aabbcc"), "x": [1.0, 2.0, 3.5, 3.0, 6.0, 5.0],
                         "y": [2.0, 1.0, 4.0, 5.0, 5.5, 7.0]})
    exact = Counter()
    groups = [runs[runs.backbone == g] for g in "abc"]
    for draw in itertools.product(range(3), repeat=3):
        sample = pd.concat([groups[i] for i in draw])
        if sample.x.nunique() > 1 and sample.y.nunique() > 1:
            exact[round(stats.spearmanr(sample.x, sample.y).statistic, 9)] += 1
    total = sum(exact.values())
    boots = backbone_bootstrap(runs, "backbone", "x", "y", n_boot=20000, seed=1)
    observed = Counter(np.round(boots, 9))
    assert set(observed) == set(exact)
    for value, count in exact.items():
        assert observed[value] / len(boots) == pytest.approx(count / total, abs=0.015)


def test_bootstrap_is_seeded():
    runs = _runs()
    a = predictor_table(runs, ["vfm/noise"], ["tok_eval/psnr"], n_boot=300, seed=3)
    b = predictor_table(runs, ["vfm/noise"], ["tok_eval/psnr"], n_boot=300, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_verdict_names_the_resolved_predictor_or_says_none_is():
    table = predictor_table(_runs(), ["vfm/good", "vfm/noise"], ["tok_eval/rfd_ref"], n_boot=500)
    good = table.iloc[0]
    assert good.rho == pytest.approx(-1.0) and good.high == pytest.approx(-1.0) and good.resolved
    verdict = predictor_verdict(table)
    assert verdict.startswith("The best predictor is vfm/good: Spearman ρ = -1.00") and "24 runs of 8" in verdict
    unresolved = table.assign(low=[-0.4, -0.2], high=[0.1, 0.6], resolved=False)
    assert predictor_verdict(unresolved).startswith("No backbone property is a resolved predictor")
    # the largest |ρ| among resolved ones wins, not the largest ρ
    mixed = table.assign(rho=[0.5, -0.7], low=[0.2, -0.9], high=[0.8, -0.3], resolved=True)
    assert predictor_verdict(mixed).startswith("The best predictor is vfm/noise: Spearman ρ = -0.70")


def test_display_has_one_row_per_property_and_one_column_per_metric():
    table = predictor_table(_runs(), ["vfm/good", "vfm/noise"], ["tok_eval/rfd_ref", "tok_eval/psnr"], n_boot=100)
    shown = predictor_display(table)
    assert list(shown["property"]) == ["vfm/good", "vfm/noise"]
    assert list(shown.columns[1:]) == ["ρ with tok_eval/rfd_ref (95% CI)", "ρ with tok_eval/psnr (95% CI)"]
    assert shown.iloc[0, 1] == "-1.00 [-1.00, -1.00]"


def test_two_backbones_give_no_interval():
    runs = _runs(n_backbones=2, n_seeds=5)
    row = predictor_table(runs, ["vfm/good"], ["tok_eval/rfd_ref"], n_boot=100).iloc[0]
    assert row.rho == pytest.approx(-1.0) and np.isnan(row.low) and np.isnan(row.high) and not row.resolved
    assert predictor_verdict(pd.DataFrame([row])).startswith("No predictor can be resolved from 2 backbones")


def test_missing_column_is_named():
    with pytest.raises(KeyError, match="vfm/cknna"):
        predictor_table(_runs(), ["vfm/cknna"], ["tok_eval/psnr"])


# --------------------------------------------------------------------------- between objectives
def _objectives(shift: float, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"backbone": f"obj{g}", "seed": s, "tok_eval/rfd_ref": 10 + shift * g + rng.normal()}
                         for g in range(4) for s in range(3)])


def test_between_objectives_matches_scipy_and_hand_formulas():
    runs = _objectives(shift=0.8)
    result = between_objectives(runs, "tok_eval/rfd_ref")
    samples = [g["tok_eval/rfd_ref"].to_numpy() for _, g in runs.groupby("backbone")]
    kw, anova = stats.kruskal(*samples), stats.f_oneway(*samples)
    assert (result.kruskal_h, result.kruskal_p) == pytest.approx((kw.statistic, kw.pvalue), rel=1e-12)
    assert (result.anova_f, result.anova_p) == pytest.approx((anova.statistic, anova.pvalue), rel=1e-12)
    # ANOVA F by hand: between-group over within-group mean squares
    grand = np.concatenate(samples).mean()
    ssb = sum(len(x) * (x.mean() - grand) ** 2 for x in samples)
    ssw = sum(((x - x.mean()) ** 2).sum() for x in samples)
    assert result.anova_f == pytest.approx((ssb / 3) / (ssw / 8), rel=1e-10)
    # per-group 95 % Student-t interval by hand
    x = samples[2]
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3)
    row = result.groups.set_index("backbone").loc["obj2"]
    assert (row["mean"], row["low"], row["high"], row["n"]) == pytest.approx((x.mean(), x.mean() - half,
                                                                                x.mean() + half, 3))


def test_sentence_says_not_distinguishable_when_the_groups_share_one_distribution():
    result = between_objectives(_objectives(shift=0.0), "tok_eval/rfd_ref", lower_is_better=True)
    assert result.kruskal_p >= 0.05 and result.anova_p >= 0.05
    assert result.sentence.startswith("tok_eval/rfd_ref: the backbones are not distinguishable at this budget")
    assert "4 backbones x 3 seeds" in result.sentence


def test_sentence_names_the_best_group_when_they_differ():
    result = between_objectives(_objectives(shift=5.0), "tok_eval/rfd_ref", lower_is_better=True)
    assert result.kruskal_p < 0.05 and result.anova_p < 0.05
    assert result.sentence.startswith("tok_eval/rfd_ref differs between backbones")
    assert "best: obj0" in result.sentence
    higher = between_objectives(_objectives(shift=5.0), "tok_eval/rfd_ref", lower_is_better=False)
    assert "best: obj3" in higher.sentence


def test_groups_that_differ_do_not_make_the_best_mean_better_than_the_runner_up():
    """Two backbones far below two tied ones: the groups differ, but the best is named as tied with
    the runner-up, with Welch's p of the two (scipy's) in the sentence."""
    rng = np.random.default_rng(1)
    level = {"obj0": 10.0, "obj1": 10.0, "obj2": 30.0, "obj3": 30.0}
    runs = pd.DataFrame([{"backbone": g, "seed": s, "tok_eval/rfd_ref": v + rng.normal()}
                         for g, v in level.items() for s in range(3)])
    result = between_objectives(runs, "tok_eval/rfd_ref", lower_is_better=True)
    assert result.kruskal_p < 0.05 and result.anova_p < 0.05
    values = {g: d["tok_eval/rfd_ref"].to_numpy() for g, d in runs.groupby("backbone")}
    best, runner_up = sorted(("obj0", "obj1"), key=lambda g: values[g].mean())
    assert result.runner_up == runner_up
    assert result.top_two_p == pytest.approx(stats.ttest_ind(values[best], values[runner_up], equal_var=False).pvalue)
    assert result.top_two_p >= 0.05
    assert f"not distinguishable from the runner-up {runner_up}" in result.sentence
    clear = between_objectives(_objectives(shift=5.0), "tok_eval/rfd_ref", lower_is_better=True)
    assert clear.top_two_p < 0.05 and "ahead of the runner-up obj1" in clear.sentence


def test_between_objectives_needs_two_groups_and_a_seed_spread():
    runs = _objectives(shift=1.0)
    with pytest.raises(ValueError, match="at least 2 backbones"):
        between_objectives(runs[runs.backbone == "obj0"], "tok_eval/rfd_ref")
    with pytest.raises(ValueError, match="more than one seed"):
        between_objectives(runs[runs.seed == 0], "tok_eval/rfd_ref")


def test_backbone_permutation_p_is_scipys_exact_pairing_test_on_backbone_means():
    from analysis.predictors import backbone_permutation_p
    runs = _runs(n_backbones=6, n_seeds=2, seed=4)
    means = runs.groupby("backbone")[["vfm/noise", "tok_eval/psnr"]].mean()
    y = means["tok_eval/psnr"].to_numpy()  # permuting one side is every relabelling (6! of them)
    ref = stats.permutation_test((means["vfm/noise"].to_numpy(),), lambda a: stats.spearmanr(a, y).statistic,
                                 permutation_type="pairings", n_resamples=np.inf, alternative="two-sided").pvalue
    assert backbone_permutation_p(runs, "backbone", "vfm/noise", "tok_eval/psnr") == pytest.approx(ref)


def test_three_backbones_never_resolve_a_predictor_however_tight_the_bootstrap():
    """A perfect monotone relation over 3 backbones happens by chance for 2 of their 6 orders."""
    runs = _runs(n_backbones=3, n_seeds=3)
    row = predictor_table(runs, ["vfm/good"], ["tok_eval/rfd_ref"], n_boot=300).iloc[0]
    assert row.rho == pytest.approx(-1.0) and row.p_perm == pytest.approx(2 / 6) and not row.resolved
    assert predictor_verdict(pd.DataFrame([row])).startswith("No backbone property is a resolved predictor")


def test_holm_adjustment_known_values():
    from analysis.predictors import holm
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04); nan is not counted
    assert holm(np.array([0.01, 0.04, np.nan, 0.03])) == pytest.approx([0.03, 0.06, np.nan, 0.06], nan_ok=True)
