"""Host (Python) cost of Averager.step() per training step, over GPT-2 124M's 148 parameter tensors.

Each tensor is shrunk to at most 64 elements, so what is timed is the Python side and op dispatch,
not memory traffic.  Usage: python bench/step_overhead.py [--backends torch triton] [--device cpu]
"""

import argparse
import time

import torch

import fastavg
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
        }
        for name, fn in rows.items():
            # Host time per call: on a GPU the launches are asynchronous, so this is the Python
            # and launch cost a training step pays, not the kernel's time.
            print(f"{backend:7s} {name:32s} {per_call_us(fn, args.repeats):8.1f} us")


if __name__ == "__main__":
    main()
