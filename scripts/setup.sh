#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (CPU build, from the local
# wheel where one is provided), fastavg and its test tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
# Pin torch: a bare `torch` (or an open range) with nothing installed pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==${FASTAVG_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
