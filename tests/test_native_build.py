"""The native extension's build: every CUDA source compiles here (nvcc for sm_80/sm_90, the binding
against this CPU build of torch), the update kernel moves 16-byte vectors, and a machine without a
working compiler still installs fastavg and says why "native" is missing."""

import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import torch.utils.cpp_extension as cpp_extension
from helpers import torch_version

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
nvcc = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_and_vectorise(tmp_path, arch):
    ptx = tmp_path / f"ops_cuda_sm{arch}.ptx"
    command = [
        nvcc,
        "-std=c++17",
        "-O3",
        "-ptx",
        f"-arch=sm_{arch}",
        "-I",
        str(CSRC),
        str(CSRC / "ops_cuda.cu"),
        "-o",
        str(ptx),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = ptx.read_text()
    # bf16 parameters, fp32 averages: the aligned path loads and stores 16-byte vectors, for EMA
    # alone (1 average, 0 rings), LAWA alone (0, 1; and unrolled, set_unroll) and EMA+SWA+LAWA (2, 1).
    entries = [m.start() for m in re.finditer(r"\.entry ", text)] + [len(text)]
    for averages, rings, unroll in [(1, 0, 1), (0, 1, 1), (0, 1, 2), (2, 1, 1)]:
        name = rf"update_kernelI13__nv_bfloat16fLi{averages}ELi{rings}ELi{unroll}EE"
        starts = [i for i in entries[:-1] if re.match(rf"\.entry \S*{name}", text[i:])]
        assert starts, f"update_kernel<bf16, float, {averages}, {rings}, {unroll}> not found in the PTX"
        body = text[starts[0] : min(e for e in entries if e > starts[0])]
        assert re.search(r"ld\.global\.v4\.(b32|u32|f32)", body), f"no 16-byte vector loads in {name}"
        assert re.search(r"st\.global\.v4\.(b32|u32|f32)", body), f"no 16-byte vector stores in {name}"


@needs_nvcc
def test_cuda_object_builds_for_both_archs(tmp_path):
    command = [nvcc, "-std=c++17", "-O3", "-c", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
               "arch=compute_90,code=sm_90", "-I", str(CSRC), str(CSRC / "ops_cuda.cu"), "-o", str(tmp_path / "k.o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cuda_binding_compiles_against_this_torch(tmp_path):
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    if torch_version() < (2, 11):  # the stream then comes from c10/cuda, which includes CUDA's headers
        cuda_include = os.path.join(cpp_extension.CUDA_HOME or "/no-cuda", "include")
        if not os.path.exists(os.path.join(cuda_include, "cuda_runtime_api.h")):
            pytest.skip("torch < 2.11: cuda_binding.cpp needs CUDA's headers, and there are none here")
        includes.append(f"-I{cuda_include}")
    command = [compiler, "-std=c++20", "-fPIC", "-O1", "-c", str(CSRC / "cuda_binding.cpp"), "-o", str(tmp_path / "b.o"),
               *includes, f"-I{CSRC}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_extension_sources_have_distinct_object_names():
    # ninja refuses two sources that compile to one object (ops_cuda.cpp and ops_cuda.cu did, on the GPU machine).
    stems = [p.stem for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")]
    assert len(stems) == len(set(stems)), sorted(stems)


def _check_calls(source: str):
    """Each TORCH_CHECK* call in C++ ``source``: (macro, its arguments split at top-level commas)."""
    for match in re.finditer(r"\b(TORCH_CHECK\w*)\(", source):
        depth, quote, args, start, i = 1, None, [], match.end(), match.end()
        while depth:
            c = source[i]
            if quote:
                quote = None if c == quote and source[i - 1] != "\\" else quote
            elif c in "\"'":
                quote = c
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1:
                args.append(source[start:i])
                start = i + 1
            i += 1
        yield match[1], [*args, source[start : i - 1]]


def test_error_messages_are_one_argument_each():
    """Every TORCH_CHECK in csrc/ passes one message argument (a literal, or text(...) from
    error_text.h): with more, torch formats them through std::ostringstream in fastavg._C's own
    code, and a number formatted that way segfaulted where libstdc++ is linked in statically (the
    H200 image, runs 6 to 8). Nothing here crashes, so only the source can be checked."""
    calls = [(path.name, macro, args) for path in sorted(CSRC.glob("*.c*")) for macro, args in
             _check_calls(path.read_text())]  # fmt: skip
    assert len(calls) > 20  # the parser found them
    assert [(name, macro, args) for name, macro, args in calls if len(args) > 2] == []
    assert list(_check_calls('TORCH_CHECK(f(a, b), text("x, y", n));')) == [
        ("TORCH_CHECK", ["f(a, b)", ' text("x, y", n)'])
    ]


TORCH_CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.11+cu130's


@pytest.mark.parametrize(
    "visible, torch_archs, expected",
    [
        ([], [], "8.0;9.0+PTX"),  # no GPU where it is built: torch.cuda.get_arch_list() is empty then
        ([(9, 0)], TORCH_CU130_ARCHS, "8.0;9.0+PTX"),
        ([(8, 6), (8, 6)], TORCH_CU130_ARCHS, "8.0;8.6;9.0+PTX"),
        ([(10, 0)], TORCH_CU130_ARCHS, "8.0;9.0;10.0+PTX"),  # numerically: "10.0" sorts before "8.0" as text
        ([(12, 0), (9, 0)], TORCH_CU130_ARCHS, "8.0;9.0;12.0+PTX"),
        ([(13, 0)], TORCH_CU130_ARCHS, "8.0;9.0;12.0+PTX"),  # newer than this torch knows: its newest
        ([(7, 0)], TORCH_CU130_ARCHS, "8.0;9.0+PTX"),  # older than it knows: nvcc would refuse it
        ([(7, 5)], TORCH_CU130_ARCHS + ["sm_90a"], "7.5;8.0;9.0+PTX"),
    ],
)
def test_default_cuda_arch_list_covers_the_gpus_here_and_later_ones(visible, torch_archs, expected):
    """setup.py's TORCH_CUDA_ARCH_LIST when none is set. It was a fixed "8.0;9.0": a B200 (10.0) that
    built fastavg got no kernels for itself, and every native update there failed."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")  # defines, does not build
    assert setup["default_cuda_arch_list"](visible, torch_archs) == expected


def test_sdist_carries_every_native_source(tmp_path):
    """An install from an sdist builds _C from csrc/: its headers must be in it (MANIFEST.in)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.so", "runs", "*.egg-info"))
    command = [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")]
    env = dict(os.environ, FASTAVG_NO_NATIVE="1")
    result = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {pathlib.PurePosixPath(name).name for name in tar.getnames() if "/csrc/" in name}
    assert shipped == {p.name for p in CSRC.iterdir() if p.is_file()}


def test_install_without_a_working_compiler_succeeds(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.so", "runs", "__pycache__")
    )
    env = dict(os.environ, CXX="/bin/false", CC="/bin/false")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "-w",
        str(tmp_path / "w"),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list((tmp_path / "w").glob("fastavg-*.whl"))
    assert wheels, result.stdout[-2000:]
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fastavg/__init__.py" in names and not any(n.startswith("fastavg/_C") for n in names)


def test_failed_cuda_build_still_builds_the_cpu_kernels(tmp_path):
    """A CUDA build that fails (here: torch made to look like a CUDA build, with no nvcc where CUDA_HOME
    points) builds the CPU kernels alone, in place, instead of leaving native out on every device."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.so", "runs", "__pycache__")
    )
    build = (
        "import runpy, sys, torch, torch.utils.cpp_extension as cpp_extension\n"
        "torch.version.cuda, cpp_extension.CUDA_HOME = '13.0', '/no-such-cuda'\n"
        "sys.argv = ['setup.py', 'build_ext', '--inplace']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FASTAVG_NO_NATIVE")}
    result = subprocess.run(
        [sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the CUDA kernels were not built" in result.stderr and "building the CPU kernels alone" in result.stderr
    assert "the native extension was not built" not in result.stderr
    check = (
        "import fastavg, torch\n"
        "from fastavg import _C\n"  # the editable install's finder would find the checkout's _C otherwise
        "assert _C.__file__.startswith(sys.argv[1]), _C.__file__\n"
        "assert fastavg.available_backends('cpu')['native'] is None\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('fastavg_native::update_', 'CUDA')\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + check, str(source)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_missing_extension_is_explained():
    code = (
        "import sys; sys.modules['fastavg._C'] = None\n"  # as if the build had been skipped
        "import fastavg; why = fastavg.available_backends('cpu')['native']\n"
        "assert why and 'fastavg._C' in why and 'pip install' in why, why\n"
        "assert fastavg.available_backends('cpu')['torch'] is None\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
