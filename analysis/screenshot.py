"""A PNG of a web page (the MLflow UI's run comparison) with headless Chromium, for the report.

    screenshot("http://127.0.0.1:5000/#/compare-runs?runs=[...]&experiments=[...]",
               "report/assets/mlflow_compare.png")

Needs Debian's chromium (`apt-get install -y chromium`); nothing is fetched from outside.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no Chromium on PATH (none of {', '.join(BROWSERS)}; as root: apt-get install -y chromium)")


def skipped_note(png: str | Path) -> Path:
    """The text file next to a screenshot's path that says why it was not taken."""
    return Path(png).with_suffix(".skipped.txt")


def _headless(url: str, action: list[str], size: tuple[int, int], wait_ms: int,
              timeout_s: float) -> subprocess.CompletedProcess:
    """Chromium on `url` without a window; `wait_ms` of virtual time lets a JavaScript app (the
    MLflow UI is one) draw before `action` (--screenshot=..., --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="vfmstudy-chromium-") as profile:
        cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *action, f"--window-size={size[0]},{size[1]}",
               "--hide-scrollbars", f"--virtual-time-budget={wait_ms}", url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def screenshot(url: str, path: str | Path, size: tuple[int, int] = (1400, 900), wait_ms: int = 5000,
               timeout_s: float = 120) -> Path:
    """Render `url` at `size` (width, height) and save a PNG to `path`."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale file must not pass for this shot
    done = _headless(url, [f"--screenshot={path}"], size, wait_ms, timeout_s)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return path


def rendered_html(url: str, size: tuple[int, int] = (1400, 900), wait_ms: int = 5000, timeout_s: float = 120) -> str:
    """The page's DOM after its scripts ran: what the screenshot shows, as text to search."""
    done = _headless(url, ["--dump-dom"], size, wait_ms, timeout_s)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"chromium dumped no page (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI page that compares `run_ids` side by side (params, metrics, plots)."""
    runs = ",".join(f'"{r}"' for r in run_ids)
    return f"{base_url.rstrip('/')}/#/compare-runs?runs=[{runs}]&experiments=[\"{experiment_id}\"]"
