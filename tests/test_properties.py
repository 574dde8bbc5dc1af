"""Property tests: random schedules, shapes (0-d, 1-element, empty) and dtypes against float64."""

import torch
from conftest import CPU_BACKENDS, reference
from helpers import roundtrip, run
from hypothesis import given, settings
from hypothesis import strategies as st

import fastavg

shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
schedule = dict(every=st.integers(1, 4), start=st.integers(0, 5))
specs = st.one_of(
    st.builds(
        fastavg.EMA,
        # No subnormal decays (meaningless, and hypothesis refuses them once a library has set the
        # process to flush subnormals: torch 2.4 and 2.5's compiled CPU kernels, -ffast-math, do).
        decay=st.floats(0, 0.99, allow_subnormal=False),
        power=st.none() | st.floats(0.1, 2),
        inv_gamma=st.floats(0.5, 4),
        **schedule,
    ),
    st.builds(fastavg.SWA, **schedule),
    st.builds(fastavg.LAWA, window=st.integers(1, 6), **schedule),
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    dtype=dtypes,
    spec_list=st.lists(specs, min_size=1, max_size=3),
    steps=st.integers(0, 25),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_random_schedules_match_float64_reference(shapes, dtype, spec_list, steps, backend):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    named = {f"avg{i}": spec for i, spec in enumerate(spec_list)}
    avg = fastavg.Averager(params, named, backend=backend)
    snaps = run(avg, params, steps)
    average_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, spec in named.items():
        expected_n = sum(spec.is_due(t) for t in range(1, steps + 1))
        assert avg.num_averaged(name) == (
            min(expected_n, spec.window) if isinstance(spec, fastavg.LAWA) else expected_n
        )
        got = avg.averaged_params(name)
        for i, p in enumerate(params):
            assert got[i].shape == p.shape and got[i].dtype == average_dtype
            expected = reference(spec, [s[i] for s in snaps[name]]) if snaps[name] else p.detach().double()
            torch.testing.assert_close(got[i].double(), expected, rtol=tol, atol=tol)
            # The swapped-in value is the export cast to the parameter dtype, and restore is exact.
            before = p.detach().clone()
            with avg.averaged(name):
                assert torch.equal(p.detach(), got[i].to(dtype))
            assert torch.equal(p.detach(), before)


def _drive(avg, params, first, last):
    """Steps ``first + 1 .. last``; each step's parameter values depend on the step alone."""
    for t in range(first + 1, last + 1):
        g = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        avg.step()


@settings(max_examples=40, deadline=None)
@given(
    dtype=dtypes,
    spec_list=st.lists(specs, min_size=1, max_size=3),
    steps=st.integers(1, 25),
    data=st.data(),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_a_resume_at_any_step_of_any_schedule_is_bit_exact(dtype, spec_list, steps, data, backend):
    # A resume can land anywhere in a schedule: before a spec's start, mid-window with the LAWA ring
    # wrapped, between an EMA's due steps with its warm-up decay partly spent.
    stop = data.draw(st.integers(0, steps), label="stop")
    named = {f"avg{i}": spec for i, spec in enumerate(spec_list)}
    shapes = [(7,), (2, 3), ()]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    uninterrupted = fastavg.Averager(params, named, backend=backend)
    _drive(uninterrupted, params, 0, steps)
    expected = {name: uninterrupted.averaged_params(name) for name in named}

    saved_params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    saving = fastavg.Averager(saved_params, named, backend=backend)
    _drive(saving, saved_params, 0, stop)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed = fastavg.Averager(resumed_params, named, backend=backend)
    resumed.load_state_dict(roundtrip(saving.state_dict()))
    _drive(resumed, resumed_params, stop, steps)

    assert resumed.step_count == steps
    for name in named:
        assert resumed.num_averaged(name) == uninterrupted.num_averaged(name), name
        for got, want in zip(resumed.averaged_params(name), expected[name]):
            assert torch.equal(got, want), name
