"""The swap kernel for averaged(), in three modes: backup = p; p = average (FROM_AVERAGE), or
p = the LAWA ring mean (FROM_RING); and p = backup (RESTORE).

One backup buffer in the parameter dtype. Bytes per element, bf16 params and fp32 averages:
swap_in_ 10 (p, avg read; backup, p written); swap_in_ring_ 2 x count + 6; restore_ 4.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .access import cast, full_blocks_end, load, row, store
from .table import BLOCK, FP_FUSION, NUM_WARPS, TL_DTYPES, launch, vector_width


@triton.jit
def _ring_mean(ring, flat, mask, stride, count, AVG_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    # Summed in float64 and rounded once to the averages' dtype: exact for any window (no drift).
    total = load(ring + flat, mask, MASKED).to(tl.float64)
    for k in range(1, count):
        total += load(ring + k * stride + flat, mask, MASKED).to(tl.float64)
    return cast(total / count, AVG_DTYPE)


# What swap_kernel writes into the parameters (its MODE).
FROM_AVERAGE, FROM_RING, RESTORE = 0, 1, 2


@triton.jit
def _swap_block(p_ptr, flat, mask, backup, source, stride, count,
                MODE: tl.constexpr, AVG_DTYPE: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    if MODE == 2:  # RESTORE: p = backup
        store(p_ptr, load(backup + flat, mask, MASKED), mask, MASKED)
    else:
        # Both reads before the first store: a store between them would keep the second read
        # waiting for the first one's round trip (update.py's _block).
        p = load(p_ptr, mask, MASKED)
        if MODE == 1:  # FROM_RING
            value = _ring_mean(source, flat, mask, stride, count, AVG_DTYPE, MASKED)
        else:
            value = load(source + flat, mask, MASKED)
        store(backup + flat, p, mask, MASKED)
        store(p_ptr, cast(value, p_ptr.dtype.element_ty), mask, MASKED)


# `count` (snapshots in the ring mean) is not specialised on: a first averaged() of one snapshot
# would otherwise compile a variant whose registers size every later launch's grid (see update.py).
@triton.jit(do_not_specialize=["n_rows", "count"])
def swap_kernel(table, n_rows, backup, source, stride, count,
                P_DTYPE: tl.constexpr, AVG_DTYPE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                VEC: tl.constexpr):  # fmt: skip
    stride = tl.cast(stride, tl.int64)  # ring row stride: slot x N passes 2^31 on large models
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        pointer, offset, length, aligned = row(table, r, P_DTYPE)
        full = full_blocks_end(length, aligned, BLOCK)
        # The aligned loop's own hinted copy of address and offset (see access.py).
        aligned_pointer = tl.multiple_of(tl.load(table + r * 4).to(tl.pointer_type(P_DTYPE)), 16)
        aligned_offset = tl.multiple_of(tl.load(table + r * 4 + 1), 8)
        for start in range(0, full, BLOCK):
            # Contiguous in runs of VEC (table.vector_width): one layout for every access.
            index = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), VEC)
            p_ptr, flat = aligned_pointer + index, aligned_offset + index
            _swap_block(p_ptr, flat, None, backup, source, stride, count, MODE, AVG_DTYPE, False)
        for start in range(full, length, BLOCK):
            index = start + tl.arange(0, BLOCK)
            _swap_block(pointer + index, offset + index, index < length, backup, source, stride, count,
                        MODE, AVG_DTYPE, True)  # fmt: skip


def _launch(params, table, backup, source, stride, count, avg_dtype, mode) -> None:
    n_rows = table.shape[0]
    if n_rows == 0:
        return
    launch(
        swap_kernel, n_rows, table.device, table, n_rows, backup, source, stride, count,
        P_DTYPE=TL_DTYPES[params[0].dtype], AVG_DTYPE=TL_DTYPES[avg_dtype], MODE=mode,
        BLOCK=BLOCK, VEC=vector_width(params[0].dtype, source.dtype), num_warps=NUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def swap_in_(params, table, backup, average) -> None:
    """``backup = p; p = average`` (cast to the parameter dtype), one launch."""
    _launch(params, table, backup, average, 0, 1, average.dtype, FROM_AVERAGE)


def swap_in_ring_(params, table, backup, ring, count, dtype) -> None:
    """``backup = p; p = mean(ring[:count])`` (float64 sum, rounded to ``dtype``, then to p's), one launch."""
    if not 1 <= count <= ring.shape[0]:
        raise ValueError(f"count must be in [1, {ring.shape[0]}], got {count}")
    _launch(params, table, backup, ring, ring.stride(0), count, dtype, FROM_RING)


def restore_(params, table, backup) -> None:
    """``p = backup``, bit for bit, one launch."""
    # source = backup: an unused valid pointer (RESTORE reads only the backup).
    _launch(params, table, backup, backup, 0, 1, backup.dtype, RESTORE)
