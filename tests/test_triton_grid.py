"""How the Triton launches are sized (persistent, balanced, from the compiled kernel's registers),
and the interpreter fix that lets the kernels run on Triton 3.6 with numpy >= 2.4."""

import contextlib
import types
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton", minversion="3.2")  # fastavg.triton_backend.MIN_TRITON
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastavg.kernels import access, interpreter_fix, ring_mean, swap, table, update  # noqa: E402
from test_ops import TOL, _bind, _params, _randn  # noqa: E402

from fastavg.table import CHUNK  # noqa: E402

# What torch reports for an H100 SXM (and an H200: the same SM).
HOPPER = types.SimpleNamespace(
    warp_size=32,
    regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048,
    shared_memory_per_multiprocessor=233472,
    multi_processor_count=132,
)


@pytest.mark.parametrize(
    "work, most, expected",
    [
        (1995, 1056, 998),  # two rows each, instead of 117 programs with one
        (3892, 1584, 1298),  # GPT-2 124M's rows at CHUNK 2^15, the bf16 EMA kernel's slots on an H200
        (1995, 1584, 998),
        (1995, 792, 665),
        (500, 1056, 500),  # fewer rows than slots: one each
        (1056, 1056, 1056),
        (1057, 1056, 529),
        (0, 1056, 1),  # an empty launch still has one program
        (7, 1, 1),
    ],
)
def test_balanced_grid(work, most, expected):
    grid = table.balanced_grid(work, most)
    assert grid == expected and 1 <= grid <= max(1, most)
    per_program = [len(range(p, max(work, 1), grid)) for p in range(grid)]
    assert max(per_program) - min(per_program) <= 1  # an equal share, one fewer at worst
    assert max(per_program) == -(-max(work, 1) // most)  # no more rounds than the slots need


@pytest.mark.parametrize(
    "n_regs, shared, warps, expected",
    [
        (40, 4096, 4, 12),  # the bf16 EMA update (ptxas: 40 registers): registers limit it
        (104, 4096, 4, 4),  # 4 averages + 2 rings: 104 registers
        (32, 0, 8, 8),  # 256 threads at 32 registers: a full SM
        (16, 0, 4, 16),  # few registers: threads limit it
        (32, 64 * 1024, 4, 3),  # shared memory limits it
        (255, 0, 4, 2),
        (1, 0, 1, 32),  # the SM's block limit
        (41, 0, 4, 10),  # 1,312 registers a warp, allocated as 1,536
        (64, 0, 4, 8),  # 2,048 a warp: exactly 8 units of 256
        (255, 0, 32, 1),  # none fits by registers (such a launch would fail): one program, never zero
    ],
)
def test_programs_per_sm(n_regs, shared, warps, expected):
    assert table.programs_per_sm(n_regs, shared, warps, HOPPER) == expected


def test_vector_width_is_16_bytes_of_the_widest_dtype():
    assert table.vector_width(torch.bfloat16, torch.float32) == 4  # bf16 weights, fp32 averages
    assert table.vector_width(torch.bfloat16) == 8  # LAWA alone: the weights only
    assert table.vector_width(torch.float32, torch.float64) == 2
    assert table.vector_width(torch.float16, torch.float16) == 8


def test_interpreter_fix_squeezes_one_element_arrays(monkeypatch):
    """Triton 3.6's interpreter: int() of a (1,) array, a TypeError from numpy 2.4 on."""
    from triton.runtime import interpreter

    class Scope:
        def set_attr(self, cls, name, value):
            setattr(cls, name, value)

    def unfixed(tensor, scope):  # the code of Triton 3.6
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", unfixed)
    assert interpreter_fix.apply()
    interpreter._patch_lang_tensor(Tensor, Scope())
    assert range(Tensor(np.array([2], dtype=np.int32)), 9, Tensor(np.array([3])))[-1] == 8
    assert not interpreter_fix.apply()  # applied once


def test_interpreter_fix_squeezes_under_tritons_before_3_6(monkeypatch):
    """Triton 3.2 to 3.5 (torch 2.6 to 2.10) patch the tensor class with no scope argument."""
    from triton.runtime import interpreter

    def unfixed(tensor):  # the code of Triton 3.5
        tensor.__index__ = lambda self: int(self.handle.data)

    class Tensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", unfixed)
    assert interpreter_fix.apply()
    interpreter._patch_lang_tensor(Tensor)
    assert range(Tensor(np.array([2], dtype=np.int32)), 9, Tensor(np.array([3])))[-1] == 8


def test_interpreter_fix_leaves_a_fixed_triton_alone(monkeypatch):
    from triton.runtime import interpreter

    def fixed(tensor, scope):  # upstream's fix (triton-lang/triton#9171)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", fixed)
    assert not interpreter_fix.apply()
    assert interpreter._patch_lang_tensor is fixed


@pytest.mark.cuda
def test_grid_comes_from_the_compiled_kernel():
    """On a GPU the launch reads the kernel's registers; the fixed fallback grid is not used."""
    import fastavg

    table._RESIDENT.clear()
    params = [torch.nn.Parameter(torch.randn(70_000, device="cuda").bfloat16()) for _ in range(3)]
    averager = fastavg.Averager(params, {"ema": fastavg.EMA(0.9), "lawa": fastavg.LAWA(3, every=1)}, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        averager.step()
        averager.step()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert table._RESIDENT and all(most % sms == 0 and most >= sms for most in table._RESIDENT.values())


def test_resident_programs_are_read_once_per_compiled_kernel_and_fall_back_with_a_warning(monkeypatch):
    """The GPU grid's size on the host: the compiled kernel's registers, read once per kernel, device,
    constexprs and dtypes (or per grid_key); a Triton whose kernels cannot be inspected gets the
    fixed fallback, and a warning that names the kernel."""
    warmups, current = [], []

    class Compiled:
        n_regs, metadata = 40, types.SimpleNamespace(shared=0)

        def _init_handles(self):
            pass

    class Kernel:
        __name__ = "fake_kernel"

        def __init__(self, error=None):
            self.error = error

        def warmup(self, *args, grid, **meta):
            warmups.append((args, grid, meta))
            if self.error:
                raise self.error
            return Compiled()

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: HOPPER)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext(current.append(index)))
    monkeypatch.setattr(table, "_RESIDENT", {})
    kernel, meta = Kernel(), {"BLOCK": 8}  # num_warps: the default, 4
    bf16_args = (torch.empty(4, dtype=torch.bfloat16), 3)
    assert table.programs_per_sm(40, 0, table.NUM_WARPS, HOPPER) == 12  # the registers' limit
    assert table._resident_programs(kernel, 1, bf16_args, meta) == 12 * 132
    assert table._resident_programs(kernel, 1, bf16_args, meta) == 12 * 132
    assert warmups == [(bf16_args, (1,), meta)] and current == [1]  # compiled on its own device, once
    table._resident_programs(kernel, 1, (torch.empty(4), 3), meta)  # fp32: another compiled kernel
    table._resident_programs(kernel, 0, bf16_args, meta)  # another device
    table._resident_programs(kernel, 1, bf16_args, {"BLOCK": 16})  # other constexprs
    table._resident_programs(kernel, 1, bf16_args, meta, grid_key="bf16")
    table._resident_programs(kernel, 1, (torch.empty(4), 3), meta, grid_key="bf16")  # the key decides
    table._resident_programs(kernel, 0, bf16_args, meta, grid_key="bf16")  # with the device
    assert len(warmups) == 6
    message = r"registers of Triton kernel fake_kernel \(RuntimeError\('no registers'\)\); its grid assumes 8 programs"
    with pytest.warns(RuntimeWarning, match=message):
        assert table._resident_programs(Kernel(RuntimeError("no registers")), 0, bf16_args, meta) == 8 * 132


