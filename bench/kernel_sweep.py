"""The update and swap kernels alone on a GPU, GPT-2 124M shapes, bf16 weights and fp32 averages:
Triton at several block sizes and warp counts, and the native kernels at several threads per block
and vectors per thread per pass, against the measured copy bandwidth.

No Python of step() is timed here (fastavg-bench does that): each row is back-to-back launches of
one kernel, so the table says how close each variant comes to the bandwidth floor, and which block
size each launcher should use. Usage: python bench/kernel_sweep.py (on a GPU; `--device cpu
--quick` is a smoke test of the script itself, with Triton in its interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch

import fastavg
from fastavg.bench.cases import fastavg_case, minimal_bytes_per_element
from fastavg.bench.native_launch import (
    DRIVER_COPIES,
    DRIVER_COPIES_CE,
    current_settings,
    distinct,
    label,
    launch_settings,
    tuning_hooks,
)
from fastavg.bench.shapes import gpt2_shapes
from fastavg.bench.timing import copy_bandwidth_gbps, median_ms
from fastavg.table import CHUNK, build_table

# (averages, rings) due: EMA alone, LAWA alone, EMA and LAWA, all three; and swap (averaged() in and out).
UPDATES = {"ema": (1, 0), "lawa": (0, 1), "ema+lawa": (1, 1), "all": (2, 1), "swap": None}
# The sweep's rows of LAWA alone as the driver's copies, by set_driver_copies' mode.
DRIVER_ROWS = {DRIVER_COPIES: "native, driver's batch copy", DRIVER_COPIES_CE: "native, driver's batch copy, CE"}


def bytes_per_element(name: str) -> int:
    """DESIGN.md's minimal bytes per element, bf16 weights and fp32 averages: the weights read once,
    each average read and written, each ring slot written."""
    if UPDATES[name] is None:
        return minimal_bytes_per_element("swap", 2, 4)
    n_avg, n_ring = UPDATES[name]
    return 2 + n_avg * 2 * 4 + n_ring * 2


def update_args(name, buffers) -> tuple:
    """``update_``'s arguments for ``name``: its averages (EMA then SWA weights) and ring slot."""
    params, table, averages, ring, _ = buffers
    n_avg, n_ring = UPDATES[name]
    return params, table, averages[:n_avg], [0.001, 0.01][:n_avg], [ring] * n_ring, [1] * n_ring


def swap_round_trip(ops, buffers):
    """``averaged()`` in and out through ``ops`` (Triton's swap module or the native ops): two launches."""
    params, table, averages, _, backup = buffers
    return lambda: (ops.swap_in_(params, table, backup, averages[0]), ops.restore_(params, table, backup))


def triton_runs(name, buffers, blocks, warps) -> dict:
    """Triton's kernel for ``name`` at every block size and warp count (swap: its one block size)."""
    from fastavg.kernels import swap, update

    if name == "swap":
        return {"triton": swap_round_trip(swap, buffers)}
    call_args = update_args(name, buffers)
    return {
        f"triton B={b} w={w}": lambda b=b, w=w: update.update_(*call_args, block=b, num_warps=w)
        for b, w in itertools.product(blocks, warps)
    }


def triton_per_row(name, buffers):
    """Triton's kernel for ``name`` (one launch: at most 4 averages and 2 rings) on a grid of one
    program per table row, where its launcher would give a persistent grid."""
    from fastavg.kernels import update

    ((kernel, call_args, constexprs, _),) = update.launches(*update_args(name, buffers))
    rows = buffers[1].shape[0]
    return lambda: kernel[(rows,)](*call_args, **constexprs)


def native_rows(name, fn, tuning, threads, unrolls) -> dict:
    """The sweep's rows of the native ``fn`` for ``name``: kernel label -> (fn, the setting to launch at,
    or None where the build has no tuning hooks: the CPU, or no CUDA kernels), on the persistent grid."""
    if tuning is None:
        return {"native": (fn, None)}
    return {f"native {label(*s)}": (fn, s) for s in distinct(name, itertools.product(threads, unrolls))}


