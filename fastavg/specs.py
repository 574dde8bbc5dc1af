"""Averaging specs: validated hyper-parameters, the due rule and per-update coefficients.

Pure Python, no tensors. EMA and SWA updates are both ``avg.lerp_(p, weight)``: the weight is 1 on
the first due step (an exact copy: ``torch.lerp`` returns ``end`` exactly at weight 1), then
``1 - d_j`` for EMA and ``1 / j`` for SWA. LAWA writes the j-th snapshot into ring slot
``(j - 1) % window`` and its mean is taken when it is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

# Numbers are checked, then stored as Python's own int and float: a NumPy scalar (np.linspace's
# decays, np.arange's periods) would reach the state dict, and torch.load(weights_only=True), the
# default, refuses NumPy scalars.


def _check_int(spec, field: str, minimum: int) -> None:
    value = getattr(spec, field)
    # bool is an int subclass; every=True is a typo, not a schedule.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{spec.kind.upper()}.{field} must be an int >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{spec.kind.upper()}.{field} must be an int >= {minimum}, got {value}")
    object.__setattr__(spec, field, int(value))  # frozen: the dataclass's own way round it


def _check_real(spec, field: str, allowed: str) -> None:
    value = getattr(spec, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{spec.kind.upper()}.{field} must be a real number {allowed}, got {value!r} ({type(value).__name__})"
        )
    object.__setattr__(spec, field, float(value))


def _keywords_named(cls):
    """``cls``'s generated ``__init__``, with errors for an unknown keyword or too many positional
    arguments that name the fields it takes (Python's own name only the offending keyword)."""
    init, fields = cls.__init__, [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            raise TypeError(f"{cls.__name__} got an unknown keyword {unknown[0]!r}; its fields are {', '.join(fields)}")
        if len(args) > len(fields):
            raise TypeError(
                f"{cls.__name__} takes at most {len(fields)} arguments ({', '.join(fields)}), got {len(args)}"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


class _Schedule:
    """The due rule shared by every spec: due at step t iff t > start and (t - start) % every == 0."""

    kind: ClassVar[str]
    every: int
    start: int

    def is_due(self, t: int) -> bool:
        """Whether this spec updates its average at step ``t`` (``t`` = number of step() calls)."""
        return t > self.start and (t - self.start) % self.every == 0

    def to_dict(self) -> dict:
        """The hyper-parameters as plain Python values (for state dicts)."""
        return dataclasses.asdict(self)


@_keywords_named
@dataclass(frozen=True)
class EMA(_Schedule):
    """Exponential moving average; ``power`` turns on the warm-up ``d_j = min(decay, 1 - (1 + (j-1)/inv_gamma)^-power)``."""

    decay: float = 0.999
    every: int = 1
    start: int = 0
    power: float | None = None
    inv_gamma: float = 1.0
    kind: ClassVar[str] = "ema"

    def __post_init__(self):
        _check_real(self, "decay", "in [0, 1)")
        if not 0 <= self.decay < 1:
            raise ValueError(f"EMA.decay must be in [0, 1), got {self.decay}")
        _check_int(self, "every", 1)
        _check_int(self, "start", 0)
        if self.power is not None:
            _check_real(self, "power", "> 0 (or None)")
            if not (self.power > 0 and math.isfinite(self.power)):
                raise ValueError(f"EMA.power must be None or a finite number > 0, got {self.power}")
        _check_real(self, "inv_gamma", "> 0")
        if not (self.inv_gamma > 0 and math.isfinite(self.inv_gamma)):
            raise ValueError(f"EMA.inv_gamma must be a finite number > 0, got {self.inv_gamma}")

    def decay_at(self, j: int) -> float:
        """The decay ``d_j`` of the j-th due update (j >= 2)."""
        if self.power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + (j - 1) / self.inv_gamma) ** (-self.power))

    def weight(self, j: int) -> float:
        """The lerp weight of the j-th due update: 1 (a copy) for j == 1, else ``1 - d_j``."""
        return 1.0 if j == 1 else 1.0 - self.decay_at(j)


@_keywords_named
@dataclass(frozen=True)
class SWA(_Schedule):
    """Stochastic weight averaging: the uniform mean of every due snapshot."""

    every: int = 1
    start: int = 0
    kind: ClassVar[str] = "swa"

    def __post_init__(self):
        _check_int(self, "every", 1)
        _check_int(self, "start", 0)

    def weight(self, j: int) -> float:
        """The lerp weight of the j-th due update: ``1 / j`` (so the first is a copy)."""
        return 1.0 / j


@_keywords_named
@dataclass(frozen=True)
class LAWA(_Schedule):
    """Latest weight averaging: the uniform mean of the latest ``window`` due snapshots."""

    window: int = 5
    every: int = 1000
    start: int = 0
    kind: ClassVar[str] = "lawa"

    def __post_init__(self):
        _check_int(self, "window", 1)
        _check_int(self, "every", 1)
        _check_int(self, "start", 0)

    def slot(self, j: int) -> int:
        """The ring slot the j-th due snapshot is written to."""
        return (j - 1) % self.window


Spec = EMA | SWA | LAWA
SPECS: dict[str, type] = {"ema": EMA, "swa": SWA, "lawa": LAWA}


def num_averaged(spec: Spec, n: int) -> int:
    """Snapshots in the average after ``n`` due steps: ``n``, or ``min(n, window)`` for LAWA."""
    return min(n, spec.window) if isinstance(spec, LAWA) else n


def parse_averaging(averaging, spec_kwargs: dict) -> dict[str, Spec]:
    """Turn ``wrap``'s ``averaging`` argument (a name, a spec or a dict of specs) into ``{name: spec}``."""
    if isinstance(averaging, str):
        if averaging not in SPECS:
            raise ValueError(f"unknown averaging method {averaging!r}; expected one of {sorted(SPECS)}")
        return {averaging: SPECS[averaging](**spec_kwargs)}
    if spec_kwargs:
        raise TypeError(
            f"spec keywords {sorted(spec_kwargs)} are only accepted with a method name; "
            "put them in the spec object instead"
        )
    if isinstance(averaging, (EMA, SWA, LAWA)):
        return {averaging.kind: averaging}
    if isinstance(averaging, dict):
        if not averaging:
            raise ValueError("averaging dict is empty; give at least one {name: spec}")
        for name, spec in averaging.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"average names must be non-empty strings, got {name!r}")
            if not isinstance(spec, (EMA, SWA, LAWA)):
                raise TypeError(f"average {name!r}: expected an EMA, SWA or LAWA spec, got {type(spec).__name__}")
        return dict(averaging)
    raise TypeError(
        f"averaging must be 'ema', 'swa', 'lawa', a spec or a dict of specs, got {type(averaging).__name__}"
    )
