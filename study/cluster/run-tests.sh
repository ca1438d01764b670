#!/usr/bin/env bash
# README's test command and CI's entry point: set up (study/cluster/setup.sh --dev), run the
# test suite against the Slurm dev cluster, then stop the cluster again, quietly, so that
# pytest's summary is the last line and no daemon outlives the run.
#
#   bash study/cluster/run-tests.sh                          # full suite
#   bash study/cluster/run-tests.sh tests/test_cluster.py -k array   # extra args go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SLURM_DOWN_LOG="${TMPDIR:-/tmp}/vfmstudy-slurm-down.log"
trap 'bash study/cluster/slurm-down.sh >>"$SLURM_DOWN_LOG" 2>&1 || true' EXIT
bash study/cluster/setup.sh --dev

export VFMSTUDY_SLURM=1        # the Slurm tests FAIL (not skip) if the cluster is unreachable
export HF_HUB_OFFLINE=1
# two workers: much of the suite waits on subprocesses, Slurm and MLflow with a core idle; tests that
# share a session fixture or the cluster stay together on one worker (tests/conftest.py)
.venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
