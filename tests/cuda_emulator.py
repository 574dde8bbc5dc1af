"""fastavg's CUDA kernels built for the host (tests/cuda_host/emulate.cpp) and wrapped as a
backend whose ops launch them the way csrc/cuda_binding.cpp and csrc/ops_cuda.cu do: same launch
splitting, alignment flags, dtype codes and balanced grid. The table holds host addresses, so the
kernels walk CPU tensors; test_cuda_emulated.py runs the per-op suite on them."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sanitizers
import torch

from fastavg.ops import Backend, update_launches
from fastavg.table import build_table

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cuda_host" / "emulate.cpp"
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # csrc/ops_cuda.h's Dtype
MAX_AVERAGES, MAX_RINGS = 4, 2  # csrc/ops_cuda.h
EMULATOR_LIBRARY_VARIABLE = "FASTAVG_TEST_EMULATOR_LIBRARY"
THREADS = 256  # csrc/cuda_kernels.cuh's kThreads: ring_mean_'s always, the most of the others
DEFAULT_THREADS, DEFAULT_UNROLL = 128, 2  # ops_cuda.cu's defaults for update and swap launches


def cuda_include() -> Path | None:
    """Where cuda_fp16.h and cuda_bf16.h are (nvcc's toolkit), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_bf16.h").exists():
            return Path(home) / "include"
    return None


def build(out_dir: Path) -> ctypes.CDLL:
    """Compile the emulator with the host compiler; raises RuntimeError with the reason if it cannot.
    Where FASTAVG_TEST_EMULATOR_LIBRARY names a library built already (test_sanitizers.py's child
    run, on a sanitized build), that one is loaded instead."""
    prebuilt = os.environ.get(EMULATOR_LIBRARY_VARIABLE)
    if prebuilt:
        print(f"{sanitizers.LOADED} {prebuilt}", file=sys.stderr)  # the parent checks that the child ran it
    return load(Path(prebuilt) if prebuilt else compile_library(out_dir))


def compile_library(out_dir: Path, flags: tuple[str, ...] = ("-O1",)) -> Path:
    """The emulator's shared library, compiled into ``out_dir`` with ``flags`` (sanitizers.FLAGS for
    a sanitized build); RuntimeError with the reason if it cannot be."""
    include, compiler = cuda_include(), sanitizers.compiler()
    if include is None or compiler is None:
        raise RuntimeError(f"needs a C++ compiler ({compiler}) and the CUDA headers ({include})")
    library = out_dir / "fastavg_cuda_emulated.so"
    command = [compiler, "-std=c++17", *flags, "-shared", "-fPIC", "-I", str(ROOT / "csrc"), "-I", str(include),
               str(SOURCE), "-o", str(library)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{result.stderr[-3000:]}")
    return library


def load(library: Path) -> ctypes.CDLL:
    """The emulator's library, its functions' return and argument types declared."""
    lib = ctypes.CDLL(str(library))
    lib.emulate_balanced_blocks.restype = ctypes.c_int64
    lib.emulate_balanced_blocks.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.emulate_bulk_error.restype = ctypes.c_char_p
    lib.emulate_take_vector_bytes.restype = ctypes.c_int64
    lib.emulate_driver_copies.restype = None
    return lib


def _launched(supported: int, lib: ctypes.CDLL | None = None) -> None:
    # The launchers refuse a (parameter, average) pair the build lacks (averages must hold the
    # parameters exactly); the binding turns that into a RuntimeError. -1: the model of the TMA's
    # copies caught bulk_ring_kernel misusing them (a hang, a stage read early or reused too soon).
    if supported == -1:
        raise AssertionError(f"bulk_ring_kernel: {lib.emulate_bulk_error().decode()}")
    if not supported:
        raise RuntimeError("unsupported (parameter, average) dtype pair")


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


def _aligned(address: int) -> bool:
    return address % 16 == 0


def backend(
    lib: ctypes.CDLL,
    most_blocks: int,
    threads: int = DEFAULT_THREADS,
    unroll: int = DEFAULT_UNROLL,
    bulk_kb: int = 0,
    driver_copies: bool = False,
) -> Backend:
    """The emulated kernels as a backend; ``most_blocks`` stands for the blocks a GPU holds at once,
    ``threads`` for the threads per block of update and swap launches (set_block_threads), ``unroll``
    for their vectors per thread per pass (set_unroll: 1, 2 or 4), ``bulk_kb`` for ring-only updates
    through the TMA's copies in stages of that many KB (set_bulk_rings, on a GPU that has them),
    ``driver_copies`` for ring-only updates as the driver's copies (set_driver_copies: the binding's
    list of copies, each a memcpy here)."""

    def blocks(items: int) -> ctypes.c_uint:
        return ctypes.c_uint(lib.emulate_balanced_blocks(items, most_blocks))

    def update_(params, table, averages, weights, rings, slots):
        if not params or not (averages or rings):
            return
        if driver_copies and not averages:  # as cuda_binding.cpp's copy_rings_by_driver: every ring at once
            slot_addresses = [ring[slot].data_ptr() for ring, slot in zip(rings, slots, strict=True)]
            lib.emulate_driver_copies(
                _pointers(params), (ctypes.c_int64 * len(params))(*[p.nbytes for p in params]),
                ctypes.c_int64(len(params)), (ctypes.c_void_p * len(rings))(*slot_addresses), len(rings),
            )  # fmt: skip
            return
        # As cuda_binding.cpp's update_cuda splits them.
        for avg, wts, rng in update_launches(averages, weights, rings, slots, MAX_AVERAGES, MAX_RINGS):
            vectors_ok = all(_aligned(t.data_ptr()) for t in [*avg, *rng])
            average_code = CODES[avg[0].dtype] if avg else CODES[params[0].dtype]
            launched = lib.emulate_update(
                ctypes.c_void_p(table.data_ptr()), ctypes.c_int64(table.shape[0]), _pointers(avg),
                (ctypes.c_double * MAX_AVERAGES)(*wts), len(avg), _pointers(rng), len(rng), int(vectors_ok),
                CODES[params[0].dtype], average_code, blocks(table.shape[0]), threads, unroll, bulk_kb,
            )  # fmt: skip
            _launched(launched, lib)

    def swap(params, table, backup, source, stride, count, average_dtype, mode, source_aligned):
        if not params:
            return
        launched = lib.emulate_swap(
            ctypes.c_void_p(table.data_ptr()), ctypes.c_int64(table.shape[0]), ctypes.c_void_p(backup.data_ptr()),
            ctypes.c_void_p(source.data_ptr()), ctypes.c_int64(stride), ctypes.c_int64(count),
            CODES[params[0].dtype], CODES[average_dtype], mode, int(_aligned(backup.data_ptr()) and source_aligned),
            blocks(table.shape[0]), threads, unroll,
        )  # fmt: skip
        _launched(launched)

    def check_count(ring, count):
        if not 1 <= count <= ring.shape[0]:
            raise ValueError(f"count must be in [1, {ring.shape[0]}], got {count}")

    def swap_in_(params, table, backup, average):
        swap(params, table, backup, average, 0, 1, average.dtype, 0, _aligned(average.data_ptr()))

    def swap_in_ring_(params, table, backup, ring, count, dtype):
        check_count(ring, count)
        swap(params, table, backup, ring, ring.stride(0), count, dtype, 1, True)

    def restore_(params, table, backup):
        swap(params, table, backup, backup, 0, 1, backup.dtype, 2, True)

    def ring_mean_(out, ring, count):
        check_count(ring, count)
        n = out.numel()
        if n:
            launched = lib.emulate_ring_mean(
                ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(ring.data_ptr()), ctypes.c_int64(n),
                ctypes.c_int64(ring.stride(0)), ctypes.c_int64(count), CODES[out.dtype], CODES[ring.dtype],
                blocks(-(-n // THREADS)),
            )  # fmt: skip
            _launched(launched)

    impls = dict(update_=update_, swap_in_=swap_in_, swap_in_ring_=swap_in_ring_, restore_=restore_,
                 ring_mean_=ring_mean_)  # fmt: skip
    return Backend(
        name="cuda-emulated",
        impls=impls,
        ops=impls,
        unavailable=lambda device: None if device.type == "cpu" else "host memory only",
        make_table=lambda group: build_table(group.flat_params),
    )
