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


def _sizes(params: list[torch.Tensor]) -> list[int]:
    return [p.numel() for p in params]


def update_(params, table, averages, weights, rings, slots) -> None:
    """``avg.lerp_(p, w)`` for every average, ``ring[slot] = p`` for every ring (see ops.py)."""
    sizes = _sizes(params)
    for ring, slot in zip(rings, slots):
        torch._foreach_copy_(ring[slot].split(sizes), params)
    if not averages:
        return
    source = params
    if averages[0].dtype != params[0].dtype:
        # foreach lerp cannot mix dtypes: one cast pass into a scratch buffer of the averages' dtype.
        scratch = torch.empty(averages[0].numel(), dtype=averages[0].dtype, device=averages[0].device)
        source = scratch.split(sizes)
        torch._foreach_copy_(source, params)
    for average, weight in zip(averages, weights):
        if weight == 1.0:
            # A first update copies: lerp would read the old value (NaN * 0 is NaN).
            torch._foreach_copy_(average.split(sizes), source)
        else:
            torch._foreach_lerp_(average.split(sizes), source, weight)


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
    unavailable=lambda device_type: None,
    # The reference reads the parameters through the tensors themselves: no table.
    make_table=lambda group: torch.empty(0, dtype=torch.int64, device=group.device),
    speed_rank={"cpu": 0, "cuda": 0},
)
add_backend(BACKEND)