def _update_launch(weights, device="cpu"):
    """update_kernel's (arguments, constexprs) for EMA+SWA+LAWA over bf16 weights, fp32 averages."""
    params = [torch.randn(4099, device=device).bfloat16()]
    averages = [torch.zeros(4099, device=device) for _ in weights]
    ring = torch.zeros(2, 4104, dtype=torch.bfloat16, device=device)[:, :4099]
    ((_, args, constexprs, _),) = update.launches(params, table.build_table(params), averages, weights, [ring], [0])
    return args, constexprs


def test_grid_key_names_the_kernel_a_launch_runs():
    """The first update copies (weights 1): the same kernel as later steps, so one grid serves
    both; rings of another dtype compile another kernel, so they get a grid of their own."""
    copy_args, meta = _update_launch([1.0, 1.0])
    steady_args, steady_meta = _update_launch([0.001, 0.01])
    copy_flags = slice(8, 20, 3)  # after table, n_rows, 4 averages: (hi, lo, copy) per average
    assert meta == steady_meta and copy_args[copy_flags] == (1, 1, 0, 0) and steady_args[copy_flags] == (0, 0, 0, 0)
    key = table.resident_key(update.update_kernel, 0, steady_args, meta)
    assert table.resident_key(update.update_kernel, 0, copy_args, meta) == key
    mean_meta = dict(BLOCK=table.BLOCK, num_warps=table.NUM_WARPS)  # as ring_mean_ launches
    keys = [
        table.resident_key(
            ring_mean.ring_mean_kernel, 0, (torch.zeros(9), torch.zeros(2, 9, dtype=dtype), 9, 9, 2), mean_meta
        )
        for dtype in (torch.bfloat16, torch.float32)
    ]
    assert keys[0] != keys[1]


