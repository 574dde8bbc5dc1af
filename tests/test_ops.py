"""Each fused op of every backend against a direct float64 evaluation: odd sizes, every dtype,
poisoned outputs, misaligned views, more averages than one launch takes, opcheck. CPU backends
run here; the same tests run on CUDA tensors for the CUDA backends where a GPU exists."""

import pytest
import torch
from helpers import torch_version

from fastavg import ops
from fastavg.flat import FlatGroup, memory_view
from fastavg.ops import resolve_backend

# The last group is larger than one CPU task (2**15 elements) and holds empty parameters: the
# native CPU kernels split it into tasks across the parameters' boundaries.
SIZES = [[1], [7], [4099], [1, 7, 4099, 3], [2**20 + 3], [0, 40_000, 5, 0, 30_011, 1]]
PARAM_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _params(sizes, dtype, device, seed=0, misaligned=False):
    """Parameters of ``sizes``; misaligned ones are views one element into a larger buffer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        base = torch.randn(n + 1, generator=g, dtype=torch.float64).to(device, dtype)
        out.append(base[1:] if misaligned else base[:n].clone())
    return out


def _bind(backend, params, device):
    """(impls, flat params, table) of a group of ``params`` on ``backend`` (a name, or a Backend:
    test_cuda_emulated.py passes the CUDA kernels built for the host)."""
    names, index = [f"p{i}" for i in range(len(params))], list(range(len(params)))
    if not isinstance(backend, ops.Backend):
        backend = resolve_backend(backend, torch.device(device).type)
    group = FlatGroup(params, names, index, torch.float32, backend)
    return group.backend.impls, group.flat_params, group.table


def _randn(*shape, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def _aligned_ring(window, n, dtype, device="cpu"):
    """A zeroed (window, n) ring whose slots start 16-byte aligned: rows padded to 8 elements, as
    fastavg's own rings are (averager._Average)."""
    return torch.zeros(window, -(-n // 8) * 8, dtype=dtype, device=device)[:, :n]


def _avg_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _poison(t):
    return t.fill_(float("nan"))


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_update_lerps_and_writes_ring_slots(sizes, dtype, misaligned, target):
    backend, dev = target
    params = _params(sizes, dtype, dev, misaligned=misaligned)
    impls, flat, table = _bind(backend, params, dev)
    n = sum(sizes)
    avg_dtype = _avg_dtype(dtype)
    old = [_randn(n, dtype=avg_dtype, device=dev, seed=s) for s in (1, 2)]
    averages = [old[0].clone(), old[1].clone(), _poison(torch.empty(n, dtype=avg_dtype, device=dev))]
    weights = [0.001, 0.6, 1.0]  # both lerp branches, then a first update: a copy over poison
    rings = [torch.zeros(3, n, dtype=dtype, device=dev), torch.zeros(1, n, dtype=dtype, device=dev)]
    _poison(rings[0][2])
    _poison(rings[1][0])
    impls["update_"](flat, table, averages, weights, rings, [2, 0])
    p = torch.cat(params).double()
    for a, o, w in zip(averages, old, weights):
        torch.testing.assert_close(a.double(), o.double() + w * (p - o.double()), **TOL[avg_dtype])
    assert torch.equal(averages[2], torch.cat(params).to(avg_dtype))
    assert torch.equal(rings[0][2], torch.cat(params)) and torch.equal(rings[1][0], torch.cat(params))
    assert not rings[0][:2].any()  # other slots untouched
    assert all(torch.equal(a, b) for a, b in zip(params, _params(sizes, dtype, dev, misaligned=misaligned)))


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_update_of_one_average_alone_and_with_a_ring(sizes, dtype, target):
    """EMA alone, then beside a LAWA slot: one average is the CUDA kernels' one instance that moves
    several vectors per thread per pass, and the test above takes three. Every element lerped once."""
    backend, dev = target
    params = _params(sizes, dtype, dev)
    impls, flat, table = _bind(backend, params, dev)
    n, p = sum(sizes), torch.cat(params).double()
    average = _randn(n, dtype=_avg_dtype(dtype), device=dev, seed=3)
    ring = _poison(_aligned_ring(2, n, dtype, dev))
    for weight, rings in ((0.3, []), (0.7, [ring])):  # both branches of the two-sided lerp
        before = average.to(torch.float64, copy=True)  # .double() of float64 would be the average itself
        impls["update_"](flat, table, [average], [weight], rings, [1] * len(rings))
        torch.testing.assert_close(average.double(), before + weight * (p - before), **TOL[average.dtype])
    assert torch.equal(ring[1], torch.cat(params)) and ring[0].isnan().all()


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_update_of_rings_alone(sizes, dtype, misaligned, target):
    """A step where only LAWA is due (a launch with no averages: its own kernel in the CUDA and
    Triton backends): poisoned slots of one ring, of two, then of three (two launches: at most two
    rings each) get the parameters; the rest stay."""
    backend, dev = target
    params = _params(sizes, dtype, dev, misaligned=misaligned)
    impls, flat, table = _bind(backend, params, dev)
    n = sum(sizes)
    rings = [torch.zeros(w, n, dtype=dtype, device=dev) for w in (3, 2, 2)]
    for slots in ([1], [2, 0], [2, 0, 1]):
        for ring, slot in zip(rings, slots):
            _poison(ring[slot])
        impls["update_"](flat, table, [], [], rings[: len(slots)], slots)
        for ring, slot in zip(rings, slots):
            assert torch.equal(ring[slot], torch.cat(params))
    assert not rings[0][0].any() and not rings[1][1].any() and not rings[2][0].any()  # slots no step wrote
    assert all(torch.equal(a, b) for a, b in zip(params, _params(sizes, dtype, dev, misaligned=misaligned)))


@pytest.mark.parametrize("chunk", [1000, 1 << 16])
def test_update_of_rings_alone_over_rows_of_other_lengths(chunk, target):
    """The kernels walk rows of any length (a multiple of the vector width): kernel_sweep.py times
    LAWA alone over tables of longer rows than the default's."""
    from fastavg.table import build_table

    backend, dev = target
    params = _params([70000, 7, 4099], torch.bfloat16, dev)
    impls, flat, _ = _bind(backend, params, dev)
    ring = _poison(torch.empty(2, 74106, dtype=torch.bfloat16, device=dev))
    impls["update_"](flat, build_table(flat, chunk), [], [], [ring], [1])
    assert torch.equal(ring[1], torch.cat(params)) and ring[0].isnan().all()


def test_update_with_many_averages_and_rings(target):
    backend, dev = target
    params = _params([5, 300, 2], torch.bfloat16, dev)
    impls, flat, table = _bind(backend, params, dev)
    n = 307
    averages = [_randn(n, device=dev, seed=s) for s in range(6)]
    old = [a.clone() for a in averages]
    weights = [0.1, 0.2, 0.3, 0.7, 0.9, 1.0]
    rings = [torch.zeros(2, n, dtype=torch.bfloat16, device=dev) for _ in range(3)]
    impls["update_"](flat, table, averages, weights, rings, [1, 0, 1])
    p = torch.cat(params).double()
    for a, o, w in zip(averages, old, weights):
        torch.testing.assert_close(a.double(), o.double() + w * (p - o.double()), **TOL[torch.float32])
    assert all(torch.equal(r[s], torch.cat(params)) for r, s in zip(rings, [1, 0, 1]))


def test_update_launches_split_averages_and_ring_slots_in_order_within_each_launchs_limits():
    # The Triton and CUDA kernels take at most 4 averages and 2 ring slots a launch (the CPU backends
    # take any number); checked here on the host for every count up to two and a half launches.
    for n_averages in range(11):
        for n_rings in range(6):
            averages = [torch.full((3,), float(i)) for i in range(n_averages)]
            weights = [i / 16 for i in range(n_averages)]
            rings = [torch.arange(6.0).reshape(2, 3) + 10 * i for i in range(n_rings)]
            slots = [i % 2 for i in range(n_rings)]
            launches = ops.update_launches(averages, weights, rings, slots, 4, 2)
            assert len(launches) == max(-(-n_averages // 4), -(-n_rings // 2)), (n_averages, n_rings)
            assert all(len(a) == len(w) <= 4 and len(r) <= 2 and (a or r) for a, w, r in launches)
            assert [id(a) for launch in launches for a in launch[0]] == list(map(id, averages))
            assert [w for launch in launches for w in launch[1]] == weights
            views = [v for launch in launches for v in launch[2]]
            assert len(views) == n_rings
            assert all(v.data_ptr() == r[s].data_ptr() and torch.equal(v, r[s]) for v, r, s in zip(views, rings, slots))


def test_update_with_only_rings_or_only_averages(target):
    backend, dev = target
    params = _params([5, 3], torch.bfloat16, dev)
    impls, flat, table = _bind(backend, params, dev)
    ring = torch.zeros(2, 8, dtype=torch.bfloat16, device=dev)
    impls["update_"](flat, table, [], [], [ring], [1])
    assert torch.equal(ring[1], torch.cat(params))
    avg = torch.zeros(8, device=dev)
    impls["update_"](flat, table, [avg], [0.5], [], [])
    torch.testing.assert_close(avg, torch.cat(params).float() * 0.5)


def test_weights_keep_float64_precision(target):
    # Four averages, one launch's worth: each weight reaches its average with all its bits.
    backend, dev = target
    params = _params([64], torch.float64, dev)
    impls, flat, table = _bind(backend, params, dev)
    averages = [_randn(64, dtype=torch.float64, device=dev) for _ in range(4)]
    old = [a.clone() for a in averages]
    weights = [1 / 3, 1 / 7, 1 / 11, 1 / 13]
    impls["update_"](flat, table, averages, weights, [], [])
    for avg, before, w in zip(averages, old, weights):
        torch.testing.assert_close(avg, before + w * (params[0] - before), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_swap_in_and_restore(sizes, dtype, misaligned, target):
    backend, dev = target
    params = _params(sizes, dtype, dev, misaligned=misaligned)
    impls, flat, table = _bind(backend, params, dev)
    original = [p.clone() for p in params]
    average = _randn(sum(sizes), dtype=_avg_dtype(dtype), device=dev)
    backup = _poison(torch.empty(sum(sizes), dtype=dtype, device=dev))
    impls["swap_in_"](flat, table, backup, average)
    assert torch.equal(backup, torch.cat(original))
    assert torch.equal(torch.cat(params), average.to(dtype))  # torch's rounding (nearest even)
    impls["restore_"](flat, table, backup)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 3, 5])
def test_ring_mean_and_swap_in_ring(sizes, dtype, count, target):
    backend, dev = target
    n = sum(sizes)
    ring = _randn(5, n, dtype=dtype, device=dev)
    if count < 5:
        _poison(ring[count:])  # slots past count are never read
    avg_dtype = _avg_dtype(dtype)
    params = _params(sizes, dtype, dev, seed=1, misaligned=count == 3)
    impls, flat, table = _bind(backend, params, dev)
    out = _poison(torch.empty(n, dtype=avg_dtype, device=dev))
    impls["ring_mean_"](out, ring, count)
    torch.testing.assert_close(out.double(), ring[:count].double().mean(0), **TOL[avg_dtype])
    original = torch.cat(params)
    backup = _poison(torch.empty(n, dtype=dtype, device=dev))
    impls["swap_in_ring_"](flat, table, backup, ring, count, avg_dtype)
    assert torch.equal(backup, original)
    assert torch.equal(torch.cat(params), out.to(dtype))


def test_bfloat16_rounding_is_nearest_even_with_ties_and_specials(target):
    backend, dev = target
    # float32 values exactly halfway between bfloat16 neighbours (ties), and inf / NaN.
    bits = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x3F80FFFF, 0x00008000], dtype=torch.int64)
    average = torch.cat([bits.to(torch.int32).view(torch.float32), torch.tensor([float("inf"), -float("inf")])])
    average = torch.cat([average, torch.tensor([float("nan")])]).to(dev)
    params = _params([average.numel()], torch.bfloat16, dev)
    impls, flat, table = _bind(backend, params, dev)
    impls["swap_in_"](flat, table, torch.empty(average.numel(), dtype=torch.bfloat16, device=dev), average)
    expected = average.to(torch.bfloat16)
    assert torch.equal(params[0][:-1], expected[:-1]) and params[0][-1].isnan()


def test_ring_reads_reject_bad_count(target):
    backend, dev = target
    params = _params([5], torch.float32, dev)
    impls, flat, table = _bind(backend, params, dev)
    before, backup = params[0].clone(), torch.zeros(5, device=dev)
    for count in (0, 4):  # a window of 3 snapshots of 5 elements: the message names the window
        with pytest.raises(ValueError, match=rf"count must be in \[1, 3\], got {count}$"):
            impls["ring_mean_"](torch.empty(5, device=dev), torch.zeros(3, 5, device=dev), count)
        with pytest.raises(ValueError, match=rf"count must be in \[1, 3\], got {count}$"):
            impls["swap_in_ring_"](flat, table, backup, torch.ones(3, 5, device=dev), count, torch.float32)
        assert torch.equal(params[0], before) and not backup.any()  # refused before anything is written


def test_native_ops_own_checks_raise_with_their_numbers(target):
    """The native ops' own checks (behind the Python ones) raise, numbers in the message: built
    without iostreams (csrc/error_text.h), since a number formatted through a stream in fastavg._C
    segfaulted on the H200 image instead of raising (runs 6 to 8)."""
    backend, dev = target
    if backend != "native":
        pytest.skip("the native extension's own checks")
    native = resolve_backend(backend, dev).ops
    with pytest.raises(ValueError, match=r"^ring_mean_: count must be in \[1, 3\], got 0$"):
        native["ring_mean_"](torch.empty(4, device=dev), torch.zeros(3, 4, device=dev), 0)  # the window, not N
    two_dtypes = [torch.zeros(4, device=dev), torch.zeros(4, dtype=torch.float64, device=dev)]
    with pytest.raises(RuntimeError, match=r"^update_: "):
        native["update_"](two_dtypes, torch.zeros(0, 4, dtype=torch.int64, device=dev), [torch.zeros(8, device=dev)],
                          [0.5], [], [])  # fmt: skip


# Buffers the native ops refuse, each beside good ones: (op, arguments after the parameters and
# table, built by z(*shape, dtype=float32) for parameters of 5 + 3 float32 elements).
_BAD_NATIVE_CALLS = {
    "average too short": ("update_", lambda z: ([z(8), z(7)], [0.5, 0.5], [z(2, 8)], [0])),
    "average strided": ("update_", lambda z: ([z(8), z(16)[::2]], [0.5, 0.5], [z(2, 8)], [0])),
    "averages of two dtypes": ("update_", lambda z: ([z(8), z(8, dtype=torch.float64)], [0.5, 0.5], [], [])),
    "a weight short": ("update_", lambda z: ([z(8), z(8)], [0.5], [z(2, 8)], [0])),
    "ring too narrow": ("update_", lambda z: ([z(8)], [0.5], [z(2, 8), z(2, 7)], [0, 0])),
    "ring of one row": ("update_", lambda z: ([z(8)], [0.5], [z(8)], [0])),
    "ring strided": ("update_", lambda z: ([z(8)], [0.5], [z(2, 16)[:, ::2]], [0])),
    "ring of another dtype": ("update_", lambda z: ([z(8)], [0.5], [z(2, 8, dtype=torch.float64)], [0])),
    "slot past the window": ("update_", lambda z: ([z(8)], [0.5], [z(2, 8)], [2])),
    "slot below 0": ("update_", lambda z: ([z(8)], [0.5], [z(2, 8)], [-1])),
    "a slot short": ("update_", lambda z: ([z(8)], [0.5], [z(2, 8), z(2, 8)], [0])),
    "swap_in_ backup too short": ("swap_in_", lambda z: (z(7), z(8))),
    "swap_in_ backup of another dtype": ("swap_in_", lambda z: (z(8, dtype=torch.float64), z(8))),
    "swap_in_ backup strided": ("swap_in_", lambda z: (z(16)[::2], z(8))),
    "swap_in_ average too short": ("swap_in_", lambda z: (z(8), z(7))),
    "swap_in_ average strided": ("swap_in_", lambda z: (z(8), z(16)[::2])),
    "swap_in_ring_ ring too narrow": ("swap_in_ring_", lambda z: (z(8), z(2, 7), 1, torch.float32)),
    "swap_in_ring_ ring of another dtype": (
        "swap_in_ring_", lambda z: (z(8), z(2, 8, dtype=torch.float16), 1, torch.float32)),
    "swap_in_ring_ backup too short": ("swap_in_ring_", lambda z: (z(7), z(2, 8), 1, torch.float32)),
    "restore_ backup too short": ("restore_", lambda z: (z(7),)),
    "restore_ backup of another dtype": ("restore_", lambda z: (z(8, dtype=torch.float64),)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD_NATIVE_CALLS))
def test_native_ops_refuse_bad_buffers_before_writing_anything(case, target):
    """The native ops check their buffers themselves, behind fastavg's Python layer: a ring slot past
    the window or a buffer of the wrong size or dtype would be read or written out of bounds."""
    backend, dev = target
    if backend != "native":
        pytest.skip("the native extension's own checks")
    op, make_arguments = _BAD_NATIVE_CALLS[case]
    arguments = make_arguments(lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=dev))
    _check_refused_before_writing(backend, dev, op, arguments)


