"""Does LAWA alone through the TMA's bulk copies (set_bulk_rings), or as the driver's copies
(set_driver_copies, with --driver-copies), run, and write the right slot?

Both are timed by the sweep and the benchmark, and run by the cuda tests, before any GPU has run
them: a wrong barrier phase in bulk_ring_kernel (csrc/cuda_kernels.cuh) would hang the process and
take each stage's whole time limit with it; a batch of copies the driver refuses would fail every
row of them. gpu_check.sh runs this first, in a child with a time limit, and leaves what failed out
of everything else. Usage: python bench/bulk_probe.py [--driver-copies]

Prints "bulk probe: ..." (or "driver copy probe: ...") lines. Exits 0 when every slot was written
right (or this GPU has no TMA, and the launcher ran the vector kernel), 1 when a slot was wrong or
the copies failed, 2 when there is nothing to probe (no GPU, or no native CUDA build).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def wrong_slot(params, table, rings, count: int) -> str | None:
    """One LAWA-alone update into slot 1 of ``count`` poisoned rings, at the current launch setting:
    None when it wrote every element of the slot and nothing else, else what went wrong."""
    n = sum(p.numel() for p in params)
    expected = torch.cat(params)
    for ring in rings:
        ring.fill_(float("nan"))
    torch.ops.fastavg_native.update_(params, table, [], [], [r[:, :n] for r in rings[:count]], [1] * count)
    torch.cuda.synchronize()
    for ring in rings[:count]:
        if not torch.equal(ring[1, :n], expected):
            return f"{(ring[1, :n] != expected).sum().item()} of {n} elements differ"
        if not (ring[0].isnan().all() and ring[2].isnan().all() and ring[1, n:].isnan().all()):
            return "written outside the slot"
    return None


def main(argv=None) -> int:
    import fastavg
    from fastavg.bench import native_launch
    from fastavg.table import build_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver-copies", action="store_true", help="probe the driver's copies, not the TMA's")
    args = parser.parse_args(argv)
    name = "driver copy probe" if args.driver_copies else "bulk probe"
    if not torch.cuda.is_available() or fastavg.available_backends("cuda")["native"] is not None:
        print(f"{name}: nothing to probe (no GPU, or no native CUDA build)")
        return 2
    hooks = native_launch.tuning_hooks()
    major, minor = torch.cuda.get_device_capability()
    # Odd sizes, a row longer than the default (2^15 elements: several 8 KB stages), a tail, a
    # one-element tensor: every path of the kernel, in a few milliseconds.
    params = [torch.randn(n, device="cuda").bfloat16() for n in (4099, 1 << 16, 7, 1, 100_003)]
    n = sum(p.numel() for p in params)
    rings = [torch.full((3, -(-n // 8) * 8), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    table = build_table(params)
    if args.driver_copies:  # both modes; 1 and 2 rings
        settings = {f"mode {m}": {"driver": m} for m in (native_launch.DRIVER_COPIES, native_launch.DRIVER_COPIES_CE)}
        what = "the driver's batch copies, modes 1 and 2"
    else:  # the smallest stage, the sweep's two (32 KB: past the 48 KB opt-in)
        settings = {f"{kb} KB stages": {"bulk": kb} for kb in (4, 8, 32)}
        what = "stages of 4, 8 and 32 KB, by " + (
            "the TMA's bulk copies" if major >= 9 else f"the vector kernel (sm_{major}{minor}: no TMA)"
        )
    started = time.perf_counter()
    for label, setting in settings.items():
        for count in (1, 2):
            try:
                with native_launch.launch_settings(hooks, 128, 2, **setting):
                    wrong = wrong_slot(params, table, rings, count)
            except (RuntimeError, ValueError) as err:
                print(f"{name}: FAILED, {str(err).splitlines()[0][:300]} ({label}, {count} ring(s))")
                return 1
            if wrong:
                print(f"{name}: WRONG, {wrong} ({label}, {count} ring(s))")
                return 1
    seconds = time.perf_counter() - started
    print(f"{name}: ok, {n} elements into 1 and 2 rings, {what} in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