def test_a_launch_plans_grid_key_names_what_the_arguments_would():
    """update_ sizes its grid by a key worked out once per launch shape (update._plan), not from
    the arguments at every step: two launches share it exactly where resident_key, which reads
    the arguments, says they run the same compiled kernel."""
    params = [torch.randn(4099).bfloat16()]
    rows = table.build_table(params)
    launches = []
    for avg_dtype in (torch.float32, torch.float64):
        for n_avg, n_ring, weights in [(1, 0, [0.1]), (1, 0, [1.0]), (0, 1, []), (0, 2, []), (2, 1, [0.3, 1.0])]:
            averages = [torch.zeros(4099, dtype=avg_dtype) for _ in range(n_avg)]
            rings = [torch.zeros(3, 4099, dtype=torch.bfloat16) for _ in range(n_ring)]
            launches += update.launches(params, rows, averages, weights, rings, [1] * n_ring)
    by_plan = {(kernel, key) for kernel, _, _, key in launches}
    by_arguments = {table.resident_key(kernel, 0, args, meta) for kernel, args, meta, _ in launches}
    pairs = {(kernel, key, table.resident_key(kernel, 0, args, meta)) for kernel, args, meta, key in launches}
    # 4 shapes with float32 averages, 2 more with float64 (rings alone name no average dtype)
    assert len(by_plan) == len(by_arguments) == len(pairs) == 6
    assert {kernel for kernel, _, _, _ in launches} == {update.update_kernel, update.snapshot_kernel}


@pytest.mark.parametrize(
    "n_avg, n_ring, block, expected",
    [
        (1, 0, None, table.BLOCK),  # one buffer: the full block
        (0, 1, None, table.BLOCK),
        (1, 1, None, update.MANY_BUFFERS_BLOCK),  # two or more: the block tuned for their registers
        (0, 2, None, update.MANY_BUFFERS_BLOCK),
        (3, 1, None, update.MANY_BUFFERS_BLOCK),
        (3, 1, 2048, 2048),  # a sweep's block, given outright
    ],
)
def test_launches_of_two_or_more_buffers_take_their_own_block(n_avg, n_ring, block, expected):
    params = [torch.randn(7).bfloat16()]
    averages = [torch.zeros(7) for _ in range(n_avg)]
    rings = [torch.zeros(2, 7, dtype=torch.bfloat16) for _ in range(n_ring)]
    rows = table.build_table(params)
    ((_, _, meta, _),) = update.launches(params, rows, averages, [0.1] * n_avg, rings, [0] * n_ring, block=block)
    assert meta["BLOCK"] == expected


def test_rings_alone_launch_the_snapshot_kernel_with_four_arguments():
    """LAWA alone is the shortest kernel, so its launch's host cost counts: 4 arguments, not 20."""
    params = [torch.randn(7).bfloat16()]
    rings = [torch.zeros(2, 7, dtype=torch.bfloat16) for _ in range(3)]
    plans = list(update.launches(params, table.build_table(params), [], [], rings, [0, 1, 0]))
    assert [kernel for kernel, *_ in plans] == [update.snapshot_kernel] * 2  # 2 rings per launch
    assert [len(args) for _, args, _, _ in plans] == [4, 4]
    assert [meta["N_RING"] for _, _, meta, _ in plans] == [2, 1]
    assert plans[1][1][2].data_ptr() == plans[1][1][3].data_ptr() == rings[2][0].data_ptr()


