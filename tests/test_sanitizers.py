"""fastavg's C++ under AddressSanitizer and UndefinedBehaviorSanitizer (tests/sanitizers.py).

The native CPU kernels (csrc/ops_cpu.cpp, params_check.cpp) and the CUDA kernels built for the host
(tests/cuda_host/emulate.cpp) are rebuilt sanitized. The tests that run them then run again, in a
child process, on those builds. The plain builds can read one element past a tensor or a local array
and still pass, whenever the value read does not change the result. Under the sanitizers the child
stops at that access and reports its source line. Slow: about four minutes on 2 cores."""

import subprocess
import sys

import pytest
import sanitizers
from cuda_emulator import EMULATOR_LIBRARY_VARIABLE, compile_library, cuda_include

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the child preloads the sanitizers' runtime (LD_PRELOAD)"),
]
PYTEST = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-s"]  # -s: the report reaches the parent
# The tests of the native ops on CPU tensors (the "native" parameter of the backend fixtures), and the
# bad input and random shapes of test_bad_input and test_properties, which reach them through
# backend="auto" (native, on CPU tensors).
NATIVE_TESTS = ["tests/test_ops.py", "tests/test_optimizer.py", "tests/test_state_dict.py", "tests/test_averaged.py",
                "tests/test_precision.py", "tests/test_formulas.py", "tests/test_backends.py", "tests/test_bad_input.py",
                "tests/test_properties.py", "-k", "native or test_bad_input or test_properties"]  # fmt: skip
# One wrong access of each kind the sanitizers are here for; `fine` makes none.
FAULTS = """
#include <vector>
extern "C" int past_a_tensor(int n) { std::vector<int> v(n, 1); return v.data()[n]; }
extern "C" int past_a_local_array(int n) { int a[4] = {1, 2, 3, 4}; return a[n]; }
extern "C" int past_a_vector_size(int n) { std::vector<int> v(n, 1); v.reserve(2 * n); return v[n]; }
extern "C" int fine(int n) { std::vector<int> v(n, 1); int a[4] = {1, 2, 3, 4}; return v[n - 1] + a[3]; }
"""


@pytest.fixture(scope="module")
def preload():
    found = sanitizers.runtime_preload()
    if found is None:
        pytest.skip("no C++ compiler with AddressSanitizer's runtime here")
    return found


def _assert_clean(child: subprocess.CompletedProcess, library) -> None:
    assert child.returncode == 0, sanitizers.report(child.stdout)
    assert f"{sanitizers.LOADED} {library}" in child.stdout, "the child did not run on the sanitized build"
    assert " passed" in child.stdout


@pytest.mark.parametrize(
    "call, expected",
    [
        ("past_a_tensor(7)", ["heap-buffer-overflow", "in past_a_tensor"]),
        ("past_a_local_array(4)", ["index 4 out of bounds", "in past_a_local_array"]),
        # Within its capacity, so no ASan error: _GLIBCXX_ASSERTIONS aborts (with no stack to name it).
        ("past_a_vector_size(7)", ["Assertion '__n < this->size()' failed"]),
        ("fine(7)", ["returned 5"]),
    ],
)
def test_the_child_stops_at_a_wrong_access_and_runs_torch_otherwise(tmp_path, preload, call, expected):
    """The harness itself, on a library with known faults: each is reported, where the report has a
    stack with its function (so a build, preload or option that stopped reporting fails here, not
    silently in the tests below). The child also raises and catches a C++ exception in torch first,
    which stops a child that preloads ASan without libstdc++ ("CHECK failed")."""
    source, library = tmp_path / "faults.cpp", tmp_path / "faults.so"
    source.write_text(FAULTS)
    built = subprocess.run([sanitizers.compiler(), *sanitizers.FLAGS, "-shared", "-fPIC", str(source), "-o", str(library)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr
    script = (
        "import ctypes, torch\n"
        "try:\n    torch.zeros(2) + torch.zeros(3)\nexcept RuntimeError:\n    pass\n"
        f"print('returned', ctypes.CDLL({str(library)!r}).{call})\n"
    )
    child = sanitizers.run_child(["-c", script], preload)
    assert (child.returncode == 0) == call.startswith("fine"), child.stdout[-3000:]
    assert all(text in child.stdout for text in expected), child.stdout[-3000:]


def test_native_cpu_kernels_under_sanitizers(tmp_path, preload):
    library = sanitizers.build_native(tmp_path)
    child = sanitizers.run_child(
        [*PYTEST, *NATIVE_TESTS], preload, **{sanitizers.NATIVE_LIBRARY_VARIABLE: str(library)}
    )
    _assert_clean(child, library)


def test_emulated_cuda_kernels_under_sanitizers(tmp_path, preload):
    if cuda_include() is None:
        pytest.skip("the emulator needs the CUDA headers (cuda_bf16.h)")
    library = compile_library(tmp_path, sanitizers.FLAGS)
    child = sanitizers.run_child(
        [*PYTEST, "tests/test_cuda_emulated.py"], preload, **{EMULATOR_LIBRARY_VARIABLE: str(library)}
    )
    _assert_clean(child, library)
