"""The MLflow UI for a finished sweep: serve its store on 127.0.0.1, find the cell runs through
the REST API (what a browser or a script would see), and take a headless-Chromium screenshot of
the page that compares them, for the report's assets.

    python -m analysis.mlflow_ui STUDY_DIR [--out PNG]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

from analysis.screenshot import browser, compare_url, screenshot, skipped_note
from study import schema as S
from study.cluster.mlflow_server import MlflowServer


def rest(base_url: str, endpoint: str, payload: dict) -> dict:
    request = urllib.request.Request(f"{base_url}/api/2.0/mlflow/{endpoint}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def cell_runs(base_url: str) -> tuple[str, list[str]]:
    """(experiment id, cell run ids) of the sweep served at `base_url`, via the REST API."""
    experiments = rest(base_url, "experiments/search", {"max_results": 100}).get("experiments", [])
    for exp in experiments:
        found = rest(base_url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                                               "filter": "tags.`vfmstudy.role` = 'cell'"})
        runs = [r["info"]["run_id"] for r in found.get("runs", [])]
        if runs:
            return exp["experiment_id"], runs
    raise LookupError(f"no cell runs (tag vfmstudy.role = 'cell') in the store served at {base_url}")


def capture_compare(study_dir: str | Path, out_png: str | Path, max_runs: int = 12) -> tuple[Path, list[str]]:
    """Screenshot of the MLflow comparison page of the sweep in `study_dir` (its mlflow.db)."""
    study_dir = Path(study_dir)
    browser()  # before starting a server for nothing
    if not (study_dir / "mlflow.db").is_file():
        raise FileNotFoundError(f"{study_dir / 'mlflow.db'} not found (the sweep's default sqlite store)")
    with MlflowServer(study_dir) as server:
        url = server.url
        experiment_id, runs = cell_runs(url)
        path = screenshot(compare_url(url, experiment_id, runs[:max_runs]), out_png, wait_ms=8000)
    return path, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.mlflow_ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir")
    parser.add_argument("--out", help="PNG path (default: the study's report assets)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.study_dir) / S.REPORT_DIR / S.MLFLOW_SCREENSHOT)
    skipped_note(out).unlink(missing_ok=True)
    try:
        path, runs = capture_compare(args.study_dir, out)
    except (FileNotFoundError, LookupError, RuntimeError) as err:
        # the report says what it left out, and why, instead of silently missing a section
        out.parent.mkdir(parents=True, exist_ok=True)
        skipped_note(out).write_text(str(err))
        print(f"MLflow UI screenshot skipped: {err}", file=sys.stderr)
        return 2
    print(f"mlflow compare page of {len(runs)} cell runs: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
