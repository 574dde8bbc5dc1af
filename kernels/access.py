"""Load/store helpers shared by the kernels: one body serves the masked and the unmasked path.

Alignment hints, measured in the PTX (tests/test_triton_ptx.py keeps them true):
- write tl.multiple_of / tl.max_contiguous in the kernel body: on values a helper *returns* they
  are lost (scalar ld.global.b16 instead of ld.global.v4); values passed *into* a helper keep them;
- tl.multiple_of marks the value itself, not a copy: so the aligned loop hints its OWN load of the
  row's address and offset, and the masked loop (which serves misaligned rows) never sees a hint.
"""

import triton
import triton.language as tl


@triton.jit
def load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def row(table, r, P_DTYPE: tl.constexpr):
    """Row ``r`` of a group table: the parameter pointer, flat offset, length and aligned flag."""
    base = table + r * 4
    pointer = tl.load(base).to(tl.pointer_type(P_DTYPE))
    return pointer, tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)


@triton.jit
def full_blocks_end(length, aligned, BLOCK: tl.constexpr):
    """Where a row's unmasked vector loop ends: after its last full block if aligned, else at 0."""
    return tl.where(aligned != 0, length // BLOCK * BLOCK, 0)


@triton.jit
def _bf16_rtne(x):
    # Round to nearest even by bits, as torch's c10::BFloat16 does: exact in the interpreter too,
    # whose own float32 -> bfloat16 cast truncates (and its "rtne" mode rounds ties away).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """``x`` in ``DTYPE``, rounded to nearest even (float64 -> bfloat16 goes through float32, as torch)."""
    if DTYPE == tl.bfloat16:
        return _bf16_rtne(x.to(tl.float32))
    else:
        return x.to(DTYPE)


def math_dtype(average_dtype):
    """The dtype an update computes in: float64 for float64 averages, else float32 (torch's opmath)."""
    return tl.float64 if average_dtype == tl.float64 else tl.float32
