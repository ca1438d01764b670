"""analysis/ on two studies:
- the real chain's micro study (tests/real_chain.py: every stage of study.pipeline, tracked by
  the engine) -> runs frame checked against the ledger, figures, report, CLI, notebook;
- a finished sweep with known answers (fixed metrics, curves and seeds logged under the
  schema's names) -> the statistics, correlations and speed-ups the report states."""

from __future__ import annotations

import base64
import html
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats as sps

from analysis import figures, results, stats
from analysis.report import ReportConfig, main, report, write_report
from study import schema as S
from study.stages import read_stage_result
from tests.real_chain import BACKBONES as REAL_BACKBONES

BACKBONES = {"inhouse:none": "none", "inhouse:dino": "self-distillation", "inhouse:ibot": "self-distillation+latent-mim"}
VFM_PROBE = {"inhouse:none": 0.2, "inhouse:dino": 0.6, "inhouse:ibot": 0.7}
RFD = {"inhouse:none": 40.0, "inhouse:dino": 20.0, "inhouse:ibot": 15.0}
STEPS = [0, 100, 200, 300, 400, 500]
# generator fd_ref vs step: with level 50, none crosses at step 250 and ibot at 83.3 -> 3.0x
CURVES = {"inhouse:none": [100, 80, 60, 40, 35, 30], "inhouse:dino": [100, 60, 40, 30, 25, 22],
          "inhouse:ibot": [100, 40, 30, 25, 20, 18]}
PIPELINES = (("vfmtok", "gpt"), ("vfmae", "dit"))
SEEDS = (0, 1, 2)
TOK_QUALITY = S.metric(S.TOK_EVAL, S.PSNR)  # the tokenizer headline without real Inception weights
RFD_REF, FD_REF, FD_REF_GUIDED = (S.metric(S.TOK_EVAL, S.RFD_REF), S.metric(S.GEN_EVAL, S.FD_REF),
                                  S.metric(S.GEN_EVAL, S.guided(S.FD_REF)))
VFM_PROBE_ACC, CURVE = S.metric(S.VFM, S.PROBE_ACC), S.metric(S.GENERATOR, S.FD_REF)


