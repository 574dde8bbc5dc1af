"""ring_mean_: the LAWA average of a flat ring (for export), summed in float64, one launch."""

from __future__ import annotations

import triton
import triton.language as tl

from .access import cast, load, store
from .table import BLOCK, FP_FUSION, NUM_WARPS, launch


@triton.jit
def _mean_block(out, ring, index, mask, stride, count, MASKED: tl.constexpr):
    total = load(ring + index, mask, MASKED).to(tl.float64)
    for k in range(1, count):
        total += load(ring + k * stride + index, mask, MASKED).to(tl.float64)
    store(out + index, cast(total / count, out.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=["count"])  # one kernel for every count: see swap.py
def ring_mean_kernel(out, ring, n, stride, count, BLOCK: tl.constexpr):
    stride = tl.cast(stride, tl.int64)
    full_blocks = n // BLOCK
    for b in range(tl.program_id(0), full_blocks, tl.num_programs(0)):
        start = tl.cast(b, tl.int64) * BLOCK  # int64: flat buffers pass 2^31 elements
        index = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _mean_block(out, ring, index, None, stride, count, False)
    if tl.program_id(0) == 0:  # the partial last block, masked
        index = tl.cast(full_blocks, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _mean_block(out, ring, index, index < n, stride, count, True)


def ring_mean_(out, ring, count) -> None:
    """``out = mean(ring[:count])`` in float64, rounded once to ``out.dtype``."""
    if not 1 <= count <= ring.shape[0]:
        raise ValueError(f"count must be in [1, {ring.shape[0]}], got {count}")
    n = out.numel()
    if n:
        launch(ring_mean_kernel, n // BLOCK, out.device, out, ring, n, ring.stride(0), count, BLOCK=BLOCK,
               num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)  # fmt: skip