def _check_refused_before_writing(backend, dev, op, arguments) -> None:
    """The native ``op`` itself (no Python check before it), on parameters of 5 + 3 float32 elements
    and ``arguments`` after them and their table: it raises, naming itself, and writes neither the
    parameters nor any buffer it was given (the good ones beside the bad one too). On a GPU the
    comparisons wait for it: an access that slipped through would fail there."""
    params = _params([5, 3], torch.float32, dev)
    _, flat, table = _bind(backend, params, dev)
    buffers = [t for a in arguments for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    with pytest.raises(RuntimeError, match=rf"^{op}: "):
        resolve_backend(backend, dev).ops[op](flat, table, *arguments)
    assert all(torch.equal(p, q) for p, q in zip(params, _params([5, 3], torch.float32, dev)))
    assert not any(b.any() for b in buffers)


# One buffer on a GPU other than the group's, beside good ones: the CUDA ops would reach it through
# its address there, an illegal access where peer access is off. (op, arguments after the
# parameters and table, from z and o: zeros on the group's GPU and on the other one.)
_OTHER_GPU_CALLS = {
    "an average": ("update_", lambda z, o: ([z(8), o(8)], [0.5, 0.5], [], [])),
    "a ring": ("update_", lambda z, o: ([z(8)], [0.5], [z(2, 8), o(2, 8)], [0, 0])),
    "swap_in_ backup": ("swap_in_", lambda z, o: (o(8), z(8))),
    "swap_in_ average": ("swap_in_", lambda z, o: (z(8), o(8))),
    "swap_in_ring_ backup": ("swap_in_ring_", lambda z, o: (o(8), z(2, 8), 1, torch.float32)),
    "swap_in_ring_ ring": ("swap_in_ring_", lambda z, o: (z(8), o(2, 8), 1, torch.float32)),
    "restore_ backup": ("restore_", lambda z, o: (o(8),)),
}


def _two_gpus(target) -> tuple[torch.device, torch.device]:
    """The group's GPU and another one, for the native CUDA ops' device checks; skips elsewhere."""
    if target != ("native", "cuda") or torch.cuda.device_count() < 2:
        pytest.skip("the native CUDA ops' device checks need two GPUs")
    return torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize("case", list(_OTHER_GPU_CALLS))
def test_native_cuda_ops_refuse_a_buffer_on_another_gpu(case, target):
    here, other = _two_gpus(target)
    op, make_arguments = _OTHER_GPU_CALLS[case]
    arguments = make_arguments(
        lambda *shape: torch.zeros(*shape, device=here), lambda *shape: torch.zeros(*shape, device=other)
    )
    _check_refused_before_writing("native", here, op, arguments)


def test_native_cuda_ring_mean_refuses_an_output_on_another_gpu(target):
    here, other = _two_gpus(target)
    mean = torch.zeros(8, device=other)
    with pytest.raises(RuntimeError, match=r"^ring_mean_: "):
        resolve_backend("native", here).ops["ring_mean_"](mean, torch.ones(2, 8, device=here), 1)
    assert not mean.any()


def test_empty_parameters(target):
    backend, dev = target
    params = [torch.zeros(0, device=dev), torch.zeros(0, 3, device=dev)]
    impls, flat, table = _bind(backend, params, dev)
    impls["update_"](flat, table, [torch.zeros(0, device=dev)], [0.5], [torch.zeros(2, 0, device=dev)], [1])
    impls["swap_in_"](flat, table, torch.zeros(0, device=dev), torch.zeros(0, device=dev))
    impls["restore_"](flat, table, torch.zeros(0, device=dev))


def _samples(backend, dev):
    params = _params([1, 7, 33], torch.bfloat16, dev)
    n = 41

    def bound():
        _, flat, table = _bind(backend, [p.clone() for p in params], dev)
        return flat, table

    bf16 = dict(dtype=torch.bfloat16, device=dev)
    return {
        "update_": (
            *bound(),
            [_randn(n, device=dev), _randn(n, device=dev)],
            [0.5, 1.0],
            [torch.zeros(3, n, **bf16)],
            [1],
        ),
        "swap_in_": (*bound(), torch.empty(n, **bf16), _randn(n, device=dev)),
        "swap_in_ring_": (*bound(), torch.empty(n, **bf16), _randn(4, n, **bf16), 3, torch.float32),
        "restore_": (*bound(), _randn(n, **bf16)),
        "ring_mean_": (torch.empty(n, device=dev), _randn(4, n, **bf16), 2),
    }


@pytest.mark.parametrize("op", list(ops.SCHEMAS))
def test_opcheck(op, target, request):
    backend, dev = target
    writes_a_list = "!)[]" in ops.SCHEMAS[op]  # Tensor(a!)[]
    if writes_a_list and torch_version() < (2, 5):
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="torch 2.4 cannot functionalise a custom op that writes a Tensor[]")
        )
    torch.library.opcheck(resolve_backend(backend, dev).ops[op], _samples(backend, dev)[op])


