"""The native backend's CUDA kernels, built for the host and run on CPU tensors thread by thread
(tests/cuda_host/emulate.cpp): the per-op suite of test_ops.py checks their arithmetic, table walk,
vector and scalar paths, launch splitting and bf16/fp16 rounding here, with no GPU. What a host
build cannot check (the occupancy query, streams, real memory access) is left to the cuda tests."""

import pytest
import torch
from cuda_emulator import DEFAULT_THREADS, DEFAULT_UNROLL, build
from cuda_emulator import backend as emulated_backend

# Collected here too, with this module's `target`: the emulated kernels.
from test_ops import (  # noqa: F401
    test_bfloat16_rounding_is_nearest_even_with_ties_and_specials,
    test_empty_parameters,
    test_ring_mean_and_swap_in_ring,
    test_swap_in_and_restore,
    test_update_lerps_and_writes_ring_slots,
    test_update_of_one_average_alone_and_with_a_ring,
    test_update_of_rings_alone,
    test_update_with_many_averages_and_rings,
    test_update_with_only_rings_or_only_averages,
    test_weights_keep_float64_precision,
)

from fastavg.table import CHUNK


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        return build(tmp_path_factory.mktemp("cuda_emulated"))
    except RuntimeError as err:
        pytest.skip(str(err))


@pytest.fixture(
    params=[(2, 128, 2, 0, False), (1, 256, 1, 0, False), (3, 128, 1, 0, False), (2, 96, 4, 0, False),
            (1 << 30, 128, 2, 0, False), (2, 128, 2, 8, False), (3, 96, 2, 32, False), (2, 128, 2, 0, True)],
    ids=[
        "default-128-threads-unroll-2",
        "1-block-256-threads",
        "3-blocks-128-threads",
        "2-blocks-96-threads-unroll-4",
        "a-block-per-row",
        "bulk-copies-8k",
        "bulk-copies-32k",
        "driver-copies",
    ],
)  # fmt: skip
def target(request, emulator):
    """The emulated kernels with a GPU that holds 1 to 3 blocks at once (blocks walk many rows), at
    the CUDA build's default (128 threads per block, two vectors per thread per pass for ring-only
    updates and swaps) and the sweep's other settings (set_block_threads, set_unroll; at 96 threads
    a row's last pass is partial; set_block_per_row: a grid of as many blocks as rows, each walking
    one; set_bulk_rings: LAWA alone through the TMA's copies in stages of 8 and 32 KB, in
    emulate.cpp's model of them; set_driver_copies: LAWA alone as the binding's list of copies)."""
    most_blocks, threads, unroll, bulk_kb, driver = request.param
    backend = emulated_backend(emulator, most_blocks, threads, unroll, bulk_kb, driver_copies=driver)
    return backend, "cpu"


# (1056, 1056): as many rows as slots, one round, not two. (2, 3) and (5, 2): two rows, and two
# slots, the least that the clamps to 1 must leave alone.
@pytest.mark.parametrize(
    "items, most", [(1995, 1056), (1995, 792), (1, 3), (0, 3), (7, 1), (1057, 1056), (1056, 1056), (2, 3), (5, 2)]
)
def test_balanced_blocks_matches_the_triton_grid(emulator, items, most):
    from fastavg.kernels.table import balanced_grid

    assert emulator.emulate_balanced_blocks(items, most) == balanced_grid(items, most)


def test_rows_longer_than_a_block_stride_and_several_per_block(target):
    """Two full table rows and a tail, bf16 into float32: every element exactly once."""
    backend, _ = target
    from test_ops import _bind

    params = [torch.randn(2 * CHUNK + 11).bfloat16(), torch.randn(5).bfloat16()]
    impls, flat, table = _bind(backend, params, "cpu")
    assert table.shape[0] == 4
    averages = [torch.zeros(2 * CHUNK + 16)]
    impls["update_"](flat, table, averages, [1.0], [], [])
    assert torch.equal(averages[0], torch.cat(params).float())


def test_pairs_the_build_lacks_are_refused(target):
    """Averages must hold the parameters exactly; the launchers compile only such pairs and refuse
    others (fp16 averages of bf16 weights, fp32 of fp64) instead of launching nothing silently."""
    backend, _ = target
    from test_ops import _bind

    params = [torch.randn(9).bfloat16()]
    impls, flat, table = _bind(backend, params, "cpu")
    with pytest.raises(RuntimeError, match="unsupported"):
        impls["update_"](flat, table, [torch.zeros(9, dtype=torch.float16)], [0.5], [], [])
    wide_params = [torch.randn(9, dtype=torch.float64)]
    wide_impls, wide_flat, wide_table = _bind(backend, wide_params, "cpu")
    with pytest.raises(RuntimeError, match="unsupported"):  # a float, a narrower one
        wide_impls["update_"](wide_flat, wide_table, [torch.zeros(9)], [0.5], [], [])
    averages = [torch.zeros(9, dtype=torch.bfloat16), torch.zeros(9, dtype=torch.float64)]
    for average in averages:  # the same dtype, and a wider float: compiled
        impls["update_"](flat, table, [average], [1.0], [], [])
        assert torch.equal(average, params[0].to(average.dtype))


