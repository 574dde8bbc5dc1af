"""The update kernels alone on a GPU, GPT-2 124M shapes, bf16 weights and fp32 averages: Triton at
several block sizes and warp counts, and the native kernel, against the measured copy bandwidth.

No Python of step() is timed here (fastavg-bench does that): each row is back-to-back launches of
one kernel, so the table says how close each variant comes to the bandwidth floor, and which block
size the Triton launcher should use. Usage: python bench/kernel_sweep.py (on a GPU; `--device cpu
--quick` is a smoke test of the script itself, with Triton in its interpreter)
"""

from __future__ import annotations

import argparse
import itertools

import torch

import fastavg
from fastavg.bench.cases import fastavg_case, minimal_bytes_per_element
from fastavg.bench.shapes import gpt2_shapes
from fastavg.bench.timing import copy_bandwidth_gbps, median_ms
from fastavg.table import build_table

# (averages, rings) due: EMA alone, LAWA alone, EMA + SWA + LAWA.
UPDATES = {"ema": (1, 0), "lawa": (0, 1), "all": (2, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernel_sweep.py: no CUDA GPU (--device cpu --quick is a smoke test)")
    torch.manual_seed(0)
    shapes = gpt2_shapes(layers=1, dim=64, vocab=100, context=16) if args.quick else gpt2_shapes()
    params = [torch.randn(s, device=device).bfloat16().view(-1) for s in shapes]
    n = sum(p.numel() for p in params)
    table = build_table(params)
    averages = [torch.randn(n, device=device) for _ in range(2)]
    ring = torch.zeros(3, -(-n // 8) * 8, dtype=torch.bfloat16, device=device)[:, :n]
    copy_gbps = copy_bandwidth_gbps(device, 1 << 20 if args.quick else 1 << 30, args.repeats, 3)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}: GPT-2 {n:,} bf16 weights, {table.shape[0]} rows; copy {copy_gbps:.0f} GB/s")
    print(f"{'update':6} {'kernel':24} {'ms':>8} {'GB/s':>8} {'% copy':>7}")

    available = fastavg.available_backends(device.type)
    runs = {}
    for name, (n_avg, n_ring) in UPDATES.items():
        call_args = (params, table, averages[:n_avg], [0.001, 0.01][:n_avg], [ring] * n_ring, [1] * n_ring)
        if available["triton"] is None:
            from fastavg.kernels import update

            for block, warps in itertools.product(args.blocks, args.warps):
                runs[(name, f"triton B={block} w={warps}")] = lambda a=call_args, b=block, w=warps: update.update_(
                    *a, block=b, num_warps=w
                )
        if available["native"] is None:
            runs[(name, "native")] = lambda a=call_args: torch.ops.fastavg_native.update_(*a)
    # The same update through opt.step() as fastavg-bench times it (the Averager's own buffers, the
    # ring slot cycling over 5): Triton's EMA+SWA+LAWA ran at 84% there and 90% here (H200 runs
    # 3-5), native at 91% in both; these rows tell the kernel from what surrounds it.
    for backend in ("triton", "native"):
        if available[backend] is None:
            runs[("all", f"opt.step() {backend}")] = fastavg_case("all", params, backend).step
    for (name, kernel), fn in runs.items():
        ms = median_ms(fn, device, args.repeats, 1 if args.quick else 3, calls=1 if args.quick else 20)
        gbps = n * minimal_bytes_per_element(name, 2, 4) / (ms * 1e-3) / 1e9
        print(f"{name:6} {kernel:24} {ms:8.3f} {gbps:8.0f} {100 * gbps / copy_gbps:6.0f}%")


if __name__ == "__main__":
    main()
