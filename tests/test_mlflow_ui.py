"""The MLflow UI serves a sweep's store: its REST API finds the sweep's cell runs (not the
sweep run), and the comparison page that the report screenshots names every one of them."""

import pytest
from PIL import Image

from analysis import results
from analysis.mlflow_ui import capture_compare, cell_runs
from analysis.screenshot import browser, compare_url, rendered_html


@pytest.mark.mlflow_server
@pytest.mark.timeout(600)
def test_ui_finds_the_cell_runs_and_its_compare_page_names_them(micro_study, mlflow_server, tmp_path):
    try:
        browser()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    runs = results.load_sweep(micro_study["spec"])
    experiment_id, found = cell_runs(mlflow_server.url)
    assert sorted(found) == sorted(runs["run_id"])
    page = rendered_html(compare_url(mlflow_server.url, experiment_id, found), wait_ms=8000)
    assert all(name in page for name in runs["run_name"]), "the compare page lacks a cell run's name"
    # the report's capture uses the server already running for the study folder
    path, shot_runs = capture_compare(micro_study["root"], tmp_path / "mlflow_compare.png")
    assert sorted(shot_runs) == sorted(found) and Image.open(path).size == (1400, 900)