@pytest.mark.cuda
def test_first_update_compiles_the_kernel_later_steps_run():
    """Triton compiles a variant per int argument equal to 1; the copy flags of a first update and
    the ring count of a first averaged() must not get one, or its registers size later grids (32
    against 48 for EMA+SWA+LAWA on sm_90: 1.5 waves every step after the first)."""
    if table.INTERPRET:
        pytest.skip("compiles for the GPU")
    copy_args, meta = _update_launch([1.0, 1.0], device="cuda")
    steady_args, _ = _update_launch([0.001, 0.01], device="cuda")
    first = update.update_kernel.warmup(*copy_args, grid=(1,), **meta)
    later = update.update_kernel.warmup(*steady_args, grid=(1,), **meta)
    assert first.hash == later.hash
    params = [torch.randn(4099, device="cuda").bfloat16()]
    rows, backup = table.build_table(params), torch.empty(4099, dtype=torch.bfloat16, device="cuda")
    ring = torch.zeros(3, 4104, dtype=torch.bfloat16, device="cuda")[:, :4099]
    kernels = []
    for count in (1, 3):
        args = (rows, rows.shape[0], backup, ring, ring.stride(0), count)
        constexprs = dict(P_DTYPE=tl.bfloat16, AVG_DTYPE=tl.float32, MODE=swap.FROM_RING, BLOCK=table.BLOCK, VEC=8)
        kernels.append(
            swap.swap_kernel.warmup(
                *args, grid=(1,), **constexprs, num_warps=table.NUM_WARPS, enable_fp_fusion=table.FP_FUSION
            )
        )
    assert kernels[0].hash == kernels[1].hash


def test_programs_walk_many_rows(monkeypatch):
    """The kernels with the GPU's persistent grid, here in the interpreter: 2 programs over 6 rows
    (update, swap, restore) and over a ring's blocks (ring mean), against the torch backend."""
    if not table.INTERPRET:
        pytest.skip("the interpreter's grid is the one patched here")

    def two_programs(
        kernel, work_items, device, *args, grid_key=None, **meta
    ):  # grid_key is launch()'s, not the kernel's
        kernel[(table.balanced_grid(work_items, 2),)](*args, **meta)

    sizes, n = [2 * CHUNK + 3, 5, CHUNK + 1], 3 * CHUNK + 9
    results = {}
    for backend in ("torch", "triton"):
        for module in (update, swap, ring_mean):
            monkeypatch.setattr(module, "launch", two_programs if backend == "triton" else module.launch)
        params = _params(sizes, torch.bfloat16, "cpu", misaligned=False)
        impls, flat, rows = _bind(backend, params, "cpu")
        averages = [_randn(n, seed=1), _randn(n, seed=2)]
        ring = torch.zeros(3, n, dtype=torch.bfloat16)
        impls["update_"](flat, rows, averages, [0.3, 0.9], [ring], [1])
        backup, out = torch.empty(n, dtype=torch.bfloat16), torch.empty(n)
        impls["ring_mean_"](out, ring, 2)
        impls["swap_in_"](flat, rows, backup, averages[0])
        swapped = torch.cat(params).clone()
        impls["restore_"](flat, rows, backup)
        results[backend] = (averages, ring, out, swapped, torch.cat(params), backup)
    assert rows.shape[0] == 6
    (t_avg, t_ring, t_out, t_swapped, t_params, t_backup) = results["torch"]
    (avg, ring, out, swapped, restored, backup) = results["triton"]
    for a, b in zip(avg, t_avg):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert torch.equal(ring, t_ring) and torch.equal(restored, t_params) and torch.equal(backup, t_backup)
    torch.testing.assert_close(out, t_out, **TOL[torch.float32])
    assert torch.equal(swapped, avg[0].to(torch.bfloat16))


def test_every_launch_names_its_fp_contraction(monkeypatch):
    """Triton 3.9 warns that its default contraction will change (off in 3.10): each launch passes
    table.FP_FUSION, so the kernels' numerics do not depend on which Triton is installed (the PTX
    of the contraction: test_triton_ptx.py)."""
    metas = []

    def recording(kernel, work_items, device, *args, **meta):
        metas.append(meta)

    for module in (update, swap, ring_mean):
        monkeypatch.setattr(module, "launch", recording)
    params = _params([4099, 7], torch.bfloat16, "cpu", misaligned=False)
    flat, rows = params, table.build_table(params)
    average, ring = _randn(4106, seed=1), torch.zeros(2, 4106, dtype=torch.bfloat16)
    backup = torch.empty(4106, dtype=torch.bfloat16)
    update.update_(flat, rows, [average], [0.5], [ring], [0])  # EMA + LAWA
    update.update_(flat, rows, [], [], [ring], [1])  # LAWA alone: snapshot_kernel
    swap.swap_in_(flat, rows, backup, average)
    swap.swap_in_ring_(flat, rows, backup, ring, 2, torch.float32)
    swap.restore_(flat, rows, backup)
    ring_mean.ring_mean_(torch.empty(4106), ring, 2)
    assert len(metas) == 6
    assert all(meta.get("enable_fp_fusion") is table.FP_FUSION for meta in metas), metas


