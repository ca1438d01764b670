#!/usr/bin/env bash
# The one set-up path of this repository: README's commands and .ci/run all go through here.
#
#   bash study/cluster/setup.sh            # .venv with the project (quickstart)
#   bash study/cluster/setup.sh --dev      # ... plus the test extras, Chromium and the Slurm dev cluster
#
# Idempotent: the Python packages are reinstalled only when pyproject.toml or the pinned torch
# changed since the last run (a stamp in .venv), apt runs only for what is missing, and
# slurm-up.sh is a quick no-op when the cluster is already up.
#
# Root is needed for the system parts only: Chromium (apt) and the Slurm cluster. Without root,
# the quickstart set-up still installs the Python side and says what it left out; --dev fails,
# because the tests need both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
log() { echo "[setup] $*"; }

# ---------------------------------------------------------------- Python environment
if [ ! -x .venv/bin/python ] && ! python3 -m venv .venv; then
  # Debian ships venv's ensurepip separately
  [ "$(id -u)" = 0 ] || { echo "[setup] ERROR: python3 -m venv failed; as root: apt-get install -y python3-venv" >&2; exit 1; }
  rm -rf .venv
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  python3 -m venv .venv
fi
extras=$([ "$DEV" = 1 ] && echo "[dev]" || echo "")
stamp=".venv/.vfmstudy-setup"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_PINS $extras"
have="$(cat "$stamp" 2>/dev/null || true)"
# an install with the test extras also serves the quickstart
if [ "$have" != "$want" ] && [ "$have" != "$want[dev]" ]; then
  log "installing $TORCH_PINS and the project${extras} into .venv"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_PINS
  .venv/bin/python -m pip install -q -e ".${extras}"
  echo "$want" > "$stamp"
else
  log ".venv is up to date ($stamp)"
fi

# ---------------------------------------------------------------- system packages
# Headless Chromium screenshots the MLflow UI into the report (and a test checks it).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "apt-get install chromium"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  elif [ "$DEV" = 1 ]; then
    echo "[setup] ERROR: the tests need Chromium; install it as root: apt-get install -y chromium" >&2
    exit 1
  else
    log "Chromium not installed (needs root + apt-get install chromium): reports will say the MLflow UI screenshot was skipped"
  fi
fi

# ---------------------------------------------------------------- Slurm dev cluster (tests only)
if [ "$DEV" = 1 ]; then
  bash study/cluster/slurm-up.sh
fi