def _cells():
    """3 backbones x 2 pipelines x 3 seeds at the main setting, plus dino vfmtok+gpt ablation cells
    (num_queries 16; grid sampler). The semantic branch never varies."""
    for backbone in BACKBONES:
        for tok, gen in PIPELINES:
            for seed in SEEDS:
                yield dict(backbone=backbone, tok=tok, gen=gen, seed=seed, nq=64, sampler="region")
    for seed in SEEDS:
        yield dict(backbone="inhouse:dino", tok="vfmtok", gen="gpt", seed=seed, nq=16, sampler="region")
        yield dict(backbone="inhouse:dino", tok="vfmtok", gen="gpt", seed=seed, nq=64, sampler="grid")


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def build_sweep(root: Path) -> dict:
    """Write study folder `root` (sweep.yaml + mlflow.db + artifacts); return what was logged."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True)
    spec = {"name": "synth", "stages": list(S.CHAIN),
            "study_dir": str(root), "seeds": list(SEEDS)}
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.create_experiment("synth", artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="synth", tags={"vfmstudy.role": "sweep"}).info.run_id
    rng = np.random.default_rng(0)
    logged = []
    for i, c in enumerate(_cells()):
        b = c["backbone"]
        rfd = RFD[b] - 5 * (c["tok"] == "vfmae") + 8 * (c["nq"] == 16) + 3 * (c["sampler"] == "grid") + rng.normal(0, 1)
        fd = 1.5 * rfd + rng.normal(0, 1)
        final = {VFM_PROBE_ACC: VFM_PROBE[b] + rng.normal(0, 0.01), S.metric(S.VFM, S.KNN_ACC): VFM_PROBE[b] - 0.05,
                 RFD_REF: rfd, S.metric(S.TOK_EVAL, S.PSNR): 20 + 0.1 * (50 - rfd), S.metric(S.TOK_EVAL, S.PROBE_ACC): VFM_PROBE[b] - 0.1,
                 FD_REF: fd, FD_REF_GUIDED: 0.7 * fd + rng.normal(0, 0.5)}
        loss = list(np.linspace(2.0, 0.5, 5) + rng.uniform(0, 0.1, 5))
        loss[-1] = loss[-2] + 0.05  # the last value is not the best one
        curve = [v + (0.5 * c["seed"] if s >= 400 else 0) for s, v in zip(STEPS, CURVES[b])]
        tags = {"vfmstudy.role": "cell", "mlflow.parentRunId": parent, "vfmstudy.cell": f"cell{i}",
                "backbone": b, "family": BACKBONES[b], "seed": str(c["seed"]), "tokenizer_kind": c["tok"],
                "generator_kind": c["gen"], "num_queries": str(c["nq"]), "sampler": c["sampler"],
                "semantic": "true", "stage.vfm": f"vfm{b}", "stage.tokenizer": f"tok{i}"}
        params = {"seed": c["seed"], "vfm.name": b, "tokenizer.lr": 3e-4, "tokenizer.num_queries": c["nq"],
                  "tokenizer.semantic": True, "tokenizer.levels": [1, 2, 3], "generator.cfg_scale": 1.5}
        run = client.create_run(exp, run_name=f"cell{i}").info.run_id
        metrics = [Metric(k, float(v), 0, 0) for k, v in final.items()]
        metrics += [Metric("tokenizer/loss/model", float(v), 0, 10 * s) for s, v in enumerate(loss)]
        metrics += [Metric(CURVE, float(v), 0, s) for s, v in zip(STEPS, curve)]
        client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        colour = (40 * list(BACKBONES).index(b), 100 + 50 * (c["tok"] == "vfmae"), c["seed"] * 60)
        for name in ("reconstructions", "samples"):
            client.log_artifact(run, str(_png(root / f"{name}.png", colour)), "grids")
        client.set_terminated(run, "FINISHED")
        logged.append({**c, "run_id": run, "loss": loss, **final})
    client.set_terminated(parent, "FINISHED")
    return {"root": root, "spec": root / "sweep.yaml", "uri": f"sqlite:///{root / 'mlflow.db'}",
            "logged": pd.DataFrame(logged), "parent": parent}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return build_sweep(tmp_path_factory.mktemp("studies") / "synth")


@pytest.fixture(scope="module")
def runs(sweep):
    return results.load_sweep(sweep["spec"])


def _main(logged: pd.DataFrame) -> pd.DataFrame:
    return logged[(logged["nq"] == 64) & (logged["sampler"] == "region")]


# --------------------------------------------------------------------------- the real chain
def _ledger(micro_study: dict) -> dict[str, dict]:
    """Stage kind/id -> StageResult, read from the study's ledger (not from MLflow)."""
    stages = micro_study["root"] / "stages"
    return {f"{d.parent.name}/{d.name}": read_stage_result(d) for d in stages.glob("*/*")}


@pytest.fixture(scope="module")
def real_runs(micro_study):
    return results.load_sweep(micro_study["spec"])


def test_the_real_chain_runs_every_stage_within_90_cpu_s_and_tracks_each_cell(micro_study, real_runs):
    assert micro_study["code"] == 0
    took = f"micro study: {micro_study['cpu_seconds']:.1f} CPU s, {micro_study['seconds']:.1f} s wall"
    print(took)
    assert micro_study["cpu_seconds"] < 90, took
    ledger_results = _ledger(micro_study)
    assert sorted({k.split("/")[0] for k in ledger_results}) == sorted(S.CHAIN)
    assert len(real_runs) == 3 and set(real_runs[S.BACKBONE]) == set(REAL_BACKBONES)
    assert set(real_runs["pipeline"]) == {"vfmtok+gpt", "vfmae+dit"}
    assert (real_runs["status"] == "FINISHED").all() and (real_runs[S.SEED] == 0).all()
    for _, run in real_runs.iterrows():
        for kind in S.CHAIN:
            result = ledger_results[f"{kind}/{run[S.stage_tag(kind)]}"]
            assert result is not None and result.metrics
            for key, value in result.metrics.items():  # MLflow holds what the ledger holds
                assert run[S.metric(kind, key)] == pytest.approx(value, rel=1e-6, abs=1e-9), (kind, key)
            for tag in set(result.tags) & set(S.DESIGN):
                assert str(run[tag]).lower() == result.tags[tag].lower(), tag
    assert real_runs[list(S.DESIGN)].notna().all().all()


