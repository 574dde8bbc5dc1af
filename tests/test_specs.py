"""Specs: validation (types, ranges, unknown keywords), the due rule and EMA's warm-up."""

import dataclasses
import math

import pytest

from fastavg import EMA, LAWA, SWA


def test_defaults_match_api():
    assert EMA() == EMA(decay=0.999, every=1, start=0, power=None, inv_gamma=1.0)
    assert SWA() == SWA(every=1, start=0)
    assert LAWA() == LAWA(window=5, every=1000, start=0)
    assert EMA(0.99).decay == 0.99 and LAWA(7, every=3).window == 7


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: EMA(every=2.5), "every"),
        (lambda: EMA(every=True), "every"),
        (lambda: EMA(start="0"), "start"),
        (lambda: EMA(decay="0.9"), "decay"),
        (lambda: EMA(decay=None), "decay"),
        (lambda: EMA(power="1"), "power"),
        (lambda: EMA(inv_gamma=[1]), "inv_gamma"),
        (lambda: SWA(every=1.0), "every"),
        (lambda: SWA(start=None), "start"),
        (lambda: LAWA(window="5"), "window"),
        (lambda: LAWA(every=2.0), "every"),
        (lambda: LAWA(start=1.5), "start"),
    ],
)
def test_wrong_type_raises_type_error_naming_field(make, field):
    with pytest.raises(TypeError, match=field):
        make()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: EMA(decay=1.0), "decay"),
        (lambda: EMA(decay=-0.1), "decay"),
        (lambda: EMA(decay=math.nan), "decay"),
        (lambda: EMA(every=0), "every"),
        (lambda: EMA(start=-1), "start"),
        (lambda: EMA(power=0), "power"),
        (lambda: EMA(power=-1.0), "power"),
        (lambda: EMA(inv_gamma=0), "inv_gamma"),
        (lambda: EMA(inv_gamma=math.inf), "inv_gamma"),
        (lambda: SWA(every=0), "every"),
        (lambda: SWA(start=-3), "start"),
        (lambda: LAWA(window=0), "window"),
        (lambda: LAWA(every=-1), "every"),
        (lambda: LAWA(start=-1), "start"),
    ],
)
def test_out_of_range_raises_value_error_naming_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize(
    "cls, fields",
    [(EMA, "decay, every, start, power, inv_gamma"), (SWA, "every, start"), (LAWA, "window, every, start")],
)
def test_unknown_keyword_raises_type_error_naming_it_and_the_fields(cls, fields):
    with pytest.raises(TypeError, match=f"unknown keyword 'bogus'; its fields are {fields}$"):
        cls(bogus=1)
    with pytest.raises(TypeError, match=f"takes at most {fields.count(',') + 1} arguments \\({fields}\\), got 6"):
        cls(1, 1, 1, 1, 1, 1)
    # A known field given twice is still Python's own error.
    with pytest.raises(TypeError, match="multiple values"):
        cls(1, **{fields.split(", ")[0]: 1})


def test_specs_keep_their_signature_and_copy():
    import dataclasses
    import inspect
    import pickle

    assert list(inspect.signature(LAWA).parameters) == ["window", "every", "start"]
    spec = dataclasses.replace(LAWA(window=3, every=2), start=4)
    assert spec == LAWA(3, 2, 4) and pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(TypeError, match="unknown keyword 'windw'"):
        dataclasses.replace(spec, windw=2)


def test_edge_values_accepted():
    EMA(decay=0)
    EMA(decay=0.0, power=0.5, inv_gamma=0.1)
    LAWA(window=1, every=1)


def test_numpy_scalars_are_accepted_and_kept_as_python_numbers():
    # np.linspace's decays and np.arange's periods are numbers; stored as NumPy scalars they would
    # make the state dict unreadable by torch.load(weights_only=True).
    np = pytest.importorskip("numpy")
    ema = EMA(decay=np.float32(0.5), every=np.int64(2), start=np.int32(1), power=np.float64(0.75), inv_gamma=np.int8(2))
    lawa = LAWA(window=np.uint8(3), every=np.int64(5), start=np.int16(0))
    assert ema == EMA(0.5, 2, 1, 0.75, 2.0) and lawa == LAWA(3, 5, 0)
    for spec in (ema, lawa, SWA(every=np.int64(4))):
        assert all(type(v) in (int, float) for v in dataclasses.asdict(spec).values())
    with pytest.raises(TypeError, match="SWA.every"):
        SWA(every=np.bool_(True))
    with pytest.raises(TypeError, match="LAWA.window"):
        LAWA(window=np.float64(5.0))
    with pytest.raises(ValueError, match="EMA.decay"):
        EMA(decay=np.float32("nan"))


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EMA().decay = 0.5


@pytest.mark.parametrize("spec", [EMA(every=3, start=5), SWA(every=3, start=5), LAWA(every=3, start=5)])
def test_due_rule(spec):
    due = [t for t in range(0, 20) if spec.is_due(t)]
    assert due == [t for t in range(0, 20) if t > 5 and (t - 5) % 3 == 0] == [8, 11, 14, 17]


def test_due_every_step_from_start_zero():
    assert [t for t in range(5) if EMA().is_due(t)] == [1, 2, 3, 4]


def test_ema_weights_and_warmup():
    spec = EMA(decay=0.999)
    assert spec.weight(1) == 1.0
    assert spec.weight(2) == pytest.approx(0.001)
    warm = EMA(decay=0.999, power=2 / 3, inv_gamma=1.0)
    for j in (2, 3, 10, 10_000):
        expected = min(0.999, 1 - (1 + (j - 1) / 1.0) ** (-2 / 3))
        assert warm.decay_at(j) == pytest.approx(expected)
        assert warm.weight(j) == pytest.approx(1 - expected)
    assert warm.decay_at(10**9) == 0.999  # the cap


def test_swa_weight_and_lawa_slot():
    assert [SWA().weight(j) for j in (1, 2, 4)] == [1.0, 0.5, 0.25]
    assert [LAWA(window=3).slot(j) for j in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
