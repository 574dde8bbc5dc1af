"""The native CUDA kernels' launch settings, for the benchmarks: threads per block, the unroll
(vectors per thread per pass of ring-only updates and swaps, as a multiple of one), the grid
(persistent, or one block per table row), and LAWA alone through the TMA's bulk copies (sm_90+) or
as the driver's copies (cudaMemcpyBatchAsync).

They are process-wide tuning hooks of the CUDA build (``torch.ops.fastavg_native_tuning``): the
benchmarks set them around a call, so native rows at other settings are timed in the same run as
the default ones, against the same copy.
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import torch

# The updates whose native kernels set_unroll changes: ring-only updates (LAWA alone) and the vector
# swaps. Every other kernel has one instance and ignores it.
UNROLLED = ("lawa", "swap")
# The update set_bulk_rings and set_driver_copies change: ring-only updates, whose bulk kernel and
# driver's copies have no unroll.
BULK = ("lawa",)
# set_driver_copies' modes: the driver's copies, and the same asking it to prefer the copy engines.
DRIVER_COPIES, DRIVER_COPIES_CE = 1, 2
# KB per shared-memory stage of the TMA's copies where a setting says "/bulk" with no number.
DEFAULT_BULK_KB = 8


class Setting(NamedTuple):
    """One launch setting: threads per block, the unroll, whether the grid is one block per table row
    (else the persistent grid), the KB per stage of LAWA alone's TMA bulk copies (0: the vector
    kernel), and LAWA alone as the driver's copies (DRIVER_COPIES or DRIVER_COPIES_CE; 0: a kernel).
    A ``[threads, unroll]`` recorded before the grid was a setting (runs 6 and 7) reads as
    ``Setting(*it)``: the persistent grid, no bulk copies; so does a ``[threads, unroll, per_row]``."""

    threads: int
    unroll: int = 1
    per_row: bool = False
    bulk: int = 0
    driver: int = 0


def tuning_hooks():
    """The native CUDA build's hooks (set_block_threads, set_unroll, set_block_per_row,
    set_bulk_rings, set_driver_copies), or None where the build has none: no CUDA kernels, or no
    native extension at all."""
    from .. import native_backend  # noqa: F401  (loading fastavg._C registers the hooks)

    hooks = torch.ops.fastavg_native_tuning
    return hooks if hasattr(hooks, "set_unroll") else None


def _set(hook, value: int, what: str) -> int:
    # The hooks refuse by returning -1, not by raising (csrc/cuda_binding.cpp): their old error,
    # with the number in its message, crashed the process on the H200 image (csrc/error_text.h).
    previous = hook(value)
    if previous < 0:
        raise ValueError(f"{what}, got {value}")
    return previous


def set_block_threads(hooks, threads: int) -> int:
    """Threads per block of later native update and swap launches; the previous value. ValueError
    (nothing changed) for one the kernels cannot run."""
    return _set(hooks.set_block_threads, threads, "threads per block must be a multiple of 32 from 32 to 256")


def set_unroll(hooks, unroll: int) -> int:
    """Vectors per thread per pass of later ring-only and swap launches, as a multiple of one; the
    previous value. ValueError (nothing changed) for one the kernels cannot run."""
    return _set(hooks.set_unroll, unroll, "unroll must be 1, 2 or 4")


def set_block_per_row(hooks, on: bool) -> bool:
    """Later native update and swap launches with one block per table row (True) or the persistent
    grid of at most the blocks resident at once (False, the default); the previous value."""
    return bool(_set(hooks.set_block_per_row, int(on), "block_per_row must be 0 or 1"))


def set_bulk_rings(hooks, stage_kb: int) -> int:
    """Later native ring-only updates (LAWA alone) through the TMA's bulk copies in stages of
    ``stage_kb`` KB (on GPUs of compute capability 9 and later; elsewhere as before), or the vector
    kernel (0, the default); the previous value."""
    return _set(hooks.set_bulk_rings, int(stage_kb), "bulk stages must be 0 (off) or 4, 8, 16 or 32 KB")


def set_driver_copies(hooks, mode: int) -> int:
    """Later native ring-only updates (LAWA alone) as the driver's copies, one cudaMemcpyBatchAsync
    per update (DRIVER_COPIES; DRIVER_COPIES_CE: asking it to prefer the copy engines), or the
    kernels (0, the default); the previous value. ValueError in builds of CUDA before 13.0."""
    return _set(hooks.set_driver_copies, int(mode), "driver copies must be 0 (off), 1 or 2 (copy engines), in a "
                "build of CUDA 13.0 or later")  # fmt: skip


@contextlib.contextmanager
def launch_settings(hooks, threads: int, unroll: int, block_per_row: bool = False, bulk: int = 0, driver: int = 0):
    """Native launches at ``threads`` per block and ``unroll`` times one vector per thread per pass,
    with one block per table row if ``block_per_row``, LAWA alone through the TMA's copies in stages
    of ``bulk`` KB if not 0 and as the driver's copies in mode ``driver`` if not 0, inside the block;
    then the settings before."""
    with contextlib.ExitStack() as undo:  # each setting made is undone, also when a later one is refused
        undo.callback(set_block_threads, hooks, set_block_threads(hooks, threads))
        undo.callback(set_unroll, hooks, set_unroll(hooks, unroll))
        if block_per_row:
            undo.callback(set_block_per_row, hooks, set_block_per_row(hooks, True))
        if bulk:
            undo.callback(set_bulk_rings, hooks, set_bulk_rings(hooks, bulk))
        if driver:
            undo.callback(set_driver_copies, hooks, set_driver_copies(hooks, driver))
        yield


def current_settings(hooks) -> Setting:
    """The setting launches use now (each hook read by setting a value and putting the old one back)."""
    threads, unroll = set_block_threads(hooks, 128), set_unroll(hooks, 1)
    per_row, bulk = set_block_per_row(hooks, False), set_bulk_rings(hooks, 0)
    set_block_threads(hooks, threads)
    set_unroll(hooks, unroll)
    set_block_per_row(hooks, per_row)
    set_bulk_rings(hooks, bulk)
    # A build of CUDA before 13.0 refuses every mode of the driver's copies, 0 too: it has none.
    driver = hooks.set_driver_copies(0)
    if driver > 0:
        set_driver_copies(hooks, driver)
    return Setting(threads, unroll, per_row, bulk, max(driver, 0))


def parse_setting(text: str) -> Setting:
    """``"128"`` -> (128, 1); ``"128x2"`` -> (128, 2); ``"128x2/row"`` -> (128, 2) with one block per
    table row; ``"128/bulk"``, ``"128/bulk32"``: LAWA alone through the TMA's copies in stages of 8
    (DEFAULT_BULK_KB) or 32 KB; ``"128/copy"``, ``"128/copyce"``: LAWA alone as the driver's copies
    (DRIVER_COPIES, DRIVER_COPIES_CE). The hooks check the values themselves."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?(/row)?(/bulk(\d*))?(/copy(ce)?)?", text)
    if match is None:
        raise ValueError(
            f"{text!r} is not THREADS[xUNROLL][/row][/bulk[KB]][/copy|/copyce] (e.g. 128, 256x2, 128x2/row, "
            "128/bulk, 128/bulk32 or 128/copy)"
        )
    bulk = int(match[5] or DEFAULT_BULK_KB) if match[4] else 0
    driver = (DRIVER_COPIES_CE if match[7] else DRIVER_COPIES) if match[6] else 0
    return Setting(int(match[1]), int(match[2] or 1), match[3] is not None, bulk, driver)