# Where the small test kernels below run: compiled on a GPU, else in the interpreter.
_KERNEL_TEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _rows_read(out, rows, P_DTYPE: tl.constexpr):
    r = tl.program_id(0)
    pointer, offset, length, aligned = access.row(rows, r, P_DTYPE)
    tl.store(out + r * 4 + 1, offset)
    tl.store(out + r * 4 + 2, length)
    tl.store(out + r * 4 + 3, aligned)
    tl.store(out + r * 4, tl.load(pointer).to(tl.int64))  # the row's first element, through its pointer


def test_a_row_reads_its_own_offset_length_and_alignment():
    # Alignment only ever picks the faster loop, so no op test sees a row that reads another's flag.
    dev = _KERNEL_TEST_DEVICE
    storage = torch.arange(40, dtype=torch.int32, device=dev)
    params = [storage[0:10], storage[11:16], storage[16:40]]  # aligned; misaligned; offset 15 elements
    rows = table.build_table(params, chunk=8)
    out = torch.full_like(rows, -1)
    _rows_read[(rows.shape[0],)](out, rows, P_DTYPE=tl.int32)
    assert out.tolist() == [  # first element, flat offset, length, aligned: only the first tensor's rows
        [0, 0, 8, 1], [8, 8, 2, 1], [11, 10, 5, 0], [16, 15, 8, 0], [24, 23, 8, 0], [32, 31, 8, 0],
    ]  # fmt: skip


@triton.jit
def _full_blocks_end_of(out, lengths, aligned, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    tl.store(out + i, access.full_blocks_end(tl.load(lengths + i), tl.load(aligned + i), BLOCK))


def test_only_aligned_rows_take_the_unmasked_vector_loop():
    # A misaligned row in the vector loop would be promised 16-byte alignment it does not have:
    # wrong data or a fault on a GPU, unseen in the interpreter, which ignores the hints. So its
    # vector loop ends where it starts, and an aligned row's after its last full block (int64).
    dev = _KERNEL_TEST_DEVICE
    lengths = torch.tensor([0, 7, 1024, 4099, 4099, 2**31 + 5], device=dev)
    aligned = torch.tensor([1, 1, 1, 1, 0, 1], device=dev)
    out = torch.full_like(lengths, -1)
    _full_blocks_end_of[(len(lengths),)](out, lengths, aligned, BLOCK=1024)
    assert out.tolist() == [0, 0, 1024, 4096, 0, 2**31]


def test_the_interpreter_runs_one_program_per_row_and_one_for_none():
    grids = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: grids.append((grid, args, meta))

    for rows in (0, 1, 5):
        table.launch(Kernel(), rows, torch.device("cpu"), "arg", BLOCK=8)
    assert grids == [((1,), ("arg",), {"BLOCK": 8}), ((1,), ("arg",), {"BLOCK": 8}), ((5,), ("arg",), {"BLOCK": 8})]


@pytest.mark.parametrize("device, current, expected", [("cuda:1", 0, 1), ("cuda:0", 0, 0), ("cuda", 2, 2)])
def test_a_launch_runs_on_its_tensors_device(monkeypatch, device, current, expected):
    """Triton launches on the current device, in its current stream: parameters on cuda:1 while
    cuda:0 is current were refused ("cannot be accessed from Triton") or read out of torch's stream
    order. launch() makes their device current for the launch, and only when it is not already."""
    state = {"current": current, "switches": []}

    class DeviceScope:  # torch.cuda.device(index), without a GPU
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous, state["current"] = state["current"], self.index
            state["switches"].append(self.index)

        def __exit__(self, *exc):
            state["current"] = self.previous

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, state["current"], args, meta))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", DeviceScope)
    monkeypatch.setattr(table, "_resident_programs", lambda kernel, index, args, meta, grid_key=None: 4)
    table.launch(Kernel(), 10, torch.device(device), "arg", grid_key="key", BLOCK=8)
    assert launched == [((table.balanced_grid(10, 4),), expected, ("arg",), {"BLOCK": 8})]
    assert state["switches"] == ([] if expected == current else [expected]) and state["current"] == current