PROPERTIES = (S.SPATIAL_STRUCTURE, S.MUTUAL_KNN, S.CKNNA, S.RANKME)


def test_real_chain_measures_representation_properties_of_backbones_and_latents(micro_study, real_runs):
    """vfm and tok_eval log every property, in range; the vfm stage's values equal a recompute
    from the backbone it saved, the reference classifier and the val images, done here."""
    for kind in (S.VFM, S.TOK_EVAL):
        for key in PROPERTIES:
            values = real_runs[S.metric(kind, key)]
            assert values.notna().all() and np.isfinite(values.astype(float)).all(), (kind, key)
        assert (real_runs[S.metric(kind, S.MUTUAL_KNN)].between(0, 1)).all()
        assert (real_runs[S.metric(kind, S.CKNNA)].between(-1, 1)).all()
        assert (real_runs[S.metric(kind, S.RANKME)] >= 1).all()
    # the two backbones differ, so do their properties (the reference space is shared)
    per_backbone = real_runs.groupby(S.BACKBONE)[S.metric(S.VFM, S.RANKME)].first()
    assert per_backbone.nunique() == len(REAL_BACKBONES)
    _recompute_vfm_properties(micro_study, real_runs.iloc[0])


def _recompute_vfm_properties(micro_study, run) -> None:
    import torch
    from study.config import from_dict
    from study.data import DataConfig, build_dataset, to_tensor_images
    from study.metrics.reference import ReferenceClassifier
    from study.metrics.representation import property_report
    from study.pipeline.stages import SPEC
    from tests.real_chain import MICRO
    from tokenizer.vfm import VFMSpec, build_vfm

    stages = micro_study["root"] / "stages"
    vfm_result = read_stage_result(stages / S.VFM / run[S.stage_tag(S.VFM)])
    vfm = build_vfm(from_dict(VFMSpec, vfm_result.outputs[SPEC]))
    clf = ReferenceClassifier.load(stages / S.REFERENCE / run[S.stage_tag(S.REFERENCE)] / S.CLASSIFIER_FILE)
    data = MICRO["base"]
    images = build_dataset(from_dict(DataConfig, data["data"]), "val").images[:data["pretrain"]["eval"]["val_samples"]]
    with torch.no_grad():
        patches = vfm.final_tokens(to_tensor_images(images)).unflatten(1, vfm.grid)
    expected = property_report(patches, clf.features(images), k=10, far=6)
    for key, value in expected.items():
        assert run[S.metric(S.VFM, key)] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_real_tok_eval_saves_sampling_points_and_gen_eval_records_label_sampling(micro_study, real_runs, tmp_path):
    from analysis.figures_tokens import load_points, sampling_points_figure
    assert (real_runs[S.LABEL_SAMPLING] == S.EQUAL_PER_CLASS).all()
    points = {}
    for _, run in real_runs[real_runs[S.TOKENIZER_KIND] == "vfmtok"].iterrows():
        path = results.artifact(real_runs, run["run_id"], S.SAMPLING_POINTS, tmp_path / "dl")
        assert path is not None, run[S.BACKBONE]
        arrays = load_points(path)
        assert arrays["images"].dtype == np.uint8 and arrays["images"].shape[1:] == (32, 32, 3)
        assert arrays["locations"].shape[:3] == (len(arrays["images"]), 1, 16)
        np.testing.assert_allclose(arrays["weights"].sum((-2, -1)), 1, atol=1e-5)
        points[str(run[S.BACKBONE])] = path
    plot = sampling_points_figure(points, tmp_path)
    assert plot.missing is None and set(plot.numbers[S.BACKBONE]) == set(REAL_BACKBONES)


