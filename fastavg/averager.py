"""Averager: every named average of one run, updated together from one read of the parameters."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import torch

from . import state
from .flat import collect_params, make_groups
from .specs import EMA, LAWA, SWA, Spec, num_averaged, parse_averaging


def _warn_if_updates_round_away(specs: dict[str, Spec], dtype) -> None:
    """Warn when ``dtype=`` chose averages narrower than float32 for an EMA or SWA.

    A running average moves by a fraction f of its distance to the weights (EMA: 1 - decay; SWA:
    1/n). A move under half a unit in the last place rounds away, so in a dtype with epsilon eps,
    weights within eps / (2 f) of the average (relative to its size) leave it unchanged.
    LAWA is not at risk: its window is exact and its mean is taken in float64 when read.
    """
    if dtype is None or torch.finfo(dtype).eps <= torch.finfo(torch.float32).eps:
        return  # the default average dtypes are float32 or wider
    half_step = torch.finfo(dtype).eps / 2
    for name, spec in specs.items():
        if isinstance(spec, EMA) and half_step / (1 - spec.decay) > 0.01:
            lost = f"at decay {spec.decay}, weights within {half_step / (1 - spec.decay):.0%} of the average"
        elif isinstance(spec, SWA):
            lost = f"after n due steps, weights within n x {half_step:.2%} of the average ({100 * half_step:.0%} at n = 100)"
        else:
            continue
        warnings.warn(
            f"fastavg: average {name!r} is kept in {dtype} (dtype=): an update under half of its resolution "
            f"rounds away, so {lost} leave it unchanged; dtype=None keeps float32 averages",
            stacklevel=_first_frame_outside_fastavg(),
        )


def _first_frame_outside_fastavg() -> int:
    """The ``stacklevel`` that points a warning raised in this package at the user's line."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


