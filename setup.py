"""Builds fastavg._C, the native backend (metadata lives in pyproject.toml).

- CPU kernels wherever a C++ compiler and torch are present; the CUDA kernels too where nvcc and a
  CUDA build of torch exist (TORCH_CUDA_ARCH_LIST respected; default sm_80 and sm_90).
- FASTAVG_NO_NATIVE=1 skips the extension. A failed build never fails the install: fastavg then
  runs on its torch and triton backends, and available_backends() says why native is missing.

Build with `pip install --no-build-isolation .` so the extension compiles against the torch installed.
"""

import os
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/register.cpp", "csrc/ops_cpu.cpp", "csrc/params_check.cpp"]
CUDA_SOURCES = ["csrc/cuda_binding.cpp", "csrc/ops_cuda.cu"]


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

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns instead of failing: the package works without fastavg._C."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # no compiler, a broken toolchain: install the Python package anyway
                print(f"fastavg: WARNING: the native extension was not built ({err}); "
                      "the torch and triton backends still work", file=sys.stderr)  # fmt: skip

    cxx = ["-O3", "-fopenmp", "-std=c++20"]  # OpenMP: at::parallel_for runs the CPU loops on every core
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTAVG_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extension = CUDAExtension(
            "fastavg._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension("fastavg._C", CPU_SOURCES, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
