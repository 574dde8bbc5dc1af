"""The device-side table kernels read a group's parameters through, built once per group.

One int64 row per chunk of a parameter: (address, flat offset, length, aligned). Shared by the
Triton kernels and the CUDA extension: one launch covers any number of tensors.
"""

from __future__ import annotations

import torch

# Rows cover at most this many elements of one parameter, so work splits evenly across programs
# whatever the tensor sizes (GPT-2 124M: 3,892 rows). The GPU launches give each program an equal
# number of rows, with no more programs than fit at once: finer rows let that number come closer
# to the slots (at 2^16, 1,995 rows filled 63% to 95% of them depending on the kernel's registers;
# at 2^15, 82% to 98%), for one more table read per 32K elements (about 1% of a row's time).
CHUNK = 1 << 15
# A row is "aligned" when its parameter address is 16-byte aligned and its flat offset a multiple
# of 8 elements: then 16-byte vector access is valid for every dtype of params, averages and rings.
ALIGN_BYTES, ALIGN_ELEMENTS = 16, 8
COLUMNS = 4  # address, flat offset, length, aligned


def build_table(flat_params: list[torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    """``(rows, 4)`` int64 on the parameters' device: (address, flat offset, length, aligned) per
    chunk of at most ``chunk`` elements (another size only for tuning: bench/kernel_sweep.py)."""
    if chunk < ALIGN_ELEMENTS or chunk % ALIGN_ELEMENTS:
        raise ValueError(f"chunk must be a positive multiple of {ALIGN_ELEMENTS}, got {chunk}")
    rows, offset = [], 0
    for p in flat_params:
        numel, item, address = p.numel(), p.element_size(), p.data_ptr()
        for start in range(0, numel, chunk):
            row_address = address + start * item
            aligned = row_address % ALIGN_BYTES == 0 and (offset + start) % ALIGN_ELEMENTS == 0
            rows.append((row_address, offset + start, min(chunk, numel - start), int(aligned)))
        offset += numel
    # Built on the CPU by name, not on torch's default device (torch.set_default_device, or a
    # `with torch.device(...)` block around wrap), which need not be the parameters'.
    table = torch.tensor(rows, dtype=torch.int64, device="cpu").reshape(-1, COLUMNS)
    return table.to(flat_params[0].device) if flat_params else table