def native_run(name, buffers):
    """The native op(s) for ``name``."""
    ops = torch.ops.fastavg_native
    if name == "swap":
        return swap_round_trip(ops, buffers)
    call_args = update_args(name, buffers)
    return lambda: ops.update_(*call_args)


def rows_of(chunk: int) -> str:
    """A row label's table: ``rows of 2^16``."""
    return f"rows of 2^{chunk.bit_length() - 1}" if chunk & (chunk - 1) == 0 else f"rows of {chunk}"


def default_kernel(name, buffers, available) -> dict:
    """Each backend's own kernel for ``name`` at its defaults over ``buffers``: kernel label -> fn."""
    runs = {}
    if available["triton"] is None:
        from fastavg.kernels import swap, update

        if name == "swap":
            runs["triton"] = swap_round_trip(swap, buffers)
        else:
            call_args = update_args(name, buffers)
            runs["triton"] = lambda: update.update_(*call_args)
    if available["native"] is None:
        runs["native"] = native_run(name, buffers)
    return runs


def over_table(params, buffers, chunk: int) -> tuple:
    """``buffers`` with the table of rows of ``chunk`` elements (the default table's own where ``chunk``
    is its row length)."""
    return (params, buffers[1] if chunk == CHUNK else build_table(params, chunk), *buffers[2:])


def table_rows(name, params, buffers, chunks, available) -> dict:
    """``name`` on each backend's default kernel over tables of other row lengths than the default
    table's (2^15), on the persistent grid: (update, kernel) -> (fn, None)."""
    runs = {}
    for chunk in (c for c in chunks if c != CHUNK):
        for backend, fn in default_kernel(name, over_table(params, buffers, chunk), available).items():
            runs[(name, f"{backend}, {rows_of(chunk)}")] = (fn, None)
    return runs


def lawa_question_rows(
    params, buffers, per_row_chunks, available, tuning, bulk_chunks=(CHUNK,), bulk_kbs=(8,), driver_modes=()
) -> dict:
    """LAWA alone at 89-91% of copy (H200 runs 5-7), rows that ask why: native and Triton with one
    block (program) per row, over tables of several row lengths; native through the TMA's bulk
    copies, and as the driver's copies in each of ``driver_modes``; torch's own copy of the same
    bytes, and torch's gather of them from the same tensors into the same ring slot."""
    runs = {}
    # The persistent grid's drain: its blocks each walk an equal share, ~0.13 ms long, and an SM whose
    # blocks finish first idles to the end. A grid of one block per row (the GPU starts each block as a
    # slot frees) ends within one row's time: 2^13 elements are 16 KB of bf16, four passes of a block.
    # Triton's kernel is launched the same way, a program per row, past its launcher's grid.
    native = available["native"] is None and tuning is not None
    build_setting = current_settings(tuning) if native else None  # the build's threads and unroll
    for chunk in per_row_chunks:
        fine = over_table(params, buffers, chunk)
        if available["triton"] is None:
            runs[("lawa", f"triton, a program per row, {rows_of(chunk)}")] = (triton_per_row("lawa", fine), None)
        if native:
            per_row = build_setting._replace(per_row=True)
            runs[("lawa", f"native, a block per row, {rows_of(chunk)}")] = (native_run("lawa", fine), per_row)
    # The TMA (sm_90; cuda_kernels.cuh's bulk_ring_kernel): one thread per block moves each row in
    # stages of 8 or 32 KB, global -> shared -> global, three loads in flight, where the vector
    # kernel's threads each hold 16-byte loads. On the persistent grid, and over longer rows (fewer
    # table reads and stage restarts); a build whose GPU lacks the TMA runs the vector kernel instead.
    for chunk in bulk_chunks if native else ():
        fine = native_run("lawa", over_table(params, buffers, chunk))
        for kb in bulk_kbs:
            runs[("lawa", f"native, TMA {kb} KB stages, {rows_of(chunk)}")] = (fine, build_setting._replace(bulk=kb))
    # The driver's copies (ops_cuda.cu's copy_rings): one cudaMemcpyBatchAsync of the 148 tensors
    # into the slot, the driver's own copy as the baseline's, with no kernel of fastavg's. If these
    # land near torch's copy_ row while torch's neg lands near fastavg's kernels, the driver's copy
    # is what reaches the baseline, and it becomes LAWA alone's path.
    copies = native_run("lawa", buffers) if native else None
    for mode in driver_modes if native else ():
        runs[("lawa", DRIVER_ROWS[mode])] = (copies, build_setting._replace(driver=mode))
    # LAWA alone is a copy: the parameters into a ring slot, read once and written once, as the copy
    # baseline. torch's copy of the same bytes as one contiguous tensor (cudaMemcpyAsync, the driver's
    # copy) says how near 100% a transfer of that size comes; torch.neg into another tensor is an
    # elementwise kernel of torch's moving the same bytes through the SMs, its blocks walking one
    # window forward; torch.cat of the 148 tensors into the slot is torch's own gather of them (a
    # kernel over batches of tensors, each its own stream), as LAWA reads them.
    flat = torch.cat(params)
    copy_out = torch.empty_like(flat)
    runs[("lawa", "torch copy_, same bytes")] = (lambda: copy_out.copy_(flat), None)
    runs[("lawa", "torch neg (a kernel), same bytes")] = (lambda: torch.neg(flat, out=copy_out), None)
    slot = buffers[3][1]
    runs[("lawa", "torch.cat into the slot")] = (lambda: torch.cat(params, out=slot), None)
    return runs


