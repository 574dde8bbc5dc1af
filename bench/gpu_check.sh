#!/usr/bin/env bash
# One call on a fresh GPU machine (torch, triton, nvcc, ninja present; no network; Python 3.12):
# install fastavg (building the CUDA extension), run the whole test suite (the `cuda` tests run the
# native CUDA kernels and real Triton compilation here), benchmark every backend on GPT-2 124M
# shapes against the stock paths and the measured copy bandwidth, time the host side of step(),
# and write everything under $OUT
# (8 files, the most the device tool returns). The whole script ran in 288 s on an H200 (2026-11-28,
# run 6), before more sweep rows, tests and a second probe (the sweep now likely takes its whole 90
# s). Stage limits add up to 11.6 minutes, plus the build (29 to 39 s for one arch on an H200), so
# every stage after the probes is cut to what is left of the call's limit (CALL_S, default 420: the
# timeout_s to give the device tool), and the summary is written whatever ran long. A 15-minute
# lease then has room for a second call.
#   OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
# Stages to leave out, for a short second call: SKIP="minimal-probe cuda-tests bench step-overhead sweep memcheck
# train-step cpu-tests". Memcheck alone, after a first call that had no time left for it (about 150 s:
# install, probes, 90 s of memcheck): CALL_S=180 SKIP="minimal-probe cuda-tests bench sweep step-overhead
# train-step cpu-tests".
SKIP=${SKIP:-}
skip() { [[ " $SKIP " == *" $1 "* ]] && echo "== $1 skipped (SKIP)"; }
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)
log="$OUT/env_and_install.txt"
# Each stage's seconds, as "stage NAME: N s" lines of the install log (the device tool returns 8 files,
# all taken), so that the next run can plan its timeouts; the summary keeps them as "stage_s".
stage_started=$started
stage_done() { echo "stage $1: $(( $(date +%s) - stage_started )) s" >>"$log"; stage_started=$(date +%s); }
# The call's limit (the device tool's timeout_s, 420 s: bench/NOTES.md, "Next run"). Each stage after
# the probes gets its own time limit or what is left of the call's, less 25 s for the summary, so
# that the summary is written whatever ran long: a stage with less than its minimum left is skipped,
# and says so. The stages run most valuable first.
CALL_S=${CALL_S:-420}
limit() {  # limit NAME SECONDS [MINIMUM=10]: prints this stage's time limit; fails when the stage must be skipped
  local left=$(( started + CALL_S - 25 - $(date +%s) ))
  if (( left < ${3:-10} )); then
    echo "== $1 skipped: $left s left of the call's $CALL_S" | tee -a "$log" >&2
    return 1
  fi
  echo $(( $2 < left ? $2 : left ))
}