def test_gen_eval_with_random_label_sampling_draws_unequal_classes_and_tags_the_mode(micro_study, real_runs, tmp_path):
    """eval.label_sampling=random: as many labels, not equal per class for this seed, and the
    stage, rerun on the micro study's generator, tags its metrics `random`."""
    import torch
    from study.config import from_dict
    from study.pipeline.configs import EvalConfig, GenEvalStage
    from study.pipeline.stages import eval_labels, run_gen_eval
    from study.stages import StageContext, Upstream
    from tests.real_chain import MICRO

    base = MICRO["base"]
    ev = from_dict(EvalConfig, {**base["eval"], "label_sampling": S.RANDOM_LABELS})
    classes = base["data"]["num_classes"]
    drawn = torch.bincount(eval_labels(ev, classes), minlength=classes)
    assert drawn.sum() == classes * ev.samples_per_class and drawn.unique().numel() > 1, drawn
    equal = from_dict(EvalConfig, base["eval"])
    assert eval_labels(equal, classes).tolist() == [c for c in range(classes) for _ in range(equal.samples_per_class)]

    run = real_runs[real_runs["pipeline"] == "vfmtok+gpt"].iloc[0]
    stages = micro_study["root"] / "stages"
    inputs = {}
    for kind in (S.GENERATOR, S.TOKENIZER, S.REFERENCE):
        folder = stages / kind / run[S.stage_tag(kind)]
        inputs[kind] = Upstream(folder, read_stage_result(folder))
    cfg = from_dict(GenEvalStage, {"data": base["data"], "eval": {**base["eval"], "label_sampling": S.RANDOM_LABELS}})
    result = run_gen_eval(StageContext(cfg, tmp_path, inputs))
    assert result.tags[S.LABEL_SAMPLING] == S.RANDOM_LABELS and result.metrics


def test_real_histories_hold_the_generator_convergence_curve(real_runs):
    long = results.histories(real_runs, CURVE)
    assert set(long["run_id"]) == set(real_runs["run_id"]) and {S.BACKBONE, "pipeline"} <= set(long.columns)
    for _, curve in long.groupby("run_id"):
        assert len(curve) >= 2 and curve["step"].is_monotonic_increasing
    best = long.groupby("run_id")["value"].min()
    np.testing.assert_allclose(real_runs.set_index("run_id")["best." + CURVE].loc[best.index], best)


def test_real_image_grids_are_the_files_the_stages_wrote(micro_study, real_runs, tmp_path):
    for name, kind in ((S.SAMPLES_GRID, S.GEN_EVAL), (S.RECONSTRUCTIONS_GRID, S.TOK_EVAL)):
        plot = figures.image_grids(real_runs, tmp_path, name)
        assert plot.missing is None and len(plot.numbers) == 3
        for _, row in plot.numbers.iterrows():
            stage_id = real_runs.set_index("run_id").loc[row["run_id"], S.stage_tag(kind)]
            written = micro_study["root"] / "stages" / kind / stage_id / name.split("/", 1)[1]
            assert Path(row["file"]).read_bytes() == written.read_bytes()


def test_report_of_the_real_study_embeds_every_figure_it_drew(real_runs, tmp_path):
    path = report(real_runs, tmp_path / "report", ReportConfig(n_boot=50))
    page = html.unescape(path.read_text())
    drawn = sorted((tmp_path / "report" / "figures").glob("*.png"))
    assert {"backbones", "convergence", "guidance", "reconstructions", "samples", "token_usage",
            "sampling_points"} <= {p.stem for p in drawn}
    assert {base64.b64decode(i) for i in _images(page)} == {p.read_bytes() for p in drawn}
    assert "fewer than 3 backbones" in page  # two backbones: no rank correlation is claimed
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings[:4] == ["Answer", "Scale and how to read it", "Results", "Figures"]
    assert page.count("1 seed, no interval") == 1
    before_figures = page.split("<h2>Figures</h2>")[0]
    assert before_figures.count("<table") == 1  # the answer, the scale notes, then one table


