"""update_: every due average of a group from one read of its parameters, in one launch.

EMA and SWA are ``avg.lerp_(p, w)`` (w = 1 - d_j or 1/n; w == 1 copies); LAWA writes ring slots.
Bytes per element for bf16 params and fp32 averages: 2 read + 10 per lerped average + 2 per ring.
"""

from __future__ import annotations

import functools
import types

import triton
import triton.language as tl

from ..ops import update_launches
from .access import cast, full_blocks_end, load, math_dtype, row, store
from .table import BLOCK, FP_FUSION, NUM_WARPS, TL_DTYPES, launch, split_weight, vector_width

MAX_AVERAGES, MAX_RINGS = 4, 2  # per launch; more (rare) take further launches


@triton.jit
def _lerp(average, p, w, copy):
    # ATen's two-sided lerp (exact at both ends), so results track torch.lerp's rounding.
    diff = p - average
    out = tl.where(w < 0.5, average + w * diff, p - diff * (1.0 - w))
    return tl.where(copy != 0, p, out)  # a first update never reads the old (maybe NaN) value


@triton.jit
def _lerp_store(a, flat, mask, average, p, w, copy, MATH: tl.constexpr, MASKED: tl.constexpr):
    store(a + flat, cast(_lerp(average.to(MATH), p, w, copy), a.dtype.element_ty), mask, MASKED)


