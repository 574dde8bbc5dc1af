"""Builds of fastavg's C++ under AddressSanitizer and UndefinedBehaviorSanitizer, and a child
Python that runs tests on them (test_sanitizers.py).

The child preloads the sanitizers' runtime: the interpreter is not built with it, and ASan must
come before every other library. libstdc++ is preloaded beside it because ASan intercepts
__cxa_throw when it starts, and a python binary that does not link libstdc++ leaves it nothing to
intercept: the first C++ exception (a TORCH_CHECK) then stops the process with "CHECK failed".
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# -O1 -g: reports with source lines at a bearable speed. No recovery: the first report ends the
# child with a failing exit, so no error scrolls past. _GLIBCXX_ASSERTIONS checks std::vector's
# operator[] (an index past size() but within capacity() is no ASan error).
FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-D_GLIBCXX_ASSERTIONS")  # fmt: skip
CHILD_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",  # the interpreter and torch leave allocations at exit
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
NATIVE_LIBRARY_VARIABLE = "FASTAVG_TEST_NATIVE_LIBRARY"
LOADED = "fastavg: sanitized library loaded:"


def compiler() -> str | None:
    """The host C++ compiler (CXX, else g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def runtime_preload() -> str | None:
    """LD_PRELOAD for a child running sanitized libraries (ASan's runtime, then libstdc++), or None
    where the compiler has no ASan runtime (it then prints the bare name back)."""
    cxx = compiler()
    if cxx is None:
        return None
    paths = []
    for name in ("libasan.so", "libstdc++.so"):
        found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(found):
            return None
        paths.append(found)
    return " ".join(paths)


def build_native(out_dir: Path) -> Path:
    """fastavg._C's CPU kernels (setup.py's CPU_SOURCES, with its -std=c++20 -fopenmp) built sanitized
    into ``out_dir``: the sources compiled side by side, then linked. RuntimeError with the compiler's words."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    sources = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")["CPU_SOURCES"]  # defines only
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    common = [compiler(), "-std=c++20", "-fopenmp", "-fPIC", *FLAGS, abi, "-DTORCH_API_INCLUDE_EXTENSION_H"]
    objects = [out_dir / (Path(source).stem + ".o") for source in sources]
    compiles = [
        subprocess.Popen(
            [*common, *includes, "-c", str(ROOT / source), "-o", str(obj)], stderr=subprocess.PIPE, text=True
        )
        for source, obj in zip(sources, objects, strict=True)
    ]
    errors = [stderr for c in compiles for stderr in [c.communicate(timeout=600)[1]] if c.returncode]
    if errors:
        raise RuntimeError("sanitized build of fastavg._C failed:\n" + errors[0][-3000:])
    library = out_dir / "_C.so"
    search = [f"-L{p}" for p in cpp_extension.library_paths()]
    libraries = [*search, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]  # what torch's own extensions link
    link = subprocess.run([*common, "-shared", *map(str, objects), *libraries, "-o", str(library)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if link.returncode:
        raise RuntimeError("sanitized link of fastavg._C failed:\n" + link.stderr[-3000:])
    return library


def use_native_library_from_environment() -> None:
    """In the child: make the library FASTAVG_TEST_NATIVE_LIBRARY names fastavg._C, before fastavg
    imports its own (conftest.py calls this first). Nothing where the variable is unset."""
    path = os.environ.get(NATIVE_LIBRARY_VARIABLE)
    if not path:
        return
    import torch  # noqa: F401  (loads libc10 and libtorch, which the library links to by name only)

    spec = importlib.util.spec_from_file_location("fastavg._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastavg._C"] = module
    spec.loader.exec_module(module)
    print(f"{LOADED} {path}", file=sys.stderr)  # the parent checks that the child ran this build


def run_child(arguments: list[str], preload: str, **variables: str) -> subprocess.CompletedProcess:
    """``python arguments`` in ROOT with the sanitizers' runtime preloaded and ``variables`` set;
    stdout and stderr together in ``.stdout``."""
    env = {**os.environ, **CHILD_OPTIONS, **variables, "LD_PRELOAD": preload}
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)  # fmt: skip


def report(output: str) -> str:
    """The sanitizer's report in a child's output (from its first line), else the output's tail."""
    starts = [i for i in (output.find("==ERROR: "), output.find("runtime error: ")) if i >= 0]
    start = output.rfind("\n", 0, min(starts)) + 1 if starts else max(0, len(output) - 4000)
    return output[start : start + 6000]
