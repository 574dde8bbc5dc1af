#!/usr/bin/env bash
# The tests: set up, then run the whole suite (tests marked `cuda` skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
