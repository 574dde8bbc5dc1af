"""What the benchmark times: fastavg through opt.step() on each backend, and the stock paths.

Each case allocates its own buffers, runs a few untimed updates (past EMA's first, copying
update) and returns a callable for one step. Minimal bytes per parameter element follow
DESIGN.md's table, for parameter itemsize P and average itemsize A.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastavg

from . import native_launch

UPDATES = ("ema", "swa", "lawa", "all", "swap")
WINDOW = 5


def minimal_bytes_per_element(update: str, p: int, a: int) -> int:
    """Fewest bytes moved per element: EMA/SWA P+2A; LAWA 2P; all three 2P+4A; swap in+out 5P+A."""
    return {"ema": p + 2 * a, "swa": p + 2 * a, "lawa": 2 * p, "all": 2 * p + 4 * a, "swap": 5 * p + a}[update]


@dataclass
class Case:
    impl: str
    step: Callable[[], object]
    same_numerics: bool = True
    note: str = ""


class _NoOpOptimizer(torch.optim.Optimizer):
    """An inner optimizer that does nothing, so opt.step() times the averaging alone."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _specs(update: str) -> dict:
    every_step = {"ema": fastavg.EMA(0.999), "swa": fastavg.SWA(), "lawa": fastavg.LAWA(WINDOW, every=1)}
    if update == "all":
        return every_step
    return {"ema": every_step["ema"]} if update == "swap" else {update: every_step[update]}


def fastavg_case(update: str, params: list[torch.Tensor], backend: str, launch=None) -> Case:
    """fastavg on ``backend``, timed through opt.step() (its Python side counts). ``launch``: native
    CUDA launches at a ``native_launch.Setting`` (threads per block, unroll, one block per row or the
    persistent grid, LAWA alone's TMA stages) during each call, not the defaults."""
    hooks = native_launch.tuning_hooks() if launch is not None else None
    if launch is not None and (backend != "native" or hooks is None):  # refused before anything is built
        raise ValueError("a launch setting needs the native backend's CUDA build (its tuning hooks)")
    opt = fastavg.wrap(_NoOpOptimizer(params), _specs(update), backend=backend)
    for _ in range(2):
        opt.step()
    impl, note, step = f"fastavg-{backend}", "", opt.step
    if update == "swap":

        def step():
            with opt.averaged():
                pass

        note = "averaged() in and out"
    if launch is not None:
        timed = step

        def step():  # four to six hook calls, 7 to 20 us on a CI-like CPU: hidden behind the kernels
            with native_launch.launch_settings(hooks, *launch):
                timed()

        impl += f" {native_launch.label(*launch)}"
    return Case(impl, step, note=note)


def _averages_like(params, dtype):
    return [torch.zeros_like(p, dtype=dtype) for p in params]


def stock_case(update: str, params: list[torch.Tensor], average_dtype: torch.dtype) -> Case:
    """The best stock foreach path with the same numerics (what timm ModelEmaV3 and swa_utils run)."""
    cast = params[0].dtype != average_dtype
    scratch = _averages_like(params, average_dtype) if cast else None

    def source():
        # foreach lerp cannot mix dtypes: low-precision weights take a cast pass first.
        if cast:
            torch._foreach_copy_(scratch, params)
            return scratch
        return params

    ema, swa = _averages_like(params, average_dtype), _averages_like(params, average_dtype)
    ring = [[torch.zeros_like(p) for p in params] for _ in range(WINDOW)]
    slots = itertools.cycle(range(WINDOW))
    backup = [torch.empty_like(p) for p in params]

    def step():
        if update in ("ema", "all", "swa"):
            src = source()
            if update in ("ema", "all"):
                torch._foreach_lerp_(ema, src, 0.001)
            if update in ("swa", "all"):
                torch._foreach_lerp_(swa, src, 0.01)
        if update in ("lawa", "all"):
            torch._foreach_copy_(ring[next(slots)], params)
        if update == "swap":
            torch._foreach_copy_(backup, params)
            torch._foreach_copy_(params, ema)
            torch._foreach_copy_(params, backup)

    notes = {
        "lawa": "foreach copy into a ring",
        # fastavg's averaged() allocates its backup per call (on the CPU: page faults, README).
        "swap": "foreach copies (casting), backup kept between calls",
    }
    return Case("stock-foreach", step, note=notes.get(update, "cast pass + foreach" if cast else "foreach"))


def loop_case(update: str, params: list[torch.Tensor], average_dtype: torch.dtype) -> Case | None:
    """A Python loop of lerp_ per parameter (ema-pytorch's default, the paper's code)."""
    if update not in ("ema", "swa"):
        return None
    averages = _averages_like(params, average_dtype)
    weight = 0.001 if update == "ema" else 0.01

    def step():
        for a, p in zip(averages, params):
            a.lerp_(p.to(average_dtype), weight)

    return Case("loop-lerp_", step, note="per-tensor launches")


def averaged_model_case(update: str, params: list[torch.Tensor]) -> Case | None:
    """torch.optim.swa_utils.AveragedModel with the multi-tensor averaging functions (the stock API)."""
    if update not in ("ema", "swa"):
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

    module = torch.nn.Module()
    module.weights = torch.nn.ParameterList(params)
    multi_avg_fn = get_ema_multi_avg_fn(0.999) if update == "ema" else get_swa_multi_avg_fn()
    averaged = AveragedModel(module, multi_avg_fn=multi_avg_fn)
    for _ in range(2):
        averaged.update_parameters(module)
    low_precision = params[0].dtype in (torch.float16, torch.bfloat16)
    note = f"keeps {params[0].dtype} averages: updates round away" if low_precision else ""
    return Case("AveragedModel", lambda: averaged.update_parameters(module), not low_precision, note)
