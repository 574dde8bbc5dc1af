"""Median times: CUDA events on a GPU, perf_counter on the CPU; warm-up first, then repeats."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

# On a GPU each timed sample is back-to-back calls, at least this many and spanning at least
# MIN_SAMPLE_MS: the steady rate of a loop of calls, where the host's Python (step()'s bookkeeping,
# launches) hides behind the previous kernels unless it is the slower of the two, and then it is
# what is measured. Five calls of LAWA alone (0.13 ms each on an H200) right after a synchronise
# measured its host side cold, 2.3 times its warm time (H200, run 4: opt.step() 95 us warm in a
# loop, ~0.22 ms per call in the samples), for every backend and the stock path alike.
GPU_CALLS_PER_SAMPLE = 5
MIN_SAMPLE_MS = 5.0
MAX_CALLS_PER_SAMPLE = 100


def median_ms(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int, calls: int = GPU_CALLS_PER_SAMPLE
) -> float:
    """Median milliseconds of one ``fn()`` call."""
    return interleaved_median_ms([fn], device, repeats, warmup, calls)[0]


def _timed_calls(fn: Callable[[], object], device: torch.device, calls: int) -> tuple:
    """Queue one untimed ``fn()`` after a synchronise, then ``calls`` calls between the two events
    returned (start, end)."""
    torch.cuda.synchronize(device)
    fn()  # untimed: keeps the GPU busy while the timed calls are queued
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    return start, end


def calls_per_sample(ms_per_call: float, calls: int) -> int:
    """At least ``calls``, and enough calls of ``ms_per_call`` to span MIN_SAMPLE_MS (at most
    MAX_CALLS_PER_SAMPLE)."""
    wanted = math.ceil(MIN_SAMPLE_MS / max(ms_per_call, 1e-6))
    return max(calls, min(wanted, MAX_CALLS_PER_SAMPLE))


def interleaved_median_ms(
    fns: list[Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int,
    calls: int = GPU_CALLS_PER_SAMPLE,
) -> list[float]:
    """Median milliseconds of one call of each ``fn``, timed round-robin (one sample of each per
    repeat), so a machine whose load drifts (a shared VM: 1.5x between runs, measured) biases none.

    On a GPU a sample starts from a busy queue: the GPU is synchronised, one untimed call is
    queued, then back-to-back calls are timed between two events: ``calls`` (one suffices for
    calls of many milliseconds, such as a training step), or more where they would span less
    than MIN_SAMPLE_MS (the number is fixed per ``fn`` from one sample after the warm-up). Timing a
    single call right after another case left the queue empty counted that call's own host
    latency on top of its kernel, so a case's time depended on which case ran before it.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    if device.type == "cuda":
        counts = []
        for fn in fns:
            start, end = _timed_calls(fn, device, calls)
            torch.cuda.synchronize(device)
            counts.append(calls_per_sample(start.elapsed_time(end) / calls, calls))
        events = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                events[i].append(_timed_calls(fn, device, counts[i]))
        torch.cuda.synchronize(device)
        return [statistics.median(s.elapsed_time(e) / n for s, e in pairs) for pairs, n in zip(events, counts)]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


HOST_CALLS = 10
_SLEEP_CYCLES_PER_MS: dict = {}  # device -> GPU clock cycles torch.cuda._sleep spins per millisecond


def host_ms_per_call(
    fn: Callable[[], object], device: torch.device, ms_per_call: float, calls: int = HOST_CALLS
) -> float | None:
    """Host time of one ``fn()`` call with the GPU kept busy: a sleeping kernel is queued first, so
    no call waits for its own kernels and the clock sees only the host's work (Python, launches).

    Beside a case's median time (``ms_per_call``) this says what bounds it: a host time near the
    median means the kernels waited for the host (H200 run 7: Triton's LAWA alone, a 0.13 ms
    kernel, at 77% of copy). The sleep lasts three times the calls' median time and 5 ms more: a
    host slower than that would have been the median. None on the CPU, and where the sleep ended
    before the calls did (a call that waited for the GPU: AveragedModel reads its counter).
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int((5.0 + 3 * calls * ms_per_call) * _sleep_cycles_per_ms(device)))
    slept = torch.cuda.Event()
    slept.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - start) * 1e3 / calls
    still_sleeping = not slept.query()
    torch.cuda.synchronize(device)
    return host_ms if still_sleeping else None


def _sleep_cycles_per_ms(device: torch.device) -> float:
    if device not in _SLEEP_CYCLES_PER_MS:
        cycles = 10_000_000
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize(device)
        _SLEEP_CYCLES_PER_MS[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS[device]


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int, warmup: int) -> float:
    """Measured device copy bandwidth: bytes read plus bytes written per second, in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats, warmup)
    return 2 * src.numel() / (ms * 1e-3) / 1e9
