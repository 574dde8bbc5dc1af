"""Does LAWA alone through the TMA's bulk copies (set_bulk_rings) run, and write the right slot?

bulk_ring_kernel (csrc/cuda_kernels.cuh) is timed by the sweep and the benchmark, and run by the
cuda tests, before any GPU has run it: a wrong barrier phase would hang the process, and take each
stage's whole time limit with it. gpu_check.sh runs this first, in a child with a time limit, and
leaves the bulk copies out of everything else if it fails. Usage: python bench/bulk_probe.py

Prints "bulk probe: ..." lines. Exits 0 when the bulk copies wrote every slot right (or this GPU has
no TMA, and the launcher ran the vector kernel), 1 when a slot was wrong, 2 when there is nothing
to probe (no GPU, or no native CUDA build).
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> int:
    import fastavg
    from fastavg.bench import native_launch
    from fastavg.table import build_table

    if not torch.cuda.is_available() or fastavg.available_backends("cuda")["native"] is not None:
        print("bulk probe: nothing to probe (no GPU, or no native CUDA build)")
        return 2
    hooks = native_launch.tuning_hooks()
    major, minor = torch.cuda.get_device_capability()
    # Odd sizes, a row longer than the default (2^15 elements: several 8 KB stages), a tail, a
    # one-element tensor: every path of the kernel, in a few milliseconds.
    params = [torch.randn(n, device="cuda").bfloat16() for n in (4099, 1 << 16, 7, 1, 100_003)]
    n = sum(p.numel() for p in params)
    rings = [torch.full((3, -(-n // 8) * 8), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    table = build_table(params)
    expected = torch.cat(params)
    started = time.perf_counter()
    for kb in (4, 8, 32):  # the smallest stage, the sweep's two (32 KB: past the 48 KB opt-in)
        with native_launch.launch_settings(hooks, 128, 2, bulk=kb):
            for count in (1, 2):
                for ring in rings:
                    ring.fill_(float("nan"))
                torch.ops.fastavg_native.update_(params, table, [], [], [r[:, :n] for r in rings[:count]], [1] * count)
                torch.cuda.synchronize()
                for ring in rings[:count]:
                    if not torch.equal(ring[1, :n], expected):
                        wrong = (ring[1, :n] != expected).sum().item()
                        print(f"bulk probe: WRONG, {wrong} of {n} elements differ ({kb} KB stages, {count} ring(s))")
                        return 1
                    if not (ring[0].isnan().all() and ring[2].isnan().all() and ring[1, n:].isnan().all()):
                        print(f"bulk probe: WRONG, written outside the slot ({kb} KB stages, {count} ring(s))")
                        return 1
    what = "the TMA's bulk copies" if major >= 9 else f"the vector kernel (sm_{major}{minor}: no TMA)"
    seconds = time.perf_counter() - started
    print(f"bulk probe: ok, {n} elements into 1 and 2 rings, stages of 4, 8 and 32 KB, by {what} in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
