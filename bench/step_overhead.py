"""Host (Python) cost of Averager.step() per training step, over GPT-2 124M's 148 parameter tensors.

Each tensor is shrunk to at most 64 elements, so what is timed is the Python side and op dispatch,
not memory traffic.  Usage: python bench/step_overhead.py [--backends torch triton] [--device cpu]
[--profile]: --profile adds where the time of the benchmark's opt.step() goes (cProfile) and, on a
GPU, what one Triton launch costs through the JIT against a compiled handle.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch

import fastavg
from fastavg.bench.cases import WINDOW, fastavg_case
from fastavg.bench.shapes import gpt2_shapes


def per_call_us(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", help="default: every backend available on the device")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device_type = torch.device(args.device).type
    backends = args.backends or [b for b, why in fastavg.available_backends(device_type).items() if why is None]
    params = [
        torch.nn.Parameter(torch.zeros(min(64, s[0]), device=args.device, dtype=torch.bfloat16)) for s in gpt2_shapes()
    ]
    all_three = {"ema": fastavg.EMA(), "swa": fastavg.SWA(), "lawa": fastavg.LAWA(every=1)}
    print(f"{len(params)} tensors, device {args.device}, torch {torch.__version__}")
    for backend in backends:
        rows = {
            "step, nothing due": fastavg.Averager(params, fastavg.EMA(every=10**9), backend=backend).step,
            "parameter check (148 tensors)": fastavg.Averager(params, "ema", backend=backend).check_params,
            "step, EMA due": fastavg.Averager(params, fastavg.EMA(), backend=backend).step,
            "step, EMA+SWA+LAWA due": fastavg.Averager(params, all_three, backend=backend).step,
            # Against the next row: AveragedOptimizer's step wrapper (hooks; the profiler label only
            # when a profiler runs) and the no-op inner optimizer's step in torch's wrapper (label).
            "step, LAWA due": fastavg.Averager(params, fastavg.LAWA(WINDOW, every=1), backend=backend).step,
            # What fastavg-bench times for LAWA alone (its kernel is the shortest: 0.13 ms on an H200).
            "opt.step(), LAWA due": fastavg_case("lawa", params, backend).step,
        }
        for name, fn in rows.items():
            # Host time per call: on a GPU the launches are asynchronous, so this is the Python
            # and launch cost a training step pays, not the kernel's time.
            print(f"{backend:7s} {name:32s} {per_call_us(fn, args.repeats):8.1f} us")
        if args.profile:
            print_profile(rows["opt.step(), LAWA due"], args.repeats)
    if args.profile and device_type == "cuda" and "triton" in backends:
        triton_launch_costs(params, args.repeats)


def print_profile(fn, repeats: int, lines: int = 12) -> None:
    """The functions taking the most time of their own over ``repeats`` calls of ``fn``."""
    profile = cProfile.Profile()
    profile.runcall(lambda: [fn() for _ in range(repeats)])
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(lines)
    body = text.getvalue().split("ncalls", 1)[-1]
    print("  ncalls" + body.rstrip())


def triton_launch_costs(params, repeats: int) -> None:
    """One update launch of the Triton backend three ways, for EMA alone (update_kernel, 20
    arguments) and LAWA alone (snapshot_kernel, 4): fastavg's update_, the JIT launch it ends in
    (argument binding and specialisation per call), and a compiled handle launched directly."""
    group = fastavg.Averager(params, fastavg.EMA(), backend="triton")._groups[0]
    ema = torch.zeros(group.numel, dtype=group.average_dtype, device=group.device)
    ring = torch.zeros(WINDOW, group.numel, dtype=group.dtype, device=group.device)
    _launch_costs("EMA", group, ([ema], [0.01], [], []), repeats)
    _launch_costs("LAWA", group, ([], [], [ring], [2]), repeats)


def _launch_costs(name: str, group, buffers: tuple, repeats: int) -> None:
    from fastavg.kernels import table, update

    captured = {}
    launch = update.launch
    update.launch = lambda kernel, work, device, *a, grid_key=None, **meta: captured.update(
        kernel=kernel, work=work, args=a, meta=meta, key=grid_key
    )
    update.update_(group.flat_params, group.table, *buffers)
    update.launch = launch
    kernel, work, a, meta = captured["kernel"], captured["work"], captured["args"], captured["meta"]
    grid = (
        table.balanced_grid(work, table._resident_programs(kernel, group.device.index or 0, a, meta, captured["key"])),
    )
    compiled = kernel.warmup(*a, grid=grid, **meta)
    constexprs = [meta[arg] for arg in kernel.arg_names[len(a) :]]
    runs = {
        f"fastavg update_, {name} ({len(a)} args)": lambda: update.update_(group.flat_params, group.table, *buffers),
        f"JIT kernel[grid](...), {name}": lambda: kernel[grid](*a, **meta),
        # The handle's runner indexes all three grid dimensions.
        f"compiled handle[grid](...), {name}": lambda: compiled[(grid[0], 1, 1)](*a, *constexprs),
    }
    for row, fn in runs.items():
        print(f"triton  {row:32s} {per_call_us(fn, repeats):8.1f} us")


if __name__ == "__main__":
    main()