def label(threads: int, unroll: int, per_row: bool = False, bulk: int = 0, driver: int = 0) -> str:
    """A row's name for a setting: ``T=128``, ``T=256 x2``, ``T=128 x2 per row``, ``T=128 bulk 8K``,
    ``T=128 driver copies``, ``T=128 driver copies CE``."""
    return (
        f"T={threads}"
        + (f" x{unroll}" if unroll > 1 else "")
        + (" per row" if per_row else "")
        + (f" bulk {bulk}K" if bulk else "")
        + ({DRIVER_COPIES: " driver copies", DRIVER_COPIES_CE: " driver copies CE"}.get(driver, ""))
    )


def effective(update: str, setting) -> Setting:
    """The setting as ``update``'s kernels see it: the unroll changes only LAWA alone and swap, and
    not LAWA alone through the bulk copies, which change only LAWA alone; the grid, every update and
    swap. The driver's copies change only LAWA alone, and take it whatever else is set."""
    threads, unroll, per_row, bulk, driver = Setting(*setting)
    driver = int(driver) if update in BULK else 0
    bulk = int(bulk) if update in BULK and not driver else 0
    return Setting(
        threads, unroll if update in UNROLLED and not (bulk or driver) else 1, per_row and not driver, bulk, driver
    )


def distinct(update: str, settings) -> list[Setting]:
    """``settings`` as ``update``'s kernels see them (effective), each once, in order."""
    return list(dict.fromkeys(effective(update, s) for s in settings))


def pct_of_copy_by_setting(records: list[dict], settings, default) -> dict[str, dict[str, float]]:
    """Native's % of copy per launch setting (the default first), per "update dtype": a setting's own
    row where it changes the update's launches, else the row of the setting it equals there. The
    default can move to the setting whose worst row is best, with its numbers already measured."""
    rows = {(r["update"], r["dtype"], r["impl"]): r["pct_of_copy"] for r in records}
    default = Setting(*default)
    table = {}
    for setting in dict.fromkeys([default, *(Setting(*s) for s in settings)]):
        name = label(*setting) + (" (default)" if setting == default else "")
        table[name] = {}
        for update, dtype in dict.fromkeys((r["update"], r["dtype"]) for r in records):
            runs = effective(update, setting)
            impl = "fastavg-native" + ("" if runs == effective(update, default) else f" {label(*runs)}")
            if (update, dtype, impl) in rows:
                table[name][f"{update} {dtype}"] = round(rows[(update, dtype, impl)], 1)
    return table
