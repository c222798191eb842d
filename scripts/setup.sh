#!/usr/bin/env bash
# Set everything up on a fresh machine: the Fashion-MNIST Debian package (the built-in data)
# and a virtual environment with the pinned dependencies. Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=/usr/share/datasets/fashion-mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing the Debian package dataset-fashion-mnist (built-in demo and test data)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
    echo "       (or set VISMEM_FASHION_MNIST to a folder with the four idx .gz files), then run this again." >&2
    exit 1
  fi
fi

# Debian's chromium, for the headless UI test (driven by the Python package playwright; no
# browser is ever downloaded). VISMEM_SKIP_BROWSER=1 skips both the install and that test.
if [ ! -x /usr/bin/chromium ] && [ "${VISMEM_SKIP_BROWSER:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing the Debian package chromium (headless UI test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup: chromium is missing (the UI test needs it). Install it with: sudo apt-get install chromium" >&2
    echo "       (or set VISMEM_SKIP_BROWSER=1 to skip the browser test)" >&2
  fi
fi

# PostgreSQL and Redis, for the cluster profile (scripts/cluster.sh) and its tests: installed as
# root where missing; otherwise services.sh says what to run, and the cluster tests fail saying so.
bash scripts/services.sh install || true

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: vismem needs Python 3.11 (the torch 2.13.0 CPU build here is for 3.11); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

STAMP=.venv/.installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: creating .venv and installing pinned dependencies (first time: a few minutes)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # torch is pinned to the CPU build (2.13.0); torchvision is never installed.
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[test,peers]'; } \
      > .venv/pip.log 2>&1; then
    tail -n 30 .venv/pip.log >&2
    echo "setup: pip could not install the dependencies (full log: .venv/pip.log)" >&2
    exit 1
  fi
  .venv/bin/python -c 'import torch, faiss, duckdb, polars, transformers, dagster, vismem_assets' \
    || { echo "setup: the environment does not import cleanly (pip log: .venv/pip.log)" >&2; exit 1; }
  # numba compiles the IVF search kernel once, into its disk cache, so no search waits for it.
  .venv/bin/python -c 'from vismem_assets.ivf_kernel import compile_now; compile_now()' \
    || { echo "setup: the IVF search kernel does not compile (numba; pip log: .venv/pip.log)" >&2; exit 1; }
  touch "$STAMP"
fi

# The Dagster instance lives apart from the memory home, git-ignored.
DAGSTER_HOME_DIR=${DAGSTER_HOME:-$PWD/.dagster_home}
mkdir -p "$DAGSTER_HOME_DIR"
[ -f "$DAGSTER_HOME_DIR/dagster.yaml" ] || cp dagster_project/dagster.yaml "$DAGSTER_HOME_DIR/dagster.yaml"
