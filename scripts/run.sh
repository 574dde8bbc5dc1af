#!/usr/bin/env bash
# The main job: set up, then train GPT-2 `nano` on the Python standard library's source at the
# paper's high learning rate, comparing the raw weights with EMA, SWA and LAWA (about 4.5 minutes on
# 2 CPU cores). Extra arguments go to fastavg-train (e.g. --preset gpt2 --data owt/ on a GPU).
# With none it is the fixed demo and starts afresh each time, replacing runs/nano; with any, an
# earlier run in the output folder is refused unless they say --resume or --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- --overwrite
fi
exec .venv/bin/python -m fastavg.train --out runs/nano "$@"
