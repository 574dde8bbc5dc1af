"""Backend "torch": the fused ops in plain PyTorch (foreach), the reference the kernels are tested against.

Obviously correct first: each op is a handful of foreach calls over 1-D views of the flat
buffers. It runs on any device torch supports and never syncs with the host. It ignores the
``table`` argument: it reaches the parameters through the tensors themselves.
"""

from __future__ import annotations

import torch

from .ops import NAMESPACES, Backend, add_backend, register_python_ops

# The float64 ring mean is taken this many elements at a time, so its scratch stays small
# (2^22 x window x 8 bytes) whatever the model size.
_MEAN_CHUNK = 1 << 22
# On the CPU the cast scratch for mixed dtypes is taken in batches of at most this many elements:
# a fresh full-size buffer every step page-faults (glibc maps allocations over 32 MB anew), and a
# batch that stays in cache is written and re-read without touching DRAM. GPT-2 124M bf16 EMA,
# 2-core EPYC (2 MB L2, 32 MB L3): one full buffer 216 ms; batches of 2^16 101 ms (Python per
# batch), 2^18 45 ms, 2^20 36 ms, 2^22 89 ms; stock foreach with a scratch kept for good 56 ms.
# CUDA's caching allocator reuses one full buffer at no cost, and GPUs stream it anyway.
_CPU_CAST_BATCH = 1 << 20


def _sizes(params: list[torch.Tensor]) -> list[int]:
    return [p.numel() for p in params]


def _batches(params: list[torch.Tensor], limit: int):
    """The flat parameter vector in consecutive batches of 1-D pieces: (flat start, pieces), each
    batch at most ``limit`` elements (larger parameters are cut)."""
    start, batch, size = 0, [], 0
    for p in params:
        for offset in range(0, p.numel(), limit):
            piece = p[offset : offset + limit]
            if batch and size + piece.numel() > limit:
                yield start, batch
                start, batch, size = start + size, [], 0
            batch.append(piece)
            size += piece.numel()
    if batch:
        yield start, batch


def _lerp_all(averages, weights, sources) -> None:
    """Every average (given as views matching ``sources``) lerped toward them; weight 1 copies."""
    for views, weight in zip(averages, weights):
        if weight == 1.0:
            # A first update copies: lerp would read the old value (NaN * 0 is NaN).
            torch._foreach_copy_(views, sources)
        else:
            torch._foreach_lerp_(views, sources, weight)


def update_(params, table, averages, weights, rings, slots) -> None:
    """``avg.lerp_(p, w)`` for every average, ``ring[slot] = p`` for every ring (see ops.py)."""
    sizes = _sizes(params)
    for ring, slot in zip(rings, slots):
        torch._foreach_copy_(ring[slot].split(sizes), params)
    if not averages:
        return
    if averages[0].dtype == params[0].dtype:
        _lerp_all([a.split(sizes) for a in averages], weights, params)
        return
    # foreach lerp cannot mix dtypes: a cast pass into scratch of the averages' dtype first.
    dtype, device = averages[0].dtype, averages[0].device
    limit = sum(sizes) if device.type == "cuda" else _CPU_CAST_BATCH
    for start, pieces in _batches(params, max(limit, 1)):
        piece_sizes = _sizes(pieces)
        scratch = torch.empty(sum(piece_sizes), dtype=dtype, device=device).split(piece_sizes)
        torch._foreach_copy_(scratch, pieces)
        window = [a[start : start + sum(piece_sizes)].split(piece_sizes) for a in averages]
        _lerp_all(window, weights, scratch)


def swap_in_(params, table, backup, average) -> None:
    """``backup = p; p = average`` cast to the parameter dtype."""
    sizes = _sizes(params)
    torch._foreach_copy_(backup.split(sizes), params)
    torch._foreach_copy_(params, average.split(sizes))


def ring_mean_(out, ring, count) -> None:
    """``out = mean(ring[:count])`` in float64, rounded once to ``out.dtype``."""
    if not 1 <= count <= ring.shape[0]:
        raise ValueError(f"count must be in [1, {ring.shape[0]}], got {count}")
    for start in range(0, out.numel(), _MEAN_CHUNK):
        end = min(start + _MEAN_CHUNK, out.numel())
        out[start:end].copy_(ring[:count, start:end].to(torch.float64).sum(0).div_(count))


def swap_in_ring_(params, table, backup, ring, count, dtype) -> None:
    """``backup = p; p = mean(ring[:count])`` rounded to ``dtype`` then to the parameter dtype."""
    mean = torch.empty(ring.shape[1], dtype=dtype, device=ring.device)
    ring_mean_(mean, ring, count)
    swap_in_(params, table, backup, mean)


def restore_(params, table, backup) -> None:
    """``p = backup``, bit for bit."""
    torch._foreach_copy_(params, backup.split(_sizes(params)))


IMPLS = {
    "update_": update_,
    "swap_in_": swap_in_,
    "swap_in_ring_": swap_in_ring_,
    "restore_": restore_,
    "ring_mean_": ring_mean_,
}

BACKEND = Backend(
    name="torch",
    impls=IMPLS,
    ops=register_python_ops(NAMESPACES["torch"], IMPLS),
    unavailable=lambda device: None,
    # The reference reads the parameters through the tensors themselves: no table.
    make_table=lambda group: torch.empty(0, dtype=torch.int64, device=group.device),
    speed_rank={"cpu": 0, "cuda": 0},
)
add_backend(BACKEND)