class _Average:
    """One named average: its spec, its due count ``n`` and one buffer per flat group."""

    def __init__(self, name: str, spec: Spec, groups):
        self.name = name
        self.spec = spec
        self.n = 0
        if isinstance(spec, LAWA):
            # The ring holds the latest `window` snapshots in the parameter dtype, exactly; the mean
            # is taken when it is read, so it never drifts (DESIGN.md). Rows are padded to a multiple
            # of 8 elements so every slot starts 16-byte aligned (vector stores in the kernels).
            self.buffers = [
                torch.zeros(spec.window, -(-g.numel // 8) * 8, dtype=g.dtype, device=g.device)[:, : g.numel]
                for g in groups
            ]
        else:
            self.buffers = [torch.zeros(g.numel, dtype=g.average_dtype, device=g.device) for g in groups]

    @property
    def is_ring(self) -> bool:
        return isinstance(self.spec, LAWA)

    def count(self) -> int:
        return num_averaged(self.spec, self.n)


class Averager:
    """Keeps EMA / SWA / LAWA averages of ``params``; call ``step()`` once per training step."""

    def __init__(self, params, averaging="ema", *, backend="auto", dtype=None, **spec_kwargs):
        specs = parse_averaging(averaging, spec_kwargs)
        tensors, names = collect_params(params)
        self._groups = make_groups(tensors, names, dtype, backend)
        _warn_if_updates_round_away(specs, dtype)
        self._param_names = names
        self._averages = {name: _Average(name, spec, self._groups) for name, spec in specs.items()}
        self._t = 0
        self._open = False
        self._on_cuda = any(g.device.type == "cuda" for g in self._groups)

    # -- what users read ---------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """``t``: the number of ``step()`` calls so far."""
        return self._t

    @property
    def names(self) -> list[str]:
        """The averages' names, in the order given."""
        return list(self._averages)

    @property
    def specs(self) -> dict[str, Spec]:
        """``{name: spec}`` of every average."""
        return {name: a.spec for name, a in self._averages.items()}

    @property
    def backends(self) -> list[str]:
        """The backend that runs each flat group."""
        return [g.backend.name for g in self._groups]

    def num_averaged(self, name: str | None = None) -> int:
        """Snapshots in average ``name``: 0 before its first due step, then n (LAWA: min(n, window))."""
        return self._get(name).count()

    def __repr__(self) -> str:
        specs = ", ".join(f"{n}={a.spec}" for n, a in self._averages.items())
        return f"Averager({specs}, step_count={self._t}, groups={len(self._groups)}, backends={self.backends})"

    # -- the training-step path ----------------------------------------------------------------
    def due_at(self, t: int) -> list[_Average]:
        """The averages updated at step ``t`` (empty when none is due)."""
        return [a for a in self._averages.values() if a.spec.is_due(t)]

    def check_params(self) -> None:
        """RuntimeError naming any parameter replaced since wrapping."""
        for group in self._groups:
            group.check_unchanged()

    def check_can_step(self) -> None:
        """RuntimeError inside ``averaged()`` (the parameters hold an average, not the training
        values), and while a CUDA graph is being captured."""
        if self._open:
            raise RuntimeError("step() called inside averaged(): the parameters hold an average; leave the block first")
        # The schedule runs on the host: a replay would repeat this step's update (its weights, its
        # LAWA ring slot) and count nothing, so every average would go silently wrong.
        self._refuse_capture(
            "step()",
            "fastavg's schedule (which averages are due, their weights, LAWA's ring slot) runs on the host, "
            "so a replay would repeat this step's update without counting it. Capture the inner optimizer's "
            "step (opt.optimizer.step()) and call the averager's step() (opt.averager.step()) outside the "
            "graph, after each replay.",
        )

    def _refuse_capture(self, call: str, why: str) -> None:
        """RuntimeError while the current CUDA stream is capturing a graph, for CUDA parameters."""
        if self._on_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{call} while a CUDA graph is being captured: {why}")

    @torch.compiler.disable  # host-side schedule: see AveragedOptimizer._before_inner_step
    def step(self) -> None:
        """One training step happened: advance ``t`` and update every average due at it."""
        self.check_can_step()
        due = self.due_at(self._t + 1)
        if due:
            self.check_params()
        self.advance(due)

    def advance(self, due: list[_Average]) -> None:
        """Advance ``t`` and update ``due`` (= ``due_at(t + 1)``, parameters already checked)."""
        if due:
            self._update(due)
        self._t += 1  # after the update: if it raised, the schedule has not moved

    def _update(self, due: list[_Average]) -> None:
        lerped = [a for a in due if not a.is_ring]
        rings = [a for a in due if a.is_ring]
        weights = [a.spec.weight(a.n + 1) for a in lerped]
        slots = [a.spec.slot(a.n + 1) for a in rings]
        with torch.no_grad():
            # One op call per group, whatever the number and kinds of due averages.
            for gi, group in enumerate(self._groups):
                try:
                    group.backend.call(
                        "update_",
                        group.flat_params,
                        group.table,
                        [a.buffers[gi] for a in lerped],
                        weights,
                        [a.buffers[gi] for a in rings],
                        slots,
                    )
                except Exception as error:
                    if gi > 0:  # the earlier groups' averages moved: say so rather than let a retry double them
                        error.add_note(self._partial_update_note(gi, due))
                    raise
        for a in due:
            a.n += 1

    def _partial_update_note(self, failed: int, due: list[_Average]) -> str:
        """What an update that raised in group ``failed`` (> 0) left behind, and how to recover."""
        done = ", ".join(g.label for g in self._groups[:failed])
        return (
            f"fastavg: at step {self._t + 1}, {[a.name for a in due]} were already updated in the parameter "
            f"groups {done} when the group {self._groups[failed].label} raised; "
            "the step was not counted, so those groups' averages are ahead of the others'. Calling step() "
            "again would update them twice: load a saved state (load_state_dict) or start afresh (reset())."
        )

    # -- reading the averages ----------------------------------------------------------------
    def _get(self, name: str | None) -> _Average:
        if name is None:
            if len(self._averages) != 1:
                raise ValueError(f"several averages are kept; name one of {self.names}")
            return next(iter(self._averages.values()))
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name not in self._averages:
            raise ValueError(f"no average named {name!r}; the averages are {self.names}")
        return self._averages[name]

    @contextlib.contextmanager
    def averaged(self, name: str | None = None) -> Iterator[None]:
        """Inside the block the parameters hold average ``name``; on exit the training values return bit for bit."""
        average = self._get(name)
        if self._open:
            raise RuntimeError("averaged() is already open; nested averaged() blocks are not supported")
        self._refuse_capture(
            "averaged()",
            "what it swaps in (which average, how many LAWA snapshots, or nothing before the first due "
            "step) is decided on the host, so every replay would keep the choice made at capture as the "
            "averages move on. Capture the evaluation alone, and replay it inside averaged().",
        )
        self.check_params()
        self._open = True
        swapped: list[tuple[int, torch.Tensor]] = []
        try:
            if average.count() > 0:
                with torch.no_grad():
                    for gi, group in enumerate(self._groups):
                        backup = torch.empty(group.numel, dtype=group.dtype, device=group.device)
                        place = (group.flat_params, group.table, backup)
                        if average.is_ring:
                            ring_args = (average.buffers[gi], average.count(), group.average_dtype)
                            group.backend.call("swap_in_ring_", *place, *ring_args)
                        else:
                            group.backend.call("swap_in_", *place, average.buffers[gi])
                        swapped.append((gi, backup))
                        group.mark_params_written()
            yield
        finally:
            # Runs also when the block (or a later group's swap) raised: every group swapped in
            # gets its training values back before anything else happens.
            with torch.no_grad():
                for gi, backup in swapped:
                    group = self._groups[gi]
                    group.backend.call("restore_", group.flat_params, group.table, backup)
                    group.mark_params_written()
            self._open = False

    def _average_flat(self, average: _Average, gi: int) -> torch.Tensor:
        """A new flat tensor holding ``average`` for group ``gi`` in the averages' dtype."""
        group = self._groups[gi]
        out = torch.empty(group.numel, dtype=group.average_dtype, device=group.device)
        with torch.no_grad():
            if average.count() == 0:
                # Before the first due step the average is the parameters themselves.
                torch._foreach_copy_(out.split(group.numels), group.flat_params)
            elif average.is_ring:
                group.backend.call("ring_mean_", out, average.buffers[gi], average.count())
            else:
                out.copy_(average.buffers[gi])
        return out

    def averaged_params(self, name: str | None = None) -> list[torch.Tensor]:
        """New tensors holding average ``name`` in the averages' dtype, one per parameter, in parameter order."""
        average = self._get(name)
        self._refuse_capture("averaged_params()", "its tensors would hold the average only after a replay.")
        self.check_params()
        result: list[torch.Tensor | None] = [None] * len(self._param_names)
        for gi, group in enumerate(self._groups):
            flat = self._average_flat(average, gi)
            for i, index in enumerate(group.index):
                # clone: each export owns its memory (torch.save of a view would write the whole group).
                result[index] = group.param_view(flat, i).clone()
        return result

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every average, its schedule position and spec, as tensors and plain Python values."""
        return state.averager_state(self)

    def check_can_load(self, call: str) -> None:
        """RuntimeError while a CUDA graph is being captured: ``call`` would set the schedule now
        and leave the averages' tensors to a replay."""
        # Captured copies and fills run only on a replay, while t and the counts change on the host
        # at once: the averages would keep their old values under the new schedule.
        self._refuse_capture(
            call,
            "the averages' tensors would be written only when the graph is replayed, while the schedule "
            "(t and each average's count) changes at once. Call it outside the capture.",
        )

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of ``state_dict()``; validates everything before changing anything."""
        self.check_can_load("load_state_dict()")
        state.apply(self, state.validate(self, sd))

    def reset(self) -> None:
        """Start every average afresh: ``t = 0``, no snapshots."""
        self.check_can_load("reset()")
        self._t = 0
        for a in self._averages.values():
            a.n = 0
            for b in a.buffers:
                b.zero_()