# --------------------------------------------------------------------------- results (known answers)
def test_load_sweep_gives_one_typed_row_per_cell_run(runs, sweep):
    logged = sweep["logged"]
    assert len(runs) == len(logged) == 24 and sweep["parent"] not in set(runs["run_id"])
    assert str(runs["seed"].dtype) == "Int64" and str(runs["num_queries"].dtype) == "Int64"
    assert str(runs["semantic"].dtype) == "boolean" and runs["semantic"].all()
    assert str(runs["params.tokenizer.num_queries"].dtype) == "Int64"
    assert runs["params.tokenizer.lr"].dtype == float and runs["params.tokenizer.lr"].eq(3e-4).all()
    assert str(runs["params.tokenizer.semantic"].dtype) == "boolean"
    assert runs["params.tokenizer.levels"].eq("[1, 2, 3]").all()
    assert set(runs["pipeline"]) == {"vfmtok+gpt", "vfmae+dit"}
    assert runs["stage.vfm"].str.startswith("vfm").all()
    merged = runs.merge(logged, on="run_id", suffixes=("", "_logged"))
    for metric in (RFD_REF, FD_REF_GUIDED, VFM_PROBE_ACC):
        np.testing.assert_allclose(merged[metric], merged[f"{metric}_logged"])
    assert (merged["backbone"] == merged["backbone_logged"]).all() and (merged["seed"] == merged["seed_logged"]).all()
    # final = last logged value, best = min over the history for losses
    np.testing.assert_allclose(merged["tokenizer/loss/model"], [l[-1] for l in merged["loss"]])
    np.testing.assert_allclose(merged["best.tokenizer/loss/model"], [min(l) for l in merged["loss"]])
    np.testing.assert_allclose(merged["best." + CURVE], merged[CURVE])  # monotone curves
    assert (merged["best.tokenizer/loss/model"] < merged["tokenizer/loss/model"]).all()
    assert "best.vfm/probe_acc" in runs and "best.tok_eval/psnr" in runs


def test_a_tracking_uri_or_the_study_folder_load_the_same_runs(runs, sweep):
    by_uri = results.load_sweep(sweep["uri"], experiment="synth")
    by_dir = results.load_sweep(sweep["root"])
    for other in (by_uri, by_dir):
        assert sorted(other["run_id"]) == sorted(runs["run_id"])
    with pytest.raises(ValueError, match="experiment"):
        results.load_sweep(sweep["uri"])


def test_histories_are_long_with_design_columns(runs):
    long = results.histories(runs, CURVE)
    assert list(long.columns[:3]) == ["run_id", "step", "value"]
    assert len(long) == len(runs) * len(STEPS)
    none = long[(long["backbone"] == "inhouse:none") & (long["seed"] == 0)]
    assert none.groupby("run_id")["value"].apply(list).iloc[0] == CURVES["inhouse:none"]


def test_direction_rules():
    assert results.direction(FD_REF_GUIDED) == "min"
    assert results.direction("tokenizer/loss/model") == "min"
    assert results.direction("tok_eval/codebook_usage") == "max"
    assert results.direction(S.metric(S.VFM, S.KNN_ACC)) == "max"
    assert results.direction("tok_eval/something_else") is None


# --------------------------------------------------------------------------- statistics
def test_mean_ci_is_the_student_t_interval():
    x = [12.1, 13.5, 11.2]
    low, high = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    ci = stats.mean_ci(x)
    assert ci.mean == pytest.approx(np.mean(x)) and ci.half == pytest.approx((high - low) / 2)
    assert np.isnan(stats.mean_ci([3.0]).half)


def test_backbone_bars_plot_seed_intervals_of_the_logged_values(runs, sweep, tmp_path):
    plot = figures.backbone_bars(runs, tmp_path)
    assert plot.missing is None and plot.path.is_file()
    table = plot.numbers
    assert set(table["metric"]) == {TOK_QUALITY, FD_REF, S.metric(S.TOK_EVAL, S.PROBE_ACC)}
    main_runs = _main(sweep["logged"])
    for backbone in BACKBONES:
        values = main_runs[(main_runs["backbone"] == backbone) & (main_runs["tok"] == "vfmtok")][TOK_QUALITY]
        row = table[(table["metric"] == TOK_QUALITY) & (table["backbone"] == backbone)
                    & (table["series"] == "vfmtok+gpt")].iloc[0]
        low, high = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
        assert row["n"] == 3  # ablation cells are not pooled into the per-backbone bars
        assert row["mean"] == pytest.approx(values.mean()) and row["ci"] == pytest.approx((high - low) / 2)


def test_spearman_and_its_bootstrap_interval():
    x, y = [1, 2, 3, 4, 5], [10, 8, 9, 4, 2]
    c = stats.spearman_ci(x, y, n_boot=500)
    assert c.rho == pytest.approx(sps.spearmanr(x, y).statistic) and c.n == 5
    assert -1 <= c.low <= c.rho <= c.high <= 1
    assert stats.spearman_ci(x, y, n_boot=500) == c  # seeded
    perfect = stats.spearman_ci(x, [5, 4, 3, 2, 1], n_boot=200)
    assert [perfect.rho, perfect.low, perfect.high] == pytest.approx([-1, -1, -1])