{ nvidia-smi || true; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } >"$log" 2>&1
# No network there: install without fetching anything (this builds fastavg._C with its CUDA
# kernels, for the running GPU's architecture only, to keep the build short); fall back to the
# source tree on the path.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}
build_started=$(date +%s)
if ! "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >>"$log" 2>&1; then
  echo "pip install failed (see above); using the source tree" | tee -a "$log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "install + native build: $(( $(date +%s) - build_started )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" | tee -a "$log"
"$PY" -c "import fastavg; print('backends on cuda:', fastavg.available_backends('cuda'))" 2>&1 | tee -a "$log"
# A native error whose message held a number segfaulted on this image instead of raising (runs 2
# and 6; csrc/error_text.h): record the toolchain (which compiler, whether libstdc++ is a dynamic
# dependency) and probe each error path in a child process.
{ echo "CC=${CC:-} CXX=${CXX:-}"; g++ --version | head -1; c++ --version | head -1; nvcc --version | tail -2
  readelf -d fastavg/_C*.so 2>/dev/null | grep NEEDED; nm -D --defined-only fastavg/_C*.so 2>/dev/null | grep -c -E "__cxa_throw|__gxx_personality" ; } >>"$log" 2>&1
minimal=--minimal
skip minimal-probe && minimal=
stage_done install
timeout 150 "$PY" bench/native_error_probe.py $minimal 2>&1 | tee -a "$log"
stage_done probes
# LAWA alone through the TMA's bulk copies (set_bulk_rings) had not run on a GPU before the run
# after 2026-11-28 16:10: one small update through them first, in a child with a time limit. A hang
# or a wrong slot leaves them out of the cuda tests, the benchmark and the sweep
# (FASTAVG_SKIP_BULK=1), which would otherwise each spend their whole time limit on it.
timeout 30 "$PY" bench/bulk_probe.py 2>&1 | tee -a "$log"
bulk_rc=${PIPESTATUS[0]}
if [ "$bulk_rc" -ne 0 ]; then
  export FASTAVG_SKIP_BULK=1
  echo "bulk probe: exit $bulk_rc, the TMA's bulk copies left out of this run" | tee -a "$log"
fi
# LAWA alone as the driver's copies (set_driver_copies, one cudaMemcpyBatchAsync) had not run on a GPU
# before the run after 2026-11-28 21:46: the same probe of them. A failure leaves them out
# (FASTAVG_SKIP_DRIVER_COPIES=1) of the cuda tests, the benchmark and the sweep.
timeout 30 "$PY" bench/bulk_probe.py --driver-copies 2>&1 | tee -a "$log"
driver_rc=${PIPESTATUS[0]}
if [ "$driver_rc" -ne 0 ]; then
  export FASTAVG_SKIP_DRIVER_COPIES=1
  echo "driver copy probe: exit $driver_rc, the driver's copies left out of this run" | tee -a "$log"
fi
stage_done bulk-probe

# A fresh machine JIT-compiles every Triton specialisation the tests touch: spread them over
# workers when pytest-xdist is there (it is on the GPU image).
workers=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo "-n 8" || true)
# Most valuable first (a lease is short): the GPU tests, the benchmark, the kernel sweep (LAWA
# alone's question rows), the host costs, the per-op suite under memcheck (never run yet), the
# train-step overhead (its target met since run 6); then the CPU tests with what is left (they also
# run in CI).
tests_rc=1
if skip cuda-tests; then
  tests_rc=0  # left out on purpose (a second call for memcheck): the summary says "no junit report"
elif t=$(limit cuda-tests 150); then
  echo "== cuda tests" && timeout "$t" "$PY" -m pytest -q -p no:cacheprovider -m cuda $workers --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" | tail -15
  tests_rc=${PIPESTATUS[0]}
