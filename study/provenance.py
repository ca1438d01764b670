"""Where a study's numbers came from: the command that ran its sweep, the commit of the code
(and whether tracked files differed from it), when that run started and the host's CPU count.

The sweep controller appends one record to the study's manifest each time it starts work
(a re-run that finds everything cached adds none), so a study finished over several runs
keeps each run's commit; the report and the results page state the latest.  Standard
library only: the engine and `analysis/` both read it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from study import schema as S

CODE = Path(__file__).resolve().parent  # the study package: its repository is the code's


@dataclass(frozen=True)
class Provenance:
    command: str
    commit: Optional[str]  # HEAD of the repository holding the study package; None outside a checkout
    dirty: Optional[bool]  # tracked files differ from that commit (untracked files do not count)
    started: Optional[str]  # UTC, ISO 8601, to the second; None only in a record given by hand
    cpu_count: Optional[int]


def sweep_command(argv: list[str]) -> str:
    """The command line of `python -m study.sweep` given these arguments, quoted for a shell."""
    return shlex.join(["python", "-m", "study.sweep", *argv])


def code_version(path: Path = CODE) -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding `path`; (None, None) when there is none."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return None, None
    return commit, bool(changed)


def current(command: str, path: Path = CODE) -> Provenance:
    commit, dirty = code_version(path)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Provenance(command, commit, dirty, started, os.cpu_count())


def record(manifest: dict, run: Provenance) -> None:
    manifest.setdefault(S.MANIFEST_PROVENANCE, []).append(dataclasses.asdict(run))


def recorded(manifest: dict) -> list[Provenance]:
    """Every run recorded in a manifest, oldest first."""
    return [Provenance(**entry) for entry in manifest.get(S.MANIFEST_PROVENANCE, [])]