def test_bootstrap_order_p_separates_clear_from_unclear_rankings():
    assert stats.bootstrap_order_p([10.0, 10.5, 11.0], [20.0, 20.5, 21.0]) == 0
    assert stats.bootstrap_order_p([10.0, 14.0, 12.0], [11.0, 13.0, 12.5]) > 0.3


def test_family_scatter_correlates_vfm_quality_with_tokenizer_quality(runs, sweep, tmp_path):
    plot = figures.family_scatter(runs, tmp_path, n_boot=300)
    assert plot.missing is None and plot.path.is_file()
    corr = plot.numbers["correlations"].set_index("kind")
    main_runs = _main(sweep["logged"])
    for kind in ("vfmtok", "vfmae"):
        means = main_runs[main_runs["tok"] == kind].groupby("backbone")[[VFM_PROBE_ACC, TOK_QUALITY]].mean()
        expected = sps.spearmanr(means[VFM_PROBE_ACC], means[TOK_QUALITY]).statistic
        assert corr.loc[kind, "rho"] == pytest.approx(expected) == pytest.approx(1)
        assert corr.loc[kind, "n"] == 3 and corr.loc[kind, "low"] <= corr.loc[kind, "high"]


def test_steps_to_reach_interpolates_and_speedup_is_the_ratio():
    assert stats.steps_to_reach(STEPS, CURVES["inhouse:none"], 40) == pytest.approx(300)
    assert stats.steps_to_reach(STEPS, CURVES["inhouse:ibot"], 40) == pytest.approx(100)
    assert stats.steps_to_reach(STEPS, CURVES["inhouse:none"], 10) is None
    curves = {b: (STEPS, v) for b, v in CURVES.items()}
    s = stats.speedup(curves, "inhouse:none", 40)
    assert (s.best, s.steps_baseline, s.steps_best, s.ratio) == ("inhouse:ibot", 300, 100, pytest.approx(3.0))
    s = stats.speedup(curves, "inhouse:none", 50)  # between logged points: 250 vs 83.3
    assert s.steps_baseline == pytest.approx(250) and s.ratio == pytest.approx(3.0)
    acc = stats.speedup({"a": ([0, 10, 20], [0.1, 0.5, 0.9]), "b": ([0, 10, 20], [0.1, 0.9, 0.95])}, "a",
                        lower_is_better=False)
    assert acc.level == 0.9 and acc.ratio == pytest.approx(20 / 10)


def test_convergence_figure_reports_the_speedup(runs, tmp_path):
    plot = figures.convergence(runs, tmp_path, baseline="inhouse:none", level=50, n_boot=200)
    assert plot.missing is None and plot.path.is_file()
    speeds = plot.numbers["speedups"].set_index("kind")
    assert set(speeds.index) == {"gpt", "dit"}
    for kind in ("gpt", "dit"):
        row = speeds.loc[kind]
        assert row["best"] == "inhouse:ibot" and row["speedup"] == pytest.approx(3.0)
        assert row["low"] == pytest.approx(3.0) and row["high"] == pytest.approx(3.0)  # seeds differ after step 300
    default = figures.convergence(runs, tmp_path, n_boot=50).numbers["speedups"]
    assert (default["baseline"] == "inhouse:none").all() and (default["speedup"] > 1).all()


def test_guidance_pairs_runs(runs, sweep, tmp_path):
    plot = figures.guidance(runs, tmp_path)
    assert plot.missing is None and len(plot.numbers) == 6
    main_runs = _main(sweep["logged"])
    g = main_runs[(main_runs["backbone"] == "inhouse:ibot") & (main_runs["gen"] == "dit")]
    row = plot.numbers[(plot.numbers["backbone"] == "inhouse:ibot") & (plot.numbers["series"] == "vfmae+dit")].iloc[0]
    assert row["gain_mean"] == pytest.approx((g[FD_REF] - g[FD_REF_GUIDED]).mean())


