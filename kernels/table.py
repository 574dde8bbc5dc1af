"""How the Triton launches are sized and which dtypes they name (the table itself: fastavg/table.py)."""

from __future__ import annotations

import os
import struct
import warnings

import torch
import triton.language as tl

from ..table import build_table  # noqa: F401  (the kernels read parameters through it)

NUM_WARPS = 4
# Every launch names its floating-point contraction rather than take Triton's default, which Triton
# 3.9 warns will change (to off, in 3.10): a multiply-add contracts to an FMA, as nvcc does for
# torch's own CUDA lerp and for the native backend. Same numerics on every Triton; every GPU run so
# far measured with it on (3.6's default).
FP_FUSION = True

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (decided when the kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = interpreting()
# Elements per inner-loop iteration: 8 bf16 (16 bytes) per thread x 32 threads x 4 warps. The
# interpreter pays Python overhead per iteration, so it takes 4x larger blocks (2^20 elements: 6 s
# -> under 2 s); 4099 elements still run one full block and a masked tail, as on a GPU.
BLOCK = 4096 if INTERPRET else 1024


def balanced_grid(work_items: int, most: int) -> int:
    """Programs for ``work_items`` rows (or blocks) walked with a stride of the grid, at most
    ``most`` at once, each walking the same number (one fewer at worst): 1,995 rows over 1,056
    slots take 998 programs of 2 rows, not 1,056 of which 117 finish after one row."""
    work = max(1, work_items)
    rounds = -(-work // max(1, most))
    return -(-work // rounds)


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, props) -> int:
    """How many programs of a compiled kernel an SM holds at once: registers (allocated per warp
    in units of 256), threads and shared memory each set a limit (as in Triton's softmax tutorial)."""
    warp = props.warp_size
    regs_per_warp = -(-max(1, n_regs) * warp // 256) * 256
    limits = [
        props.regs_per_multiprocessor // (regs_per_warp * num_warps),
        props.max_threads_per_multi_processor // (warp * num_warps),
        32,  # blocks per SM on sm_80 and sm_90
    ]
    if shared_bytes:
        limits.append(props.shared_memory_per_multiprocessor // shared_bytes)
    return max(1, min(limits))


# resident_key(...) -> programs resident at once on the whole device.
_RESIDENT: dict = {}
FALLBACK_PROGRAMS_PER_SM = 8  # where the compiled kernel cannot be inspected


def resident_key(kernel, index: int, args, meta) -> tuple:
    """What decides which compiled kernel a launch runs, so its registers size the grid: the
    constexprs, and the tensors' dtypes (Triton compiles per pointer type, and ring_mean_kernel's
    constexprs name no dtype: a bf16 ring and an fp32 one share them). The int arguments that vary
    between calls (copy flags, ring counts) are not specialised on (the kernels'
    do_not_specialize), and pointer alignment does not vary for the Averager's buffers (allocated
    16-byte aligned). A difference the key missed would cost speed only: the kernels' grid-stride
    loops are correct for any grid."""
    dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    return (kernel, index, tuple(meta.items()), dtypes)  # tl.dtype hashes; each call site passes one order


def _resident_programs(kernel, index: int, args, meta, grid_key=None) -> int:
    key = resident_key(kernel, index, args, meta) if grid_key is None else (kernel, index, grid_key)
    if key not in _RESIDENT:
        props = torch.cuda.get_device_properties(index)
        try:
            with torch.cuda.device(index):
                compiled = kernel.warmup(*args, grid=(1,), **meta)  # compiles (cached), launches nothing
                compiled._init_handles()  # loads it: the driver reports its registers
            per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.shared, meta.get("num_warps", NUM_WARPS), props)
        except Exception as err:  # a Triton without these internals: the fixed grid used before
            warnings.warn(
                f"fastavg: could not read the registers of Triton kernel {getattr(kernel, '__name__', kernel)} "
                f"({err!r}); its grid assumes {FALLBACK_PROGRAMS_PER_SM} programs per SM",
                RuntimeWarning,
                stacklevel=3,
            )
            per_sm = FALLBACK_PROGRAMS_PER_SM
        _RESIDENT[key] = per_sm * props.multi_processor_count
    return _RESIDENT[key]


def launch(kernel, work_items: int, device: torch.device, *args, grid_key=None, **meta) -> None:
    """``kernel[grid](*args, **meta)`` for a kernel whose programs walk ``work_items`` rows (or
    blocks) with a stride of the grid size. ``grid_key``: a caller's own name for what
    ``resident_key`` would find in the arguments (it must name as much), saving that walk per call.

    On a GPU the grid is persistent and balanced: no more programs than the SMs hold at once (a
    program that waits for a free slot walks its rows after everyone else, stretching the launch;
    how many fit depends on the kernel's registers, which vary from 38 to 104 across fastavg's
    variants), each walking an equal share. The interpreter runs one program per item. The launch
    runs on ``device`` (made current for it when another is), in that device's current stream.
    """
    if device.type != "cuda":
        kernel[(max(1, work_items),)](*args, **meta)
        return
    current = torch.cuda.current_device()
    index = device.index if device.index is not None else current
    grid = (balanced_grid(work_items, _resident_programs(kernel, index, args, meta, grid_key)),)
    if index == current:
        kernel[grid](*args, **meta)
        return
    # Triton launches on the current device, in its current stream, whatever the arguments' device:
    # parameters on another GPU (a model moved to cuda:1 with no torch.cuda.set_device) would be
    # read from device 0, out of torch's stream order there. torch's own ops follow the tensors.
    with torch.cuda.device(index):
        kernel[grid](*args, **meta)


def vector_width(*dtypes: torch.dtype) -> int:
    """Elements per thread for the aligned loops: 16 bytes of the WIDEST dtype a kernel touches.

    Triton gives each memory access its own layout, 16 bytes per thread: 8 bf16 parameters but 4
    fp32 averages. Results computed in the first and stored in the second then cross through
    shared memory, with barriers, at every iteration (seen in the TTGIR: a convert_layout in the
    aligned loop of the bf16 -> fp32 update). A contiguity hint of this width gives every access
    the same layout: 8-byte parameter loads, 16-byte average loads and stores, no conversion.
    """
    return 16 // max(dtype.itemsize for dtype in dtypes)


_FLOAT32 = struct.Struct("f")


def split_weight(weight: float) -> tuple[float, float, int]:
    """``weight`` as float32 hi + lo (Triton passes Python floats as float32) and a copy flag."""
    # struct rounds to nearest even as torch does, in 0.2 us instead of a tensor's 3 (4 per launch).
    hi = _FLOAT32.unpack(_FLOAT32.pack(weight))[0]
    return hi, weight - hi, int(weight == 1.0)
