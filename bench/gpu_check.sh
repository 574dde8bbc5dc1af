#!/usr/bin/env bash
# One call on a fresh GPU machine (torch, triton, nvcc, ninja present; no network; Python 3.12):
# install fastavg, run the whole test suite (the `cuda` tests run here, the rest checks this torch
# version), time the host side of a step on CUDA, and write logs and a JSON summary under $OUT.
# Budget: well inside 8 minutes (the suite takes under a minute on 2 CPU cores).
#   OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } >"$OUT/env.txt" 2>&1

# No network there: install without fetching anything; fall back to the source tree on the path.
if ! "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/install.log" 2>&1; then
  echo "pip install failed (see install.log); using the source tree" | tee -a "$OUT/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

timeout 300 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 60 "$PY" bench/step_overhead.py --device cuda 2>&1 | tee "$OUT/step_overhead.txt"

"$PY" - "$OUT" "$tests_rc" "$started" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
import torch
out, rc, started = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tests_exit_code": rc,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    summary["triton"] = triton.__version__
except ImportError:
    summary["triton"] = None
try:
    suite = ET.parse(f"{out}/tests.xml").getroot().iter("testsuite").__next__()
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cuda_cases = [c for c in suite.iter("testcase") if "cuda" in (c.get("classname", "") + c.get("name", ""))]
    counts["cuda_cases"] = len(cuda_cases)
    counts["cuda_passed"] = sum(1 for c in cuda_cases if not len(c))
    summary["tests"] = counts
except (OSError, ET.ParseError, StopIteration) as err:
    summary["tests"] = f"no junit report: {err}"
with open(f"{out}/step_overhead.txt") as f:
    summary["step_overhead_us"] = {line[:32].strip(): float(line[32:].split()[0]) for line in f if line.rstrip().endswith(" us")}
summary["wall_s"] = int(time.time()) - started
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
exit "$tests_rc"