def test_ablations_use_only_groups_where_the_factor_varies(runs, tmp_path):
    nq = figures.ablation(runs, tmp_path, "num_queries")
    assert nq.missing is None and nq.path.is_file()
    assert set(nq.numbers["backbone"]) == {"inhouse:dino"} and set(nq.numbers["num_queries"]) == {16, 64}
    psnr = nq.numbers[nq.numbers["metric"] == TOK_QUALITY].set_index("num_queries")["mean"]
    assert psnr[16] < psnr[64]
    sampler = figures.ablation(runs, tmp_path, "sampler")
    assert sampler.missing is None and set(sampler.numbers["sampler"]) == {"region", "grid"}
    semantic = figures.ablation(runs, tmp_path, "semantic")
    assert semantic.path is None and semantic.missing == "no runs with semantic varying"


def test_image_grids_embed_one_artifact_per_backbone_and_pipeline(runs, tmp_path):
    plot = figures.image_grids(runs, tmp_path, "grids/samples.png")
    assert plot.missing is None and len(plot.numbers) == 6
    assert all(Image.open(f).size == (32, 32) for f in plot.numbers["file"])
    assert figures.image_grids(runs, tmp_path, "grids/nothing.png").missing == "no runs with an artifact grids/nothing.png"


def test_missing_data_is_said_not_drawn(runs, tmp_path):
    bare = runs[["run_id", "backbone", "seed"]].copy()
    bare.attrs = dict(runs.attrs)
    for plot in (figures.backbone_bars(bare, tmp_path), figures.family_scatter(bare, tmp_path),
                 figures.guidance(bare, tmp_path), figures.ablation(bare, tmp_path, "num_queries")):
        assert plot.path is None and plot.missing.startswith("no runs")
    assert figures.convergence(bare, tmp_path, metric="generator/none").missing.startswith("no runs with")


# --------------------------------------------------------------------------- report
def _images(page: str) -> list[str]:
    return re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_embeds_every_figure_and_writes_the_findings(runs, tmp_path):
    out = tmp_path / "report"
    (out / "assets").mkdir(parents=True)
    _png(out / "assets" / "mlflow_compare.png", (1, 2, 3))
    path = report(runs, out, ReportConfig(baseline="inhouse:none", level=50, n_boot=300))
    page = html.unescape(path.read_text())
    drawn = sorted((out / "figures").glob("*.png"))
    assert [p.stem for p in drawn] == ["ablation_num_queries", "ablation_sampler", "backbones", "convergence",
                                       "family_scatter", "guidance", "reconstructions", "samples"]
    images = _images(page)
    assert len(images) == len(drawn) + 1  # + the MLflow screenshot
    assert {base64.b64decode(i) for i in images} >= {p.read_bytes() for p in drawn}
    assert re.search(r"vfmtok\+gpt: inhouse:\w+ has the highest tok_eval/psnr \([\d.]+ ± [\d.]+, n = 3\); "
                     r"runner-up inhouse:\w+ .*the ranking of the top two is (not )?significant "
                     r"\(bootstrap p [<=] [\d.e-]+, Welch t-test p = [\d.e-]+\)\.", page)
    assert re.search(r"vfmae: vfm/probe_acc vs tok_eval/psnr across 3 backbones \(families: none, "
                     r"self-distillation, self-distillation\+latent-mim\): Spearman ρ = -?[\d.]+, 95 % bootstrap CI", page)
    assert "gpt: inhouse:ibot reaches generator/fd_ref = 50 (the configured level for inhouse:none) after 83 steps " \
           "vs 250 for inhouse:none: 3.00× faster" in page
    assert "Takeaway: Not drawn: no runs with semantic varying." in page
    md = (out / "report.md").read_text()
    assert "![Convergence of the generators](figures/convergence.png)" in md
    assert "3.00× faster" in md and "assets/mlflow_compare.png" in md


def test_report_cli_writes_into_the_study_folder(micro_study, capsys):
    assert main([str(micro_study["root"]), "--set", "n_boot=100"]) == 0
    html_path = micro_study["root"] / "report" / "report.html"
    assert str(html_path.resolve()) in capsys.readouterr().out
    drawn = sorted((micro_study["root"] / "report" / "figures").glob("*.png"))
    assert len(drawn) >= 4 and len(_images(html_path.read_text())) == len(drawn)
    assert main([str(micro_study["spec"]), "--set", "n_bot=1"]) == 2
    assert "did you mean 'n_boot'" in capsys.readouterr().err


def test_write_report_returns_the_html_path(micro_study, tmp_path):
    path = write_report(micro_study["spec"], tmp_path / "r", ReportConfig(n_boot=100))
    assert path == tmp_path / "r" / "report.html" and path.is_file()


