"""averaged(): the average swapped in, the training values restored bit for bit, and its errors."""

import pytest
import torch
from helpers import make_params, run

import fastavg
from fastavg import EMA, LAWA, SWA


def _wrapped(backend, averaging, dtype=torch.float32):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.5), averaging, backend=backend)
    return model, opt


def _train(model, opt, steps):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 5, generator=g).to(next(model.parameters()).dtype)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["ema", "swa", "lawa"])
def test_swap_in_and_bit_exact_restore(name, dtype, backend):
    specs = {"ema": EMA(0.9), "swa": SWA(), "lawa": LAWA(window=3, every=2)}
    model, opt = _wrapped(backend, specs, dtype)
    _train(model, opt, 9)
    before = [p.detach().clone() for p in model.parameters()]
    expected = opt.averaged_params(name)
    with opt.averaged(name):
        for p, e in zip(model.parameters(), expected):
            assert p.dtype == dtype
            assert torch.equal(p.detach(), e.to(dtype))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # bit for bit


def test_restored_when_the_block_raises(backend):
    model, opt = _wrapped(backend, "ema")
    _train(model, opt, 5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError, match="boom"):
        with opt.averaged():
            with torch.no_grad():
                next(model.parameters()).add_(100)  # even edits inside the block are undone
            raise KeyError("boom")
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    with opt.averaged():  # and the wrapper is usable again
        pass


def test_before_first_due_step_parameters_are_left_as_they_are(backend):
    model, opt = _wrapped(backend, LAWA(window=2, every=10))
    _train(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.averaged():
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["ema", "swa", "lawa"])
def test_after_one_due_step_the_block_holds_that_snapshot(name, backend):
    # Due at step 3 only, then trained on: the one snapshot, not the weights of step 5, is swapped in.
    specs = {"ema": EMA(0.9, every=3), "swa": SWA(every=3), "lawa": LAWA(2, every=3)}
    model, opt = _wrapped(backend, {name: specs[name]})
    _train(model, opt, 3)
    snapshot = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 2)
    assert opt.num_averaged(name) == 1
    with opt.averaged(name):
        assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), snapshot))


def test_step_inside_block_raises_and_changes_nothing(backend):
    model, opt = _wrapped(backend, "ema")
    _train(model, opt, 2)
    t = opt.step_count
    with opt.averaged():
        inside = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="inside averaged"):
            opt.step()
        with pytest.raises(RuntimeError, match="inside averaged"):
            opt.averager.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), inside))
    assert opt.step_count == t


def test_nested_averaged_raises(backend):
    model, opt = _wrapped(backend, {"a": EMA(0.9), "b": SWA()})
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.averaged("a"):
        with pytest.raises(RuntimeError, match="already open"):
            with opt.averaged("b"):
                pass
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_name_required_with_several_averages(backend):
    model, opt = _wrapped(backend, {"a": EMA(0.9), "b": SWA()})
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        with opt.averaged():
            pass
    with pytest.raises(ValueError, match="nope"):
        opt.averaged_params("nope")
    with pytest.raises(ValueError):
        opt.num_averaged()
    assert opt.num_averaged("a") == 0


def test_autograd_sees_the_swaps_as_in_place_writes(backend):
    # A graph that saved the parameters on one side of a swap must not backpropagate through the
    # other side's values: autograd raises, as it does for any in-place write, on every backend.
    model, opt = _wrapped(backend, EMA(0.5))
    _train(model, opt, 3)
    x = torch.randn(4, 5, requires_grad=True)  # the input's gradient reads the saved weights
    with opt.averaged():
        inside = model(x).square().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        inside.backward()
    outside = model(x).square().sum()
    with opt.averaged():
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            outside.backward()
        model(x).square().sum().backward()  # a graph built and used inside the block is fine
    assert x.grad is not None


def test_averaged_params_are_new_tensors_in_average_dtype(backend):
    params = make_params([(4, 3), (2,)], torch.bfloat16)
    avg = fastavg.Averager(params, EMA(0.5), backend=backend)
    run(avg, params, 3)
    out = avg.averaged_params()
    assert [o.dtype for o in out] == [torch.float32, torch.float32]
    assert [o.shape for o in out] == [p.shape for p in params]
    out[0].fill_(123.0)  # owning its memory: editing an export changes nothing kept
    assert not torch.equal(avg.averaged_params()[0], out[0])


def test_channels_last_parameters_are_averaged_in_their_layout(backend):
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    avg = fastavg.Averager(conv.parameters(), SWA(), backend=backend)
    snaps = run(avg, list(conv.parameters()), 4)["swa"]
    expected = torch.stack([s[0] for s in snaps]).mean(0)
    torch.testing.assert_close(avg.averaged_params()[0], expected)
    with avg.averaged():
        torch.testing.assert_close(conv.weight.detach(), expected)


def test_lawa_ring_slots_start_16_byte_aligned():
    params = [torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))]  # 7 elements: an odd row
    avg = fastavg.Averager(params, LAWA(window=4, every=1))
    ring = avg._averages["lawa"].buffers[0]
    assert ring.shape == (4, 7) and all(ring[k].data_ptr() % 16 == 0 for k in range(4))


def test_a_failing_update_leaves_the_schedule_where_it_was(monkeypatch, backend):
    params = make_params([(4,)])
    avg = fastavg.Averager(params, {"e": EMA(0.5), "l": LAWA(2, every=1)}, backend=backend)
    avg.step()
    impls = avg._groups[0].backend.impls

    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setitem(impls, "update_", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        avg.step()
    assert avg.step_count == 1 and avg.num_averaged("e") == 1 and avg.num_averaged("l") == 1


def test_float_buffers_averaged_beside_the_parameters_as_the_readme_shows(backend):
    # wrap averages what the optimizer steps; BatchNorm's running statistics need an Averager over
    # both (README, "Buffers"). The integer counter is left out: only floats are averaged.
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    avg = fastavg.Averager(tensors, LAWA(window=2, every=1), backend=backend)
    snapshots = []
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        avg.step()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with avg.averaged():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected = ((snapshots[-1][key].double() + snapshots[-2][key].double()) / 2).float()
                torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(value, training[key])  # num_batches_tracked: not averaged
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("default", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_default_device_elsewhere_changes_nothing(backend, default):
    # torch.set_default_device (or a `with torch.device(...)` block around wrap) moves every tensor
    # made without a device. The native backend's CPU table went there and took the op with it:
    # under "meta" no average was ever updated; under "cuda" the CUDA kernel got the CPU tensors.
    specs = {"e": EMA(0.5), "s": SWA(), "l": LAWA(window=2, every=1)}
    expected_params, found_params = make_params([(7,), (3, 5)]), make_params([(7,), (3, 5)])
    expected = fastavg.Averager(expected_params, specs, backend=backend)
    values = [make_params([(7,), (3, 5)], seed=step) for step in range(1, 4)]
    for step_values in values:
        with torch.no_grad():
            torch._foreach_copy_(expected_params, step_values)
        expected.step()
    with torch.device(default):
        found = fastavg.Averager(found_params, specs, backend=backend)
        for step_values in values:
            with torch.no_grad():
                torch._foreach_copy_(found_params, step_values)
            found.step()
        for name in specs:
            assert all(torch.equal(a, b) for a, b in zip(found.averaged_params(name), expected.averaged_params(name)))
        with found.averaged("l"):
            assert all(torch.equal(p, a) for p, a in zip(found_params, expected.averaged_params("l")))
        assert all(torch.equal(p, v) for p, v in zip(found_params, values[-1]))
        found.load_state_dict(expected.state_dict())
