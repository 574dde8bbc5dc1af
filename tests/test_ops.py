"""Each fused op of every CPU backend against a direct float64 evaluation: odd sizes, every dtype,
poisoned outputs, opcheck."""

import pytest
import torch

from fastavg import ops
from fastavg.ops import resolve_backend

SIZES = [[1], [7], [4099], [1, 7, 4099, 3], [2**20 + 3]]
PARAM_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _group(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]


def _avg_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _poison(t):
    return t.fill_(float("nan"))


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_update_lerps_and_writes_ring_slots(sizes, dtype, backend):
    params = _group(sizes, dtype)
    n = sum(sizes)
    avg_dtype = _avg_dtype(dtype)
    old = [torch.randn(n, dtype=avg_dtype), torch.randn(n, dtype=avg_dtype)]
    averages = [old[0].clone(), old[1].clone(), _poison(torch.empty(n, dtype=avg_dtype))]
    weights = [0.001, 0.37, 1.0]  # the last is a first update: a copy over a poisoned buffer
    rings = [torch.zeros(3, n, dtype=dtype), torch.zeros(1, n, dtype=dtype)]
    _poison(rings[0][2])
    _poison(rings[1][0])
    resolve_backend(backend, "cpu").impls["update_"](params, averages, weights, rings, [2, 0])
    p = torch.cat(params).double()
    for a, o, w in zip(averages, old, weights):
        torch.testing.assert_close(a.double(), o.double() + w * (p - o.double()), **TOL[avg_dtype])
    assert torch.equal(averages[2], torch.cat(params).to(avg_dtype))
    assert torch.equal(rings[0][2], torch.cat(params)) and torch.equal(rings[1][0], torch.cat(params))
    assert not rings[0][:2].any()  # other slots untouched


def test_update_with_only_rings_or_only_averages(backend):
    impl = resolve_backend(backend, "cpu").impls["update_"]
    params = _group([5, 3], torch.bfloat16)
    ring = torch.zeros(2, 8, dtype=torch.bfloat16)
    impl(params, [], [], [ring], [1])
    assert torch.equal(ring[1], torch.cat(params))
    avg = torch.zeros(8)
    impl(params, [avg], [0.5], [], [])
    torch.testing.assert_close(avg, torch.cat(params).float() * 0.5)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_swap_in_and_restore(sizes, dtype, backend):
    impls = resolve_backend(backend, "cpu").impls
    params = _group(sizes, dtype)
    original = [p.clone() for p in params]
    average = torch.randn(sum(sizes), dtype=_avg_dtype(dtype))
    backup = _poison(torch.empty(sum(sizes), dtype=dtype))
    impls["swap_in_"](params, backup, average)
    assert torch.equal(backup, torch.cat(original))
    assert torch.equal(torch.cat(params), average.to(dtype))
    impls["restore_"](params, backup)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 3, 5])
def test_ring_mean_and_swap_in_ring(sizes, dtype, count, backend):
    impls = resolve_backend(backend, "cpu").impls
    n = sum(sizes)
    ring = torch.randn(5, n, dtype=torch.float64).to(dtype)
    if count < 5:
        _poison(ring[count:])  # slots past count are never read
    avg_dtype = _avg_dtype(dtype)
    out = _poison(torch.empty(n, dtype=avg_dtype))
    impls["ring_mean_"](out, ring, count)
    expected = ring[:count].double().mean(0)
    torch.testing.assert_close(out.double(), expected, **TOL[avg_dtype])
    params = _group(sizes, dtype, seed=1)
    original = torch.cat(params)
    backup = _poison(torch.empty(n, dtype=dtype))
    impls["swap_in_ring_"](params, backup, ring, count, avg_dtype)
    assert torch.equal(backup, original)
    assert torch.equal(torch.cat(params), out.to(dtype))


def test_ring_mean_rejects_bad_count(backend):
    impl = resolve_backend(backend, "cpu").impls["ring_mean_"]
    for count in (0, 4):
        with pytest.raises(ValueError, match="count"):
            impl(torch.empty(3), torch.zeros(3, 3), count)


def _samples():
    params = _group([1, 7, 33], torch.bfloat16)
    n = 41
    return {
        "update_": (
            params,
            [torch.randn(n), torch.randn(n)],
            [0.5, 1.0],
            [torch.zeros(3, n, dtype=torch.bfloat16)],
            [1],
        ),
        "swap_in_": ([p.clone() for p in params], torch.empty(n, dtype=torch.bfloat16), torch.randn(n)),
        "swap_in_ring_": (
            [p.clone() for p in params],
            torch.empty(n, dtype=torch.bfloat16),
            torch.randn(4, n).bfloat16(),
            3,
            torch.float32,
        ),
        "restore_": ([p.clone() for p in params], torch.randn(n).bfloat16()),
        "ring_mean_": (torch.empty(n), torch.randn(4, n).bfloat16(), 2),
    }


@pytest.mark.parametrize("op", list(ops.SCHEMAS))
def test_opcheck(op, backend):
    torch.library.opcheck(resolve_backend(backend, "cpu").ops[op], _samples()[op])


def test_registered_schemas_are_the_ones_in_ops_py(backend):
    namespace = ops.NAMESPACES[backend]
    for name, schema in ops.SCHEMAS.items():
        registered = str(getattr(getattr(torch.ops, namespace), name).default._schema)
        assert registered.replace(f"{namespace}::{name}", "") == schema


def test_each_backend_has_its_own_namespace():
    assert len(set(ops.NAMESPACES.values())) == len(ops.NAMESPACES)
