"""The report's floors: a backbone's probe against chance in binomial standard errors, and the
reconstruction gain over the per-class mean image, checked against the formulas on a hand-made frame."""

import math

import pandas as pd

from analysis import evidence
from study import schema as S


def _runs(rows):
    return pd.DataFrame([{"pipeline": pipe, S.BACKBONE: b, S.SEED: seed, evidence.BACKBONE_PROBE: acc,
                          evidence.CLASSES: 10, "params.pretrain.eval.val_samples": 1000, "params.data.val_size": 400,
                          evidence.RECON_GAIN[0]: psnr, evidence.RECON_GAIN[1]: 11.5}
                         for pipe, b, seed, acc, psnr in rows])


def test_probe_margin_is_counted_in_binomial_standard_errors_of_chance_at_the_scored_size():
    runs = _runs([("vfmtok+gpt", "a", 0, 0.2, 16.0), ("vfmtok+gpt", "b", 0, 0.11, 13.0)])
    floors = evidence.floor_table(runs).set_index(S.BACKBONE)
    se = math.sqrt(0.1 * 0.9 / 400)  # the probe scores min(val_samples, val_size) images
    assert math.isclose(floors.loc["a", "probe_se"], se)
    assert math.isclose(floors.loc["a", "above_chance_se"], (0.2 - 0.1) / se)
    assert math.isclose(floors.loc["b", "above_chance_se"], (0.11 - 0.1) / se)  # 0.67 s.e.: not clear
    text = " ".join(evidence.floor_sentences(evidence.floor_table(runs), single_seed=True))
    assert "more than one standard error: a (0.2); not: b (0.11)" in text
    assert "cannot: which backbone is best" in text


def test_reconstruction_gain_is_the_mean_over_seeds_per_pipeline_and_names_the_blobs():
    runs = _runs([("vfmtok+gpt", "a", 0, 0.2, 16.0), ("vfmtok+gpt", "a", 1, 0.2, 15.0),
                  ("vfmae+dit", "a", 0, 0.2, 14.0), ("vfmtok+gpt", "b", 0, 0.3, 17.0),
                  ("vfmtok+gpt", "b", 1, 0.3, 17.5)])
    floors = evidence.floor_table(runs).set_index(S.BACKBONE)
    assert math.isclose(floors.loc["a", "psnr_gain_db (vfmtok+gpt)"], 15.5 - 11.5)
    assert math.isclose(floors.loc["b", "psnr_gain_db (vfmtok+gpt)"], 17.25 - 11.5)
    assert math.isclose(floors.loc["a", "psnr_gain_db (vfmae+dit)"], 14.0 - 11.5)
    text = evidence.floor_sentences(evidence.floor_table(runs), single_seed=False)
    assert any("vfmtok+gpt" in t and "all at least 4 dB" in t for t in text)
    assert any("vfmae+dit" in t and "below 4 dB" in t and ": a." in t for t in text)
    assert not any("cannot" in t for t in text)  # several seeds: the tests rank the backbones
