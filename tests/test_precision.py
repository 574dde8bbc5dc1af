"""API.md's Precision section: average dtypes, and accuracy over long runs against float64."""

import warnings
from collections import deque

import pytest
import torch
from conftest import reference
from helpers import make_params, run

import fastavg
from fastavg import EMA, LAWA, SWA
from fastavg.flat import holds_exactly


@pytest.mark.parametrize(
    "param_dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_default_average_dtype(param_dtype, expected, backend):
    params = make_params([(3,)], param_dtype)
    avg = fastavg.Averager(params, "ema", backend=backend)
    avg.step()
    assert avg.averaged_params()[0].dtype == expected


def test_memory_is_one_element_per_weight_per_average_and_window_elements_for_lawa(backend):
    # README's memory line: EMA and SWA hold one element of the averages' dtype per weight; LAWA
    # `window` elements of the weights' dtype, each group's row padded to a multiple of 8 elements
    # (16-byte aligned slots). Nothing else stays allocated.
    params = make_params([(7, 3), (4098,)], torch.bfloat16) + make_params([(5,)], torch.float64)
    avg = fastavg.Averager(params, {"e": EMA(0.9), "s": SWA(), "l": LAWA(3, every=1)}, backend=backend)
    held = {name: sum(b.untyped_storage().nbytes() for b in a.buffers) for name, a in avg._averages.items()}
    assert held["e"] == held["s"] == (21 + 4098) * 4 + 5 * 8
    assert held["l"] == 3 * (4120 * 2 + 8 * 8)  # rows of 4119 and 5 elements, rounded up to 8


def test_dtype_may_be_wider():
    avg = fastavg.Averager(make_params([(3,)], torch.bfloat16), "swa", dtype=torch.float64)
    avg.step()
    assert avg.averaged_params()[0].dtype == torch.float64


@pytest.mark.parametrize(
    "param_dtype, dtype",
    [(torch.float32, torch.bfloat16), (torch.float64, torch.float32), (torch.bfloat16, torch.float16)],
)
def test_narrower_dtype_raises_value_error(param_dtype, dtype):
    with pytest.raises(ValueError, match="narrower"):
        fastavg.Averager(make_params([(3,)], param_dtype), "ema", dtype=dtype)


@pytest.mark.parametrize("param_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e5m2fnuz], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_float8_parameters_take_any_wider_average_dtype(param_dtype, dtype):
    # e5m2fnuz's smallest normal is below float16's, but float16's subnormals hold its every value.
    # torch.promote_types refuses every pair with a float8 dtype; a float8 value is exact in each of these.
    torch.manual_seed(0)
    p = torch.randn(9).to(param_dtype)
    avg = fastavg.Averager([p], {"ema": EMA(0.5), "lawa": LAWA(2, every=1)}, dtype=dtype)
    snapshots = []
    for _ in range(3):
        p.copy_(torch.randn(9).to(param_dtype))
        avg.step()
        snapshots.append(p.double())
    ema = 0.25 * snapshots[0] + 0.25 * snapshots[1] + 0.5 * snapshots[2]  # exact in every dtype here
    assert torch.equal(avg.averaged_params("ema")[0], ema.to(dtype))
    assert torch.equal(avg.averaged_params("lawa")[0], ((snapshots[1] + snapshots[2]) / 2).to(dtype))


def test_the_width_rule_accepts_a_dtype_exactly_when_it_holds_every_value():
    wide = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for narrow in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        values = torch.arange(256, dtype=torch.uint8).view(narrow).double()  # every bit pattern
        values = values[values.isfinite()]
        for dtype in wide:
            exact = torch.equal(values.to(dtype).double(), values)
            assert holds_exactly(dtype, narrow) == exact, (dtype, narrow)
    for narrow in wide:  # among these, the rule is torch's type promotion
        for dtype in wide:
            assert holds_exactly(dtype, narrow) == (torch.promote_types(narrow, dtype) == dtype), (dtype, narrow)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_8_bit_average_dtypes_raise_before_the_first_step(dtype):
    # torch has no float8 lerp or add: such averages would fail at the first update, after the inner step.
    p = torch.nn.Parameter(torch.randn(3).to(dtype), requires_grad=False)
    with pytest.raises(ValueError, match="no arithmetic for 8-bit floats"):
        fastavg.wrap(torch.optim.SGD([p], lr=0.1), "ema", dtype=dtype)


def test_non_floating_dtype_raises():
    with pytest.raises(ValueError, match="floating"):
        fastavg.Averager(make_params([(3,)]), "ema", dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        fastavg.Averager(make_params([(3,)]), "ema", dtype="float32")


def test_bf16_weights_keep_fp32_ema_that_does_not_round_away(backend):
    # The stock AveragedModel on bf16 weights keeps bf16 averages: 1000 updates at decay 0.999
    # from 1.0 toward 1.5 stay at 1.0. In float32 the average moves as the formula says.
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    avg = fastavg.Averager([p], EMA(decay=0.999), backend=backend)
    avg.step()
    with torch.no_grad():
        p.fill_(1.5)
    for _ in range(1000):
        avg.step()
    expected = 1.0 * 0.999**1000 + 1.5 * (1 - 0.999**1000)
    got = avg.averaged_params()[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((8,), expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_chosen_16_bit_dtype_warns_for_ema_and_swa_whose_updates_round_away(dtype, backend):
    # The warning's numbers are what happens: at decay 0.999 (bf16: weights within 391%, fp16: 49%
    # of the average leave it unchanged) weights 30% above the average never move it; SWA stops
    # short of the mean (bf16: at once, fp16: from n ~ 300, at 9-15%). The warning points at the
    # caller's line, through wrap() too.
    p = torch.nn.Parameter(torch.ones(8, dtype=dtype))
    specs = {"ema": EMA(0.999), "swa": SWA(), "lawa": LAWA(3, every=1), "fast": EMA(0.5)}
    with pytest.warns(UserWarning) as caught:
        avg = fastavg.Averager([p], specs, dtype=dtype, backend=backend)
        fastavg.wrap(torch.optim.SGD([torch.nn.Parameter(torch.ones(2, dtype=dtype))], lr=0.1), "swa", dtype=dtype)
    messages = [str(w.message) for w in caught]
    assert [w.filename for w in caught] == [__file__] * 3
    half_step = torch.finfo(dtype).eps / 2
    assert f"average 'ema' is kept in {dtype}" in messages[0]
    assert f"weights within {half_step / 0.001:.0%} of the average" in messages[0]
    assert f"average 'swa' is kept in {dtype}" in messages[1] and f"n x {half_step:.2%}" in messages[1]
    assert f"({100 * half_step:.0%} at n = 100)" in messages[1]
    assert "average 'swa'" in messages[2] and "dtype=None keeps float32 averages" in messages[2]
    for _ in range(200):
        avg.step()
    with torch.no_grad():
        p.fill_(1.3)
    for _ in range(1000):
        avg.step()
    assert avg.averaged_params("ema")[0].eq(1.0).all()
    assert avg.averaged_params("swa")[0].lt(1.2).all()  # the mean is (200 x 1.0 + 1000 x 1.3) / 1200 = 1.25
    assert torch.equal(avg.averaged_params("lawa")[0], p.detach().to(avg.averaged_params("lawa")[0].dtype))
    # No warning at decay 0.5: what rounds away there is within eps of the weights, under 1%.
    torch.testing.assert_close(avg.averaged_params("fast")[0].float(), p.detach().float(), rtol=2 * half_step, atol=0)


def test_default_and_wide_average_dtypes_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastavg.Averager(make_params([(3,)], torch.bfloat16), {"ema": EMA(0.9999), "swa": SWA()})
        fastavg.Averager(make_params([(3,)], torch.float32), {"ema": EMA(0.9999), "swa": SWA()}, dtype=torch.float64)
        # float32 named outright is the default's own dtype: its epsilon is the limit, not past it.
        fastavg.Averager(make_params([(3,)], torch.bfloat16), {"ema": EMA(0.9999), "swa": SWA()}, dtype=torch.float32)


def _random_walk(numel: int, steps: int, seed: int = 0):
    """Parameter values of a slowly drifting run, ``steps`` rows, generated in float64."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, numel, generator=g, dtype=torch.float64) * 0.1
    return (base + noise.cumsum(0) * 0.01 + noise).float()


def _long_run(backend: str) -> int:
    # 100,000 due steps on the reference; the interpreted kernels cost ~1 ms a launch, so they run
    # a shorter stretch here (their arithmetic is checked op by op in test_ops.py).
    return 100_000 if backend == "torch" else 2_000


def test_lawa_has_no_drift_over_100k_due_steps(backend):
    steps, window = _long_run(backend), 5
    values = _random_walk(64, steps)
    p = torch.nn.Parameter(values[0].clone())
    avg = fastavg.Averager([p], LAWA(window=window, every=1), backend=backend)
    recent = deque(maxlen=window)
    worst = 0.0
    for t in range(steps):
        with torch.no_grad():
            p.copy_(values[t])
        avg.step()
        recent.append(values[t].double())
        if t % 97 == 0 or t >= steps - 3 * window:  # every 97th step and the whole end of the run
            expected = torch.stack(list(recent)).mean(0)
            err = (avg.averaged_params()[0].double() - expected).abs().max() / expected.abs().max()
            worst = max(worst, err.item())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("spec", [SWA(), EMA(decay=0.999)], ids=repr)
def test_ema_swa_no_worse_than_fp32_running_update_over_100k_steps(spec, backend):
    steps = _long_run(backend)
    values = _random_walk(64, steps, seed=1)
    p = torch.nn.Parameter(values[0].clone())
    avg = fastavg.Averager([p], spec, backend=backend)
    running = torch.empty(64)  # what torch.optim.swa_utils does: one float32 running update
    exact = torch.empty(64, dtype=torch.float64)
    for t in range(steps):
        with torch.no_grad():
            p.copy_(values[t])
        avg.step()
        j = t + 1
        w = spec.weight(j)
        if j == 1:
            running.copy_(values[t])
            exact.copy_(values[t])
        else:
            running.add_((values[t] - running) * w)
            exact.mul_(1 - w).add_(values[t].double() * w)
    scale = exact.abs().max()
    ours = (avg.averaged_params()[0].double() - exact).abs().max() / scale
    stock = (running.double() - exact).abs().max() / scale
    assert ours <= max(2 * stock, 2e-6), (ours, stock)
    assert ours <= 1e-4


def test_mixed_dtypes_on_one_device_form_separate_groups(backend):
    params = make_params([(4,), (3,)], torch.bfloat16) + make_params([(5,)], torch.float32, seed=3)
    avg = fastavg.Averager(params, SWA(), backend=backend)
    snaps = run(avg, params, 6)["swa"]
    got = avg.averaged_params()
    assert [g.dtype for g in got] == [torch.float32] * 3
    for i in range(3):
        torch.testing.assert_close(got[i].double(), reference(SWA(), [s[i] for s in snaps]), rtol=1e-6, atol=1e-6)