def writes_the_slot(fn, buffers) -> bool:
    """Whether one call of a LAWA row's ``fn`` writes the parameters into ring slot 1, poisoned first:
    the sweep times variants (grids, tables, the TMA's copies) that no GPU test has run before."""
    params, _, _, ring, _ = buffers
    ring[1].fill_(float("nan"))
    fn()
    return torch.equal(ring[1], torch.cat(params))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    # 8 warps never beat 4 by more than the noise (H200 run 6: LAWA alone 0.133 against 0.131 ms at
    # 1,024 elements, EMA+SWA+LAWA 0.649 against 0.644 at its best): 4 only, unless asked, to leave
    # the sweep's 90 s in gpu_check.sh to the rows over other tables and grids.
    parser.add_argument("--warps", type=int, nargs="+", default=[4])
    parser.add_argument("--threads", type=int, nargs="+", default=[256, 128], help="native CUDA threads per block")
    parser.add_argument("--unroll", type=int, nargs="+", default=[1, 2, 4], help="native CUDA unroll (LAWA, swap)")
    parser.add_argument(
        "--lawa-chunks",
        type=int,
        nargs="+",
        default=[1 << 11, 1 << 12, 1 << 13, 1 << 16, 1 << 17],
        help="also time LAWA alone over tables of these row lengths (the default table's: 2^15)",
    )
    parser.add_argument(
        "--table-chunks",
        type=int,
        nargs="+",
        default=[1 << 13],
        help="also time every other update and swap over tables of these row lengths",
    )
    parser.add_argument(
        "--per-row-chunks",
        type=int,
        nargs="+",
        default=[1 << 13, 1 << 14, CHUNK],
        help="also time LAWA alone with one block (Triton: program) per row, over tables of these row lengths "
        "(native only where the build has tuning hooks: a GPU)",
    )
    parser.add_argument(
        "--bulk-chunks",
        type=int,
        nargs="*",
        default=[CHUNK, 1 << 17],
        help="also time LAWA alone through the TMA's bulk copies over tables of these row lengths (native, a GPU); "
        "none: no such rows (gpu_check.sh, where its bulk probe failed)",
    )
    parser.add_argument(
        "--bulk-kb", type=int, nargs="+", default=[8, 32], help="the TMA rows' KB per shared-memory stage"
    )
    parser.add_argument(
        "--driver-copies",
        type=int,
        nargs="*",
        default=[DRIVER_COPIES, DRIVER_COPIES_CE],
        help="also time LAWA alone as the driver's copies in these modes (1; 2: preferring the copy engines; "
        "native, a GPU); none: no such rows (gpu_check.sh, where its probe of them failed)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernel_sweep.py: no CUDA GPU (--device cpu --quick is a smoke test)")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the timing events are the current device's (as fastavg-bench)
    torch.manual_seed(0)
    shapes = gpt2_shapes(layers=1, dim=64, vocab=100, context=16) if args.quick else gpt2_shapes()
    params = [torch.randn(s, device=device).bfloat16().view(-1) for s in shapes]
    n = sum(p.numel() for p in params)
    averages = [torch.randn(n, device=device) for _ in range(2)]
    ring = torch.zeros(3, -(-n // 8) * 8, dtype=torch.bfloat16, device=device)[:, :n]
    buffers = (params, build_table(params), averages, ring, torch.empty(n, dtype=torch.bfloat16, device=device))
    copy_gbps = copy_bandwidth_gbps(device, 1 << 20 if args.quick else 1 << 30, args.repeats, 3)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}: GPT-2 {n:,} bf16 weights, {buffers[1].shape[0]} rows; copy {copy_gbps:.0f} GB/s")
    # Four decimals and a tenth of a point: LAWA alone's question is a fraction of a point (89.8% of 90%).
    print(f"{'update':8} {'kernel':40} {'ms':>9} {'GB/s':>8} {'% copy':>7}")

    available = fastavg.available_backends(device.type)
    tuning = tuning_hooks() if device.type == "cuda" else None
    runs = {}  # (update, kernel) -> (fn, a native launch Setting or None)
    # LAWA alone first, with the rows that ask why it stays under 90%: gpu_check.sh stops the sweep
    # at 90 s, and the rows measured by then are printed.
    for name in ["lawa", *(u for u in UPDATES if u != "lawa")]:
        if available["triton"] is None:
            triton = triton_runs(name, buffers, args.blocks, args.warps)
            runs.update({(name, kernel): (fn, None) for kernel, fn in triton.items()})
        if available["native"] is None:
            native = native_rows(name, native_run(name, buffers), tuning, args.threads, args.unroll)
            runs.update({(name, kernel): row for kernel, row in native.items()})
        runs.update(
            table_rows(name, params, buffers, args.lawa_chunks if name == "lawa" else args.table_chunks, available)
        )
        if name == "lawa":
            runs.update(
                lawa_question_rows(
                    params,
                    buffers,
                    args.per_row_chunks,
                    available,
                    tuning,
                    args.bulk_chunks,
                    args.bulk_kb,
                    args.driver_copies,
                )
            )
    # The same update through opt.step() as fastavg-bench times it (the Averager's own buffers, the
    # ring slot cycling over 5, a first step that copies): Triton's EMA+SWA+LAWA ran at 84% there
    # and 90% here (H200 runs 3-5) while its grid came from the first step's kernel (update.py).
    for backend in ("triton", "native"):
        if available[backend] is None:
            runs[("all", f"opt.step() {backend}")] = (fastavg_case("all", params, backend).step, None)
    for (name, kernel), (fn, settings) in runs.items():
        try:
            with launch_settings(tuning, *settings) if settings else contextlib.nullcontext():
                checked = name != "lawa" or not kernel.startswith(("native", "triton")) or writes_the_slot(fn, buffers)
                ms = median_ms(fn, device, args.repeats, 1 if args.quick else 3, calls=1 if args.quick else 20)
        except (RuntimeError, ValueError) as err:  # a variant that fails loses its row, not the rows after it
            print(f"{name:8} {kernel:40} FAILED: {str(err).splitlines()[0][:200]}")
            continue
        gbps = n * bytes_per_element(name) / (ms * 1e-3) / 1e9
        wrong = "" if checked else "  WRONG: the ring slot differs from the parameters"
        print(f"{name:8} {kernel:40} {ms:9.4f} {gbps:8.0f} {100 * gbps / copy_gbps:6.1f}%{wrong}")


if __name__ == "__main__":
    main()
