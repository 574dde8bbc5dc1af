"""Builds fastavg._C, the native backend (metadata lives in pyproject.toml).

- CPU kernels wherever a C++ compiler and torch are present; the CUDA kernels too where nvcc and a
  CUDA build of torch exist (TORCH_CUDA_ARCH_LIST respected; default: default_cuda_arch_list).
- FASTAVG_NO_NATIVE=1 skips the extension. A failed build never fails the install: fastavg then
  runs on its torch and triton backends, and available_backends() says why native is missing.

Build with `pip install --no-build-isolation .` so the extension compiles against the torch installed.
"""

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/register.cpp", "csrc/ops_cpu.cpp", "csrc/params_check.cpp"]
CUDA_SOURCES = ["csrc/cuda_binding.cpp", "csrc/ops_cuda.cu"]
ALWAYS_BUILT_ARCHS = ((8, 0), (9, 0))  # A100 and H100/H200, wherever the wheel is built


def default_cuda_arch_list(visible: list[tuple[int, int]], torch_archs: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST where the user gives none: sm_80, sm_90, the visible GPUs', and the newest's PTX.

    ``visible``: the compute capabilities of the GPUs on the building machine; ``torch_archs``:
    ``torch.cuda.get_arch_list()`` (what this torch, and so this nvcc, builds for).

    A fixed sm_80 and sm_90 left a machine with a newer GPU (a B200, 10.0) without kernels for it: every
    native update failed with "no kernel image". torch's own default, the visible GPUs only, would leave
    a wheel built on an H100 without kernels for an A100. A visible GPU newer than this torch knows
    is built for the newest it knows (torch clamps the same way), one older than it knows is left
    out (nvcc would refuse it and take the CPU kernels down with the build). The newest arch also goes
    in as PTX, which later GPUs compile when the extension loads.
    """
    known = sorted(
        {(int(a[3:]) // 10, int(a[3:]) % 10) for a in torch_archs if a.startswith("sm_") and a[3:].isdigit()}
    )
    archs = set(ALWAYS_BUILT_ARCHS)
    if known:
        archs |= {min(tuple(c), known[-1]) for c in visible if tuple(c) >= known[0]}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(archs)) + "+PTX"


def native_build():
    """(ext_modules, cmdclass) for fastavg._C, or nothing when it is not to be built."""
    if os.environ.get("FASTAVG_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        print(f"fastavg: torch is not importable ({err}); building without the native extension", file=sys.stderr)
        return [], {}

    cxx = ["-O3", "-fopenmp", "-std=c++20"]  # OpenMP: at::parallel_for runs the CPU loops on every core
    cpu_only = CppExtension("fastavg._C", CPU_SOURCES, extra_compile_args=cxx, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing: the package works without fastavg._C.

        A failed CUDA build (an nvcc of another CUDA version than torch's, which torch refuses; an arch
        that nvcc does not know) builds the CPU kernels alone: native still runs CPU tensors, and
        available_backends() says why it has no CUDA kernels."""

        def run(self):
            options = self.compiler, self.inplace  # run() replaces both while it runs: restored for a retry
            try:
                super().run()
            except Exception as err:  # no compiler, a broken toolchain: install the Python package anyway
                (extension,) = self.extensions
                if extension.sources == cpu_only.sources:
                    print(f"fastavg: WARNING: the native extension was not built ({err}); "
                          "the torch and triton backends still work", file=sys.stderr)  # fmt: skip
                    return
                print(f"fastavg: WARNING: the CUDA kernels were not built ({err}); building the CPU kernels alone",
                      file=sys.stderr)  # fmt: skip
                # The same Extension, made the CPU one: it keeps the build state setuptools gave it.
                vars(extension).update({k: v for k, v in vars(cpu_only).items() if not k.startswith("_")})
                self.compiler, self.inplace = options
                self.run()

    cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTAVG_NO_CUDA") != "1"
    if not with_cuda:
        return [cpu_only], cmdclass
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(visible, torch.cuda.get_arch_list())
    extension = CUDAExtension(
        "fastavg._C",
        CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], cmdclass


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__); tests import the above
    ext_modules, cmdclass = native_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