@triton.jit
def _block(p_ptr, flat, mask, a0, a1, a2, a3, w0, w1, w2, w3, c0, c1, c2, c3, r0, r1,
           N_AVG: tl.constexpr, N_RING: tl.constexpr, MATH: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    # Every load before the first store. The compiler keeps loads and stores to pointers that may
    # alias in program order, so a store between two loads made each iteration wait out one memory
    # round trip per buffer (the SASS of EMA+SWA+LAWA: p, then a0 after the ring store, then a1
    # after a0's store); loaded together, the buffers' round trips overlap.
    p = load(p_ptr, mask, MASKED)
    if N_AVG >= 1:
        v0 = load(a0 + flat, mask, MASKED)
    if N_AVG >= 2:
        v1 = load(a1 + flat, mask, MASKED)
    if N_AVG >= 3:
        v2 = load(a2 + flat, mask, MASKED)
    if N_AVG >= 4:
        v3 = load(a3 + flat, mask, MASKED)
    if N_RING >= 1:
        store(r0 + flat, p, mask, MASKED)
    if N_RING >= 2:
        store(r1 + flat, p, mask, MASKED)
    p = p.to(MATH)
    if N_AVG >= 1:
        _lerp_store(a0, flat, mask, v0, p, w0, c0, MATH, MASKED)
    if N_AVG >= 2:
        _lerp_store(a1, flat, mask, v1, p, w1, c1, MATH, MASKED)
    if N_AVG >= 3:
        _lerp_store(a2, flat, mask, v2, p, w2, c2, MATH, MASKED)
    if N_AVG >= 4:
        _lerp_store(a3, flat, mask, v3, p, w3, c3, MATH, MASKED)


@triton.jit
def _update_rows(table, n_rows, a0, a1, a2, a3, w0, w1, w2, w3, c0, c1, c2, c3, r0, r1,
                 P_DTYPE: tl.constexpr, MATH: tl.constexpr, N_AVG: tl.constexpr, N_RING: tl.constexpr,
                 BLOCK: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
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
            _block(p_ptr, flat, None, a0, a1, a2, a3, w0, w1, w2, w3, c0, c1, c2, c3, r0, r1,
                   N_AVG, N_RING, MATH, False)  # fmt: skip
        for start in range(full, length, BLOCK):
            index = start + tl.arange(0, BLOCK)
            _block(pointer + index, offset + index, index < length, a0, a1, a2, a3, w0, w1, w2, w3,
                   c0, c1, c2, c3, r0, r1, N_AVG, N_RING, MATH, True)  # fmt: skip


# The copy flags and the row count are not specialised on (Triton compiles a variant for an int
# argument equal to 1): otherwise the first update, a copy (flags 1), compiles a kernel of its own,
# and its registers size the grid of every later step (table.launch). Triton 3.6, sm_90, EMA+SWA+LAWA
# bf16 -> fp32: 32 registers copying, 48 after, so 1,946 programs for 1,320 slots, 1.5 waves. That
# fits H200 runs 3-5: 84% of copy in the benchmark, whose first step copies, 90% in the kernel
# sweep, which never copies.
@triton.jit(do_not_specialize=["n_rows", "c0", "c1", "c2", "c3"])
def update_kernel(table, n_rows, a0, a1, a2, a3, h0, l0, c0, h1, l1, c1, h2, l2, c2, h3, l3, c3, r0, r1,
                  P_DTYPE: tl.constexpr, MATH: tl.constexpr, N_AVG: tl.constexpr, N_RING: tl.constexpr,
                  BLOCK: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    # hi + lo restores float64 weights to ~48 bits for float64 averages; float32 rounds back to hi.
    # tl.cast, not .to(): the interpreter passes scalars as Python floats.
    w0, w1 = tl.cast(h0, MATH) + tl.cast(l0, MATH), tl.cast(h1, MATH) + tl.cast(l1, MATH)
    w2, w3 = tl.cast(h2, MATH) + tl.cast(l2, MATH), tl.cast(h3, MATH) + tl.cast(l3, MATH)
    _update_rows(table, n_rows, a0, a1, a2, a3, w0, w1, w2, w3, c0, c1, c2, c3, r0, r1,
                 P_DTYPE, MATH, N_AVG, N_RING, BLOCK, VEC)  # fmt: skip


# LAWA alone (rings, no averages): the same rows with 4 arguments instead of update_kernel's 20.
# Its kernel is the shortest of all (0.13 ms for GPT-2 on an H200), so a loop of opt.step() calls
# is bound by the host when the host is slow (H200 run 7: 77% of copy), and a launch's host cost
# grows with its arguments: Triton binds and specialises each, and its launcher checks every
# pointer with the driver. The unused average slots get r0 and are never dereferenced (N_AVG 0).
@triton.jit(do_not_specialize=["n_rows"])
def snapshot_kernel(table, n_rows, r0, r1, P_DTYPE: tl.constexpr, N_RING: tl.constexpr, BLOCK: tl.constexpr,
                    VEC: tl.constexpr):  # fmt: skip
    _update_rows(table, n_rows, r0, r0, r0, r0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, r0, r1,
                 P_DTYPE, tl.float32, 0, N_RING, BLOCK, VEC)  # fmt: skip


# Elements per inner iteration: BLOCK (8 per thread at 4 warps) for one buffer (EMA alone, or one
# ring); half that for two or more (averages and rings), whose registers at BLOCK leave fewer
# programs per SM. H200 kernel sweep (run 3, stores still between the loads): EMA+SWA+LAWA 0.656 ms
# at 512 (48 registers) vs 0.674 at 1024 (94); rings alone 0.131 ms at 1024 vs 0.134 at 2048; EMA
# 0.315 to 0.319 ms at every block from 512 to 4096. With every load first (_block), triton 3.6
# ptxas, sm_90, bf16 -> fp32, 1024 against 512: EMA+SWA+LAWA 66 against 48 registers, EMA + SWA 72
# against 40, EMA + LAWA 42 against 40; not timed yet (the sweep's rows at both blocks).
MANY_BUFFERS_BLOCK = BLOCK // 2


@functools.cache
def _plan(p_dtype, avg_dtype, ring_dtype, n_avg: int, n_ring: int, block, num_warps: int) -> tuple:
    """(kernel, constexprs, grid key) of one launch shape, worked out once: a step only fills in
    its pointers and weights. The key names everything that picks the compiled kernel
    (table.resident_key), without walking the arguments at every step."""
    constexprs = dict(
        P_DTYPE=TL_DTYPES[p_dtype], N_RING=n_ring,
        BLOCK=block or (MANY_BUFFERS_BLOCK if n_avg + n_ring >= 2 else BLOCK),
        VEC=vector_width(p_dtype, *([avg_dtype] if n_avg else [])), num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    kernel = snapshot_kernel
    if n_avg:
        kernel = update_kernel
        constexprs.update(MATH=math_dtype(TL_DTYPES[avg_dtype]), N_AVG=n_avg)
    # Read-only: every launch of this shape shares it.
    return kernel, types.MappingProxyType(constexprs), (p_dtype, avg_dtype, ring_dtype, *constexprs.items())


def launches(params, table, averages, weights, rings, slots, *, block=None, num_warps=NUM_WARPS) -> list[tuple]:
    """(kernel, arguments, constexprs, grid key) for each launch of ``update_``: at most 4 averages
    and 2 rings per launch; ``snapshot_kernel`` where a launch has rings only."""
    n_rows = table.shape[0]
    p_dtype = params[0].dtype
    avg_dtype = averages[0].dtype if averages else None
    ring_dtype = rings[0].dtype if rings else None
    plans = []
    for avg, wts, rng in update_launches(averages, weights, rings, slots, MAX_AVERAGES, MAX_RINGS):
        kernel, constexprs, key = _plan(p_dtype, avg_dtype, ring_dtype, len(avg), len(rng), block, num_warps)
        filler = (avg or rng)[0]  # unused pointer slots: never dereferenced (N_AVG / N_RING)
        ring_pointers = (*rng, *[filler] * (MAX_RINGS - len(rng)))
        if avg:
            pointers = (*avg, *[filler] * (MAX_AVERAGES - len(avg)))
            coefficients = [c for w in [*wts, *[0.0] * (MAX_AVERAGES - len(wts))] for c in split_weight(w)]
            plans.append((kernel, (table, n_rows, *pointers, *coefficients, *ring_pointers), constexprs, key))
        else:
            plans.append((kernel, (table, n_rows, *ring_pointers), constexprs, key))
    return plans


def update_(params, table, averages, weights, rings, slots, *, block=None, num_warps=NUM_WARPS) -> None:
    """Launch ``update_kernel`` (``snapshot_kernel`` for rings alone) over the group: at most 4
    averages and 2 rings per launch. ``block`` and ``num_warps`` are for tuning
    (bench/kernel_sweep.py); the op uses the defaults."""
    n_rows = table.shape[0]
    if n_rows == 0 or not (averages or rings):
        return
    for kernel, args, constexprs, key in launches(
        params, table, averages, weights, rings, slots, block=block, num_warps=num_warps
    ):
        launch(kernel, n_rows, table.device, *args, grid_key=key, **constexprs)
