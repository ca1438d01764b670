"""The MLflow UI serves a sweep's store on 127.0.0.1: its REST API finds the cell runs, and a
headless-Chromium screenshot of their comparison page lands in the report's assets."""

import numpy as np
import pytest
from PIL import Image

from analysis.mlflow_ui import capture_compare


@pytest.mark.mlflow_server
@pytest.mark.timeout(600)
def test_ui_server_finds_cell_runs_and_screenshots_the_comparison(tmp_path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("ui", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, tags={"vfmstudy.role": "sweep"}).info.run_id
    cells = []
    for backbone, fd in (("inhouse:dino", 12.5), ("inhouse:mae", 17.25)):
        run = client.create_run(exp, tags={"vfmstudy.role": "cell", "mlflow.parentRunId": parent,
                                           "backbone": backbone})
        client.log_metric(run.info.run_id, "gen_eval/fd_ref", fd)
        cells.append(run.info.run_id)
    path, found = capture_compare(tmp_path, tmp_path / "report" / "assets" / "mlflow_compare.png")
    assert sorted(found) == sorted(cells)  # the parent is not a cell
    image = Image.open(path)
    assert image.size == (1400, 900)
    assert len(np.unique(np.asarray(image.convert("L")))) > 20  # a rendered page, not a blank frame