def test_registered_schemas_are_the_ones_in_ops_py(backend):
    namespace = ops.NAMESPACES[backend]
    for name, schema in ops.SCHEMAS.items():
        registered = str(getattr(getattr(torch.ops, namespace), name).default._schema)
        assert registered.replace(f"{namespace}::{name}", "") == schema


def test_each_backend_has_its_own_namespace():
    assert len(set(ops.NAMESPACES.values())) == len(ops.NAMESPACES)


def test_memory_view_is_memory_order():
    t = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)
    assert torch.equal(memory_view(t), torch.arange(24.0))


def test_torch_backend_casts_in_batches_on_the_cpu(monkeypatch):
    from fastavg import torch_backend

    monkeypatch.setattr(torch_backend, "_CPU_CAST_BATCH", 1000)  # 2,500 elements cut across batches
    params = _params([3, 2500, 1, 999, 7], torch.bfloat16, "cpu")
    impls, flat, table = _bind("torch", params, "cpu")
    n = sum(p.numel() for p in params)
    old = _randn(n, seed=4)
    averages = [old.clone(), _poison(torch.empty(n))]
    impls["update_"](flat, table, averages, [0.3, 1.0], [], [])
    p = torch.cat(params).double()
    torch.testing.assert_close(averages[0].double(), old.double() + 0.3 * (p - old.double()), **TOL[torch.float32])
    assert torch.equal(averages[1], torch.cat(params).float())
    batches = list(torch_backend._batches(flat, 1000))
    assert all(sum(x.numel() for x in pieces) <= 1000 for _, pieces in batches)
    assert [start for start, _ in batches] == [0] + [
        sum(x.numel() for _, ps in batches[:i] for x in ps) for i in range(1, len(batches))
    ]