def test_the_default_target_is_the_cuda_builds_default_launch():
    """The emulator's defaults (the `default-128-threads-unroll-2` target) must be what ops_cuda.cu
    launches with, or the per-op suite checks a setting the GPU never runs by default."""
    import pathlib
    import re

    from cuda_emulator import DEFAULT_THREADS, DEFAULT_UNROLL

    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    kernels, launchers = (csrc / "cuda_kernels.cuh").read_text(), (csrc / "ops_cuda.cu").read_text()
    named = {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", kernels)}
    threads = re.search(r"std::atomic<int> block_threads\{(\w+)\};", launchers)[1]
    unroll = re.search(r"std::atomic<int> unroll\{(\w+)\};", launchers)[1]
    assert (named.get(threads), named.get(unroll, 1 if unroll == "1" else None)) == (DEFAULT_THREADS, DEFAULT_UNROLL)


def _vector_bytes(table: torch.Tensor, width: int, bytes_per_element: int) -> int:
    """What the vector loops move: the whole vectors of ``width`` elements of every aligned row."""
    aligned = table[:, 3] != 0
    return int((table[aligned, 2] // width * width).sum()) * bytes_per_element


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize(
    "dtype, average_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("threads, unroll", [(DEFAULT_THREADS, DEFAULT_UNROLL), (96, 4)], ids=["default", "96x4"])
def test_aligned_rows_move_as_vectors_and_nothing_else_does(
    emulator, dtype, average_dtype, misaligned, threads, unroll
):
    """Element by element gives the values the vector loops give, so the per-op suite would pass a
    kernel that never took its vector loop (on a GPU, a fraction of the bandwidth) or one that took it
    on a misaligned row (a fault on a GPU; an x86 host allows it). The emulator counts the bytes each
    vector access moves: every aligned row's whole vectors of 16 bytes of the widest dtype touched
    (of the parameters' where only they and rings are), in each buffer an op reads or writes."""
    from test_ops import _aligned_ring, _bind, _params

    sizes = [4101, 3, 2 * CHUNK + 14, 1]  # rows aligned and not, with whole vectors and tails of each width
    params = _params(sizes, dtype, "cpu", misaligned=misaligned)
    impls, flat, table = _bind(emulated_backend(emulator, 2, threads, unroll), params, "cpu")
    n, p_bytes, a_bytes = sum(sizes), dtype.itemsize, average_dtype.itemsize
    wide, narrow = 16 // max(p_bytes, a_bytes), 16 // p_bytes
    averages = [torch.zeros(n, dtype=average_dtype) for _ in range(2)]
    ring = _aligned_ring(2, n, dtype)
    backup = torch.empty(n, dtype=dtype)
    calls = [
        ("update_", (averages[:1], [0.5], [], []), wide, p_bytes + 2 * a_bytes),  # EMA: p; average read, written
        ("update_", (averages, [0.5, 0.25], [ring], [1]), wide, 2 * p_bytes + 4 * a_bytes),  # and a ring slot
        ("update_", ([], [], [ring], [0]), narrow, 2 * p_bytes),  # LAWA alone: p into the slot
        ("swap_in_", (backup, averages[0]), wide, 3 * p_bytes + a_bytes),  # p to backup, average to p
        ("restore_", (backup,), narrow, 2 * p_bytes),
        ("swap_in_ring_", (backup, ring, 2, average_dtype), narrow, 3 * p_bytes),  # the ring read element-wise
        ("restore_", (backup,), narrow, 2 * p_bytes),
    ]
    emulator.emulate_take_vector_bytes()
    for op, args, width, bytes_per_element in calls:
        impls[op](flat, table, *args)
        expected = _vector_bytes(table, width, bytes_per_element)
        assert (expected == 0) == misaligned  # views one element in: no row is aligned
        assert emulator.emulate_take_vector_bytes() == expected, op
    # A buffer off 16 bytes takes every row off the vector loops (cuda_binding.cpp's vectors_ok).
    impls["update_"](flat, table, [torch.zeros(n + 1, dtype=average_dtype)[1:]], [0.5], [], [])
    impls["swap_in_"](flat, table, backup, torch.zeros(n + 1, dtype=average_dtype)[1:])
    assert emulator.emulate_take_vector_bytes() == 0


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_unroll_applies_to_lawa_alone_and_to_swaps_of_an_average_or_the_backup(emulator, unroll):
    """set_unroll picks the kernel instance of ring-only updates and of swap modes 0 and 2; updates
    with averages and swap-ins from a ring have one instance (Unroll 1). Every instance gives the same
    values, so only the emulator's note of the instance launched (FASTAVG_NOTE_UNROLL) tells a
    launcher that ignored the setting, whose "x4" benchmark rows would time x1."""
    from test_ops import _aligned_ring, _bind, _params

    sizes = [4101, 3]
    impls, flat, table = _bind(
        emulated_backend(emulator, 2, DEFAULT_THREADS, unroll), _params(sizes, torch.bfloat16, "cpu"), "cpu"
    )
    n = sum(sizes)
    average, ring, backup = torch.zeros(n), _aligned_ring(2, n, torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    calls = [
        ("update_", ([average], [0.5], [], []), 1),
        ("update_", ([average], [0.5], [ring], [0]), 1),
        ("update_", ([], [], [ring], [1]), unroll),  # LAWA alone
        ("swap_in_", (backup, average), unroll),
        ("restore_", (backup,), unroll),
        ("swap_in_ring_", (backup, ring, 2, torch.float32), 1),
        ("restore_", (backup,), unroll),
    ]
    emulator.emulate_take_unroll()
    for op, args, expected in calls:
        impls[op](flat, table, *args)
        assert emulator.emulate_take_unroll() == expected, op
