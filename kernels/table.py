"""How the Triton launches are sized and which dtypes they name (the table itself: fastavg/table.py)."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

from ..table import build_table  # noqa: F401  (the kernels read parameters through it)

NUM_WARPS = 4

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


@functools.cache
def _max_programs(device_index: int) -> int:
    # A persistent grid: 8 programs of 4 warps per SM keep enough loads in flight to reach the
    # bandwidth floor while each program walks several rows.
    return 8 * torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_size(work_items: int, device: torch.device) -> int:
    """Programs to launch over ``work_items`` rows or blocks."""
    if device.type != "cuda":
        return max(1, work_items)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(work_items, _max_programs(index)))


def split_weight(weight: float) -> tuple[float, float, int]:
    """``weight`` as float32 hi + lo (Triton passes Python floats as float32) and a copy flag."""
    hi = float(torch.tensor(weight, dtype=torch.float32))
    return hi, weight - hi, int(weight == 1.0)
