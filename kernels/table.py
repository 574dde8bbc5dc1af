"""The table a group's kernels read parameters through, and how launches are sized."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

# Rows cover at most this many elements of one parameter, so work splits evenly across programs
# whatever the tensor sizes (GPT-2 124M: about 2,000 rows).
CHUNK = 1 << 16
NUM_WARPS = 4
# A row is "aligned" when its parameter address is 16-byte aligned and its flat offset a multiple
# of 8 elements: then 16-byte vector access is valid for every dtype of params, averages and rings.
ALIGN_BYTES, ALIGN_ELEMENTS = 16, 8
COLUMNS = 4  # address, flat offset, length, aligned

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


def build_table(flat_params: list[torch.Tensor]) -> torch.Tensor:
    """``(rows, 4)`` int64 on the parameters' device: (address, flat offset, length, aligned) per chunk."""
    rows, offset = [], 0
    for p in flat_params:
        numel, item, address = p.numel(), p.element_size(), p.data_ptr()
        for start in range(0, numel, CHUNK):
            row_address = address + start * item
            aligned = row_address % ALIGN_BYTES == 0 and (offset + start) % ALIGN_ELEMENTS == 0
            rows.append((row_address, offset + start, min(CHUNK, numel - start), int(aligned)))
        offset += numel
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, COLUMNS)
    return table.to(flat_params[0].device) if flat_params else table


@functools.cache
def _max_programs(device_index: int) -> int:
    # A persistent grid: 8 programs of 4 warps per SM keep enough loads in flight to reach the
    # bandwidth floor while each program walks several rows.
    return 8 * torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_size(work_items: int, device: torch.device) -> int:
    """Programs to launch over ``work_items`` rows or blocks."""
    if device.type != "cuda":
        return max(1, work_items)
    return max(
        1, min(work_items, _max_programs(device.index if device.index is not None else torch.cuda.current_device()))
    )


def split_weight(weight: float) -> tuple[float, float, int]:
    """``weight`` as float32 hi + lo (Triton passes Python floats as float32) and a copy flag."""
    hi = float(torch.tensor(weight, dtype=torch.float32))
    return hi, weight - hi, int(weight == 1.0)
