"""Do errors raised inside C++ extensions reach Python on this machine, or crash the process?

On the H200 image (torch 2.11, CXX=/opt/gcc/bin/g++, libstdc++ linked into the extension
statically) a failed TORCH_CHECK whose message formatted a number crashed the process with a
segfault (runs 6 and 7; csrc/error_text.h). Each probe runs in a child process, so a crash is
reported, not suffered:

    python bench/native_error_probe.py            # fastavg._C's error paths
    python bench/native_error_probe.py --minimal  # also a two-line extension built here, per C++ type

Prints one line per probe: what Python saw (an exception's type, or the signal that ended it).
Exits 1 if a fastavg._C probe saw anything but the exception it should raise.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile

# Each probe: (what Python should see, the code a child runs).
FASTAVG_PROBES = {
    "restore_ on the CPU, bad table (literal message)": (
        "raised RuntimeError",
        """
torch.ops.fastavg_native.restore_([torch.zeros(4)], torch.empty(0, dtype=torch.int64), torch.zeros(3))""",
    ),
    "update_ on the CPU, params of two dtypes (op name in the message)": (
        "raised RuntimeError",
        """
p = [torch.zeros(4), torch.zeros(4, dtype=torch.float64)]
torch.ops.fastavg_native.update_(p, torch.empty(0, dtype=torch.int64), [torch.zeros(8)], [0.5], [], [])""",
    ),
    "ring_mean_ on the CPU, bad count (numbers in the message)": (
        "raised ValueError",
        """
torch.ops.fastavg_native.ring_mean_(torch.empty(3), torch.zeros(3, 3), 0)""",
    ),
    "ring_mean_ on the GPU, bad count (numbers in the message)": (
        "raised ValueError",
        """
if not torch.cuda.is_available(): raise SystemExit('no GPU')
torch.ops.fastavg_native.ring_mean_(torch.empty(3, device='cuda'), torch.zeros(3, 3, device='cuda'), 0)""",
    ),
    "tuning hook refuses 100 threads (returns -1; Python raises)": (
        "raised ValueError",
        """
from fastavg.bench import native_launch
hooks = native_launch.tuning_hooks()
if hooks is None: raise SystemExit('no CUDA build')
assert hooks.set_block_threads(100) == -1
native_launch.set_block_threads(hooks, 100)""",
    ),
}

# What a probe that needs a GPU or the CUDA build answers without one.
SKIPPED = ("exit code 1: ['no GPU']", "exit code 1: ['no CUDA build']")

MINIMAL_SOURCE = """
#include <torch/extension.h>
#include <stdexcept>
void check_error(int64_t x) { TORCH_CHECK(x > 0, "TORCH_CHECK failed"); }
void check_value(int64_t x) { TORCH_CHECK_VALUE(x > 0, "TORCH_CHECK_VALUE failed"); }
void check_strings(int64_t x) { TORCH_CHECK(x > 0, "TORCH_CHECK", " failed"); }
void check_number(int64_t x) { TORCH_CHECK(x > 0, "TORCH_CHECK failed, x = ", x); }
void std_invalid(int64_t x) { if (x <= 0) throw std::invalid_argument("std::invalid_argument"); }
TORCH_LIBRARY(error_probe, m) {
  m.def("check_error(int x) -> ()", &check_error);
  m.def("check_value(int x) -> ()", &check_value);
  m.def("check_strings(int x) -> ()", &check_strings);
  m.def("check_number(int x) -> ()", &check_number);
  m.def("std_invalid(int x) -> ()", &std_invalid);
}
"""


def run_child(code: str, timeout: float = 60.0) -> str:
    """What a child process running ``code`` (torch imported) saw: an exception's type, or how it
    ended."""
    wrapped = (
        "import torch, fastavg\nfastavg.available_backends('cpu')\ntry:\n"
        + "".join(f"    {line}\n" for line in code.strip().splitlines())
        + "    print('PROBE: returned')\nexcept Exception as err:\n    print('PROBE: raised', type(err).__name__)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", wrapped], capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no answer in {timeout:.0f} s"
    said = [line.split("PROBE: ", 1)[1] for line in done.stdout.splitlines() if line.startswith("PROBE: ")]
    if said:
        return said[-1]
    if done.returncode < 0:
        return f"CRASHED ({signal.Signals(-done.returncode).name})"
    return f"exit code {done.returncode}: {(done.stdout + done.stderr).strip().splitlines()[-1:]}"


def minimal_probes() -> dict[str, str]:
    """Build a tiny op library with this machine's toolchain; one child per C++ exception type."""
    from torch.utils.cpp_extension import load_inline

    build = tempfile.mkdtemp(prefix="error_probe_")
    load_inline("error_probe", MINIMAL_SOURCE, is_python_module=False, build_directory=build, verbose=False)
    load = f"torch.ops.load_library(__import__('glob').glob({build!r} + '/error_probe*.so')[0])\n"
    return {
        f"minimal extension, {op}": run_child(load + f"torch.ops.error_probe.{op}(0)")
        for op in ("check_error", "check_value", "check_strings", "check_number", "std_invalid")
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minimal", action="store_true", help="also probe a minimal extension built here")
    args = parser.parse_args(argv)
    results = {name: run_child(code) for name, (_, code) in FASTAVG_PROBES.items()}
    wrong = [name for name, (expected, _) in FASTAVG_PROBES.items() if results[name] not in (expected, *SKIPPED)]
    if args.minimal:
        try:
            results.update(minimal_probes())
        except Exception as err:  # no compiler: say so, keep the other results
            results["minimal extension"] = f"not built: {err!r}"[:300]
    for name, seen in results.items():
        expected = FASTAVG_PROBES.get(name, ("",))[0]
        print(f"native error probe: {name}: {seen}" + (f" (expected: {expected})" if name in wrong else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