# --------------------------------------------------------------------------- notebook, screenshot
def test_explore_notebook_executes_on_the_real_study(micro_study, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("VFMSTUDY_SWEEP", str(micro_study["spec"]))
    monkeypatch.setenv("VFMSTUDY_FIGURES", str(tmp_path))
    path = Path(__file__).parents[1] / "analysis" / "notebooks" / "explore_sweep.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "3 cell runs from micro" in text and "no runs with semantic varying" in text
    assert all(b in text for b in REAL_BACKBONES)
    assert (tmp_path / "convergence.png").is_file() and (tmp_path / "backbones.png").is_file()


def test_screenshot_of_a_local_page(tmp_path):
    from analysis.screenshot import screenshot

    # Chromium is installed by README's test command (study/cluster/setup.sh --dev): without it this fails
    (tmp_path / "index.html").write_text("<html><body style='background:#08f'><h1>vfmstudy</h1></body></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        png = screenshot(f"http://127.0.0.1:{server.server_port}/index.html", tmp_path / "shot.png", size=(640, 400))
    finally:
        server.shutdown()
    image = Image.open(png).convert("RGB")
    assert image.size == (640, 400)
    assert image.getpixel((600, 380)) == (0, 136, 255)  # the page's background, not a blank shot


def test_report_says_why_the_mlflow_screenshot_is_missing(runs, tmp_path, monkeypatch, capsys):
    from analysis import mlflow_ui

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no browser on PATH
    png = tmp_path / "report" / "assets" / "mlflow_compare.png"
    assert mlflow_ui.main([str(tmp_path), "--out", str(png)]) == 2
    assert "MLflow UI screenshot skipped: no Chromium on PATH" in capsys.readouterr().err
    monkeypatch.undo()
    page = report(runs, tmp_path / "report", ReportConfig(n_boot=100)).read_text()
    assert "MLflow UI screenshot skipped: no Chromium on PATH" in page
    assert "apt-get install -y chromium" in page


def test_analysis_never_imports_models_or_torch():
    import subprocess
    import sys

    code = ("import sys, analysis.report, analysis.screenshot; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'tokenizer', 'generators')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the answer (analysis.evidence)
def test_answer_names_the_best_backbone_when_the_objectives_differ(runs):
    from analysis import evidence
    ev = evidence.gather(runs, n_boot=200)
    assert 2 <= len(ev.answer) <= 3 and ev.answer[-1] == ev.verdict
    assert "on vfmtok+gpt inhouse:ibot is best" in ev.answer[0] and TOK_QUALITY in ev.answer[0]
    test = ev.tests[(ev.tests[figures.SERIES] == "vfmtok+gpt") & (ev.tests["metric"] == TOK_QUALITY)].iloc[0]
    groups = [runs[(runs["pipeline"] == "vfmtok+gpt") & (runs[S.BACKBONE] == b) & (runs[S.NUM_QUERIES] == 64)
                   & (runs[S.SAMPLER] == "region")][TOK_QUALITY] for b in sorted(BACKBONES)]
    assert test["kruskal_p"] == pytest.approx(sps.kruskal(*groups).pvalue)
    assert test["anova_p"] == pytest.approx(sps.f_oneway(*groups).pvalue)
    assert set(ev.table["seeds"]) == {3} and not ev.single_seed
    assert set(ev.predictors["property"]) == {VFM_PROBE_ACC, S.metric(S.VFM, S.KNN_ACC)}


def test_answer_says_not_distinguishable_when_the_backbones_do_not_differ(runs):
    from analysis import evidence
    null = runs.copy()
    null[TOK_QUALITY] = np.random.default_rng(0).normal(20, 1, len(null))  # no backbone effect
    ev = evidence.gather(null, n_boot=200)
    assert "the backbones are not distinguishable at this budget" in ev.answer[0]


def test_answer_of_a_single_seed_study_says_why_it_is_untested(real_runs):
    from analysis import evidence
    ev = evidence.gather(real_runs, n_boot=50)
    assert ev.tests.empty and ev.single_seed
    assert "untested: need more than one seed" in ev.answer[0]
    assert "too few" in ev.verdict or "No predictor can be resolved" in ev.verdict