fi
stage_done cuda-tests
# Native also at other launch settings (rows "fastavg-native T=128 x4", "... T=128 x2 per row",
# "... T=128 bulk 8K"), so the default can change with the benchmark's numbers for it measured in
# this run: four vectors per pass, one block per table row instead of the persistent grid, and LAWA
# alone through the TMA's bulk copies in 8 and 32 KB stages and as the driver's copies (LAWA alone,
# at 89.8% of copy, is the row in question: NOTES.md); only where the build has the hooks, or the
# option would stop the whole benchmark. Runs 6 and 7 timed 256 and 128 threads: 128x2 became the default.
bulk_launch=$([ -z "${FASTAVG_SKIP_BULK:-}" ] && echo " 128x2/bulk 128x2/bulk32")
driver_launch=$([ -z "${FASTAVG_SKIP_DRIVER_COPIES:-}" ] && echo " 128x2/copy 128x2/copyce")
launches=$("$PY" -c "import torch; from fastavg.bench.native_launch import tuning_hooks
print('--native-launch ${NATIVE_LAUNCHES:-128x4 128x2/row 128x4/row$bulk_launch$driver_launch}' if torch.cuda.is_available() and tuning_hooks() else '')" 2>/dev/null)
if ! skip bench && t=$(limit bench 100 30); then
  echo "== bench ${launches:-(no native CUDA tuning hooks)}" && timeout "$t" "$PY" -m fastavg.bench --params gpt2 --repeats 20 $launches \
    --json "$OUT/bench_gpt2.json" --plot "$OUT/bench_gpt2.png" 2>&1 | tee -a "$OUT/tests.log"
fi
stage_done bench
# The kernels alone against the copy: Triton block sizes, native at 256 and 128 threads per block
# (LAWA and swap also at two and four vectors per thread per pass), every update over a table of
# finer rows, and LAWA alone (first) over several tables and grids, through the TMA's and the
# driver's copies, beside torch's copy and gather of the same bytes (into the same file as the host
# costs: the device tool returns 8 files at most).
if ! skip sweep && t=$(limit sweep 90 20); then
  echo "== kernel sweep" && timeout "$t" "$PY" bench/kernel_sweep.py ${FASTAVG_SKIP_BULK:+--bulk-chunks} ${FASTAVG_SKIP_DRIVER_COPIES:+--driver-copies} 2>&1 | tee -a "$OUT/step_overhead.txt"
fi
stage_done sweep
if ! skip step-overhead && t=$(limit step-overhead 45 20); then
  echo "== step overhead" && timeout "$t" "$PY" bench/step_overhead.py --device cuda --profile 2>&1 | tee -a "$OUT/step_overhead.txt"
fi
stage_done step-overhead
# The per-op suite's CUDA cases (native and Triton) under compute-sanitizer's memcheck: a read or
# write past a tensor on the device, or a misaligned vector, that the values checked do not show.
# CI runs the CPU kernels and a host build of the CUDA kernels under ASan and UBSan
# (tests/test_sanitizers.py); only this sees the device. Without torch's caching allocator each
# tensor is an allocation of its own, so an access past one is out of bounds. Exit 3: memcheck
# reported errors; 1: a test failed; 124: out of time. tests.log holds what it printed.
# The image has it (device/KINDS.md), but not necessarily on the PATH: also look beside nvcc and in
# CUDA's usual homes, and say so when there is none (a missing one read as "exit 127" before).
find_sanitizer() {
  command -v compute-sanitizer && return
  local nvcc nvcc_home="" home candidate
  # Without nvcc there is no home beside it (a made-up path would resolve to "." and search the cwd).
  nvcc=$(command -v nvcc) && nvcc_home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  for home in "${CUDA_HOME:-}" "$nvcc_home" /usr/local/cuda; do
    [ -n "$home" ] || continue
    for candidate in "$home/bin/compute-sanitizer" "$home/compute-sanitizer/compute-sanitizer"; do
      [ -x "$candidate" ] && echo "$candidate" && return
    done
  done
  return 1
}
if ! skip memcheck && t=$(limit memcheck 90 30); then
  if sanitizer=$(find_sanitizer); then
    echo "== memcheck ($sanitizer)" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$t" "$sanitizer" --tool memcheck --error-exitcode 3 \
      "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests/test_ops.py 2>&1 | tail -40 | tee -a "$OUT/tests.log"
    echo "memcheck of the per-op suite's CUDA cases: exit ${PIPESTATUS[0]}" | tee -a "$log"
  else
    echo "== memcheck skipped: no compute-sanitizer on the PATH, beside nvcc, in \$CUDA_HOME or /usr/local/cuda" | tee -a "$log"
  fi
fi
stage_done memcheck
# The issue's target: < 1% for gpt2 at the paper's per-GPU batch (16 x 1024 tokens, 8 accumulation steps).
if ! skip train-step && t=$(limit train-step 60 40); then
  echo "== train step" && timeout "$t" "$PY" -m fastavg.bench --train-step --repeats 5 --warmup 2 --json "$OUT/bench_train_step.json" 2>&1 | tee -a "$OUT/tests.log"
fi
stage_done train-step
# Only with their whole time left (CI runs these too, and the slow ones: the sanitizer builds).
if ! skip cpu-tests && t=$(limit cpu-tests 40 40); then
  echo "== cpu tests (torch $("$PY" -c 'import torch; print(torch.__version__)'))" && timeout "$t" "$PY" -m pytest -q -rf -p no:cacheprovider -m "not cuda and not slow" $workers 2>&1 | grep -E "^FAILED|passed|failed" | tee -a "$OUT/tests.log"
fi
stage_done cpu-tests

"$PY" - "$OUT" "$tests_rc" "$started" <<'PY'
import json, re, sys, time, xml.etree.ElementTree as ET
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
    suite = next(ET.parse(f"{out}/tests.xml").getroot().iter("testsuite"))
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cuda_cases = [c for c in suite.iter("testcase") if "cuda" in (c.get("classname", "") + c.get("name", ""))]
    counts["cuda_cases"] = len(cuda_cases)
    counts["cuda_passed"] = sum(1 for c in cuda_cases if not len(c))
    summary["tests"] = counts
    summary["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {child.tag} {(child.get('message') or '')[:200]}"
                             for c in suite.iter("testcase") for child in c if child.tag in ("failure", "error")]
except (OSError, ET.ParseError, StopIteration) as err:
    summary["tests"] = f"no junit report: {err}"
try:
    with open(f"{out}/step_overhead.txt") as f:
        summary["step_overhead_us"] = [line.rstrip() for line in f if line.rstrip().endswith(" us")]
    with open(f"{out}/step_overhead.txt") as f:
        summary["kernel_sweep"] = [line.rstrip() for line in f
                                   if line.rstrip().endswith(("%", "GB/s", "% copy")) or "WRONG" in line
                                   or " FAILED: " in line]
except OSError:
    summary["step_overhead_us"] = None
header, records = {}, []
try:
    header, *records = json.load(open(f"{out}/bench_gpt2.json"))
    summary["copy_gbps"] = header["copy_gbps"]
    summary["bench_complete"] = header.get("complete")  # false: stopped part way, these rows kept
    summary["fastavg_pct_of_copy"] = {f"{r['impl']} {r['update']} {r['dtype']}": round(r["pct_of_copy"], 1)
                                      for r in records if r["impl"].startswith("fastavg")}
    summary["fastavg_speedup_vs_stock"] = {f"{r['impl']} {r['update']} {r['dtype']}": round(r["speedup_vs_stock"], 2)
                                           for r in records if r["impl"].startswith("fastavg")}
    # Host time per call beside the median: near it, the kernels waited for the host.
    summary["fastavg_host_ms"] = {f"{r['impl']} {r['update']} {r['dtype']}": round(r["host_ms"], 3)
                                  for r in records if r["impl"].startswith("fastavg") and r.get("host_ms")}
except (OSError, ValueError, KeyError) as err:
    summary["bench"] = f"no bench results: {err}"
try:  # native at each --native-launch setting: which default puts every row highest
    if "native_launches" in header:
        from fastavg.bench.native_launch import pct_of_copy_by_setting
        summary["native_pct_of_copy_by_launch"] = pct_of_copy_by_setting(records, header["native_launches"],
                                                                          header["native_default"])
except Exception as err:  # the summary must be written whatever broke
    summary["native_pct_of_copy_by_launch"] = f"none: {err!r}"
try:
    _, *steps = json.load(open(f"{out}/bench_train_step.json"))
    summary["train_step_overhead_pct"] = {r["impl"]: round(r["overhead_pct"], 2) for r in steps}
except (OSError, ValueError, KeyError) as err:
    summary["train_step"] = f"no train-step results: {err}"
try:
    import fastavg
    summary["backends_cuda"] = fastavg.available_backends("cuda")
    install_log = [l.strip() for l in open(f"{out}/env_and_install.txt")]
    summary["build"] = [l for l in install_log if l.startswith("install + native build")]
    summary["native_error_probes"] = [l for l in install_log if l.startswith("native error probe")]
    summary["bulk_probe"] = [l for l in install_log if l.startswith(("bulk probe", "driver copy probe"))]
    summary["memcheck"] = [l for l in install_log if l.startswith(("memcheck", "== memcheck skipped"))]
    # Only our own lines: the log also holds pip's and the compiler's output.
    stages = (re.fullmatch(r"stage ([\w-]+): (\d+) s", l) for l in install_log)
    summary["stage_s"] = {m[1]: int(m[2]) for m in stages if m}
except Exception as err:  # the summary must be written whatever broke
    summary["backends_cuda"] = f"fastavg did not import: {err}"
summary["wall_s"] = int(time.time()) - started
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
exit "$tests_rc"
