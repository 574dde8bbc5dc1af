"""API.md's schedule and formulas: each method against a float64 evaluation, num_averaged, names."""

import pytest
import torch
from conftest import reference, tolerance
from helpers import make_params, run

import fastavg
from fastavg import EMA, LAWA, SWA

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4)]


@pytest.mark.parametrize(
    "spec",
    [
        EMA(decay=0.9),
        EMA(decay=0.99, every=3, start=4),
        EMA(decay=0.999, power=0.75, inv_gamma=2.0),
        EMA(decay=0.0),
        SWA(),
        SWA(every=2, start=3),
        LAWA(window=3, every=2),
        LAWA(window=1, every=1),
        LAWA(window=4, every=3, start=2),
    ],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_matches_float64_reference(spec, dtype, backend):
    params = make_params(SHAPES, dtype)
    avg = fastavg.Averager(params, spec, backend=backend)
    snaps = run(avg, params, 29)[spec.kind]
    got = avg.averaged_params()
    for i, p in enumerate(params):
        expected = reference(spec, [s[i] for s in snaps])
        assert got[i].dtype == dtype and got[i].shape == p.shape
        torch.testing.assert_close(got[i].double(), expected, **tolerance(dtype))


@pytest.mark.parametrize("spec", [EMA(every=2, start=3), SWA(every=3), LAWA(window=3, every=2, start=1)], ids=repr)
def test_num_averaged_and_step_count(spec, backend):
    params = make_params([(4,)])
    avg = fastavg.Averager(params, spec, backend=backend)
    assert avg.num_averaged() == 0 and avg.step_count == 0
    n = 0
    for t in range(1, 30):
        avg.step()
        n += spec.is_due(t)
        assert avg.step_count == t
        expected = min(n, spec.window) if isinstance(spec, LAWA) else n
        assert avg.num_averaged() == expected


def test_only_due_steps_change_the_average(backend):
    params = make_params([(5,)])
    avg = fastavg.Averager(params, EMA(decay=0.5, every=3), backend=backend)
    before = None
    for t in range(1, 13):
        with torch.no_grad():
            params[0].add_(1.0)
        avg.step()
        now = avg.averaged_params()[0]
        if t > 3 and not EMA(every=3).is_due(t):
            assert torch.equal(now, before)
        if EMA(every=3).is_due(t) and t > 3:
            assert not torch.equal(now, before)
        before = now


def test_before_first_due_step_export_is_the_parameters(backend):
    params = make_params([(4,)], torch.bfloat16)
    avg = fastavg.Averager(params, SWA(start=5), backend=backend)
    avg.step()
    got = avg.averaged_params()[0]
    assert got.dtype == torch.float32 and torch.equal(got, params[0].detach().float())


def test_first_due_step_is_an_exact_copy(backend):
    params = make_params([(33,)], torch.float32)
    avg = fastavg.Averager(params, {"e": EMA(0.9), "s": SWA(), "l": LAWA(3, every=1)}, backend=backend)
    avg.step()
    for name in avg.names:
        assert torch.equal(avg.averaged_params(name)[0], params[0].detach())


def test_several_averages_each_follow_their_own_schedule(backend):
    specs = {
        "fast": EMA(decay=0.5),
        "slow": EMA(decay=0.9, every=2),
        "swa": SWA(start=3),
        "lawa": LAWA(window=2, every=3),
        "lawa2": LAWA(window=4, every=1),
    }
    params = make_params([(3,), (2, 2)])
    avg = fastavg.Averager(params, specs, backend=backend)
    snaps = run(avg, params, 17)
    assert avg.names == list(specs)
    for name, spec in specs.items():
        got = avg.averaged_params(name)
        for i in range(len(params)):
            torch.testing.assert_close(
                got[i].double(), reference(spec, [s[i] for s in snaps[name]]), **tolerance(torch.float32)
            )


@pytest.mark.parametrize("form", ["name", "spec", "dict"])
def test_names_from_each_form(form, backend):
    params = make_params([(2,)])
    averaging = {"name": "lawa", "spec": LAWA(window=2, every=3), "dict": {"mine": LAWA(2, every=3)}}[form]
    avg = fastavg.Averager(params, averaging, backend=backend)
    assert avg.names == (["mine"] if form == "dict" else ["lawa"])


def test_name_with_spec_kwargs():
    avg = fastavg.Averager(make_params([(2,)]), "lawa", window=7, every=3)
    assert avg.specs == {"lawa": LAWA(window=7, every=3)}


def test_param_groups_and_named_parameters_are_accepted():
    model = torch.nn.Linear(3, 2)
    by_groups = fastavg.Averager([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.1}], "swa")
    assert [p.shape for p in by_groups.averaged_params()] == [model.weight.shape, model.bias.shape]
    by_name = fastavg.Averager(model.named_parameters(), "swa")
    model.weight.data = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="weight"):
        by_name.step()
