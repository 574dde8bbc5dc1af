#!/usr/bin/env bash
# The main job: set up, then train a small model on the CPU and compare raw and averaged weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m fastavg.example "$@"
