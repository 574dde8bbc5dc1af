"""Median times: CUDA events on a GPU, perf_counter on the CPU; warm-up first, then repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of one ``fn()`` call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> list[float]:
    """Median milliseconds of each ``fn``, timed round-robin (one call of each per repeat), so a
    machine whose load drifts (a shared VM: 1.5x between runs, measured) biases none of them."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[i].append((start, end))
        torch.cuda.synchronize(device)
        return [statistics.median(s.elapsed_time(e) for s, e in pairs) for pairs in events]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int, warmup: int) -> float:
    """Measured device copy bandwidth: bytes read plus bytes written per second, in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats, warmup)
    return 2 * src.numel() / (ms * 1e-3) / 1e9
