"""AveragedOptimizer and wrap(): a torch.optim.Optimizer that keeps weight averages as it steps."""

from __future__ import annotations

import functools
import sys
import warnings
from collections import OrderedDict
from itertools import chain

import torch
from torch.optim import optimizer as torch_optimizer

from . import state
from .averager import Averager

_AMP_ATTRS = ("grad_scale", "found_inf")
_NO_TRAINING_STEP = object()  # AveragedOptimizer._due while torch.distributed.checkpoint makes the inner state


def _hooked_step(step):
    """``step`` inside what torch.optim wraps every optimizer's step in (``profile_hook_step``):
    the global and per-optimizer step hooks, in torch's order, and the profiler label.

    torch enters that label on every call, two dispatcher round trips (10 us here, torch 2.11 and
    2.13) whether a profiler runs or not: the largest part of the wrapper's host cost, paid again
    by the inner optimizer's step. This one enters it only when a profiler runs (or when compiling,
    where it costs nothing at run time), so a profile shows the same ``Optimizer.step#...`` range.
    """

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        optimizer = args[0]
        if torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(optimizer).__name__}.step"):
                return _run_step_hooks(step, optimizer, args, kwargs)
        return _run_step_hooks(step, optimizer, args, kwargs)

    wrapper.hooked = True  # Optimizer._patch_step_function then leaves it alone
    return wrapper


def _run_step_hooks(step, optimizer, args, kwargs):
    # As torch.optim.Optimizer.profile_hook_step: the hooks see args with the optimizer first.
    for pre_hook in chain(
        torch_optimizer._global_optimizer_pre_hooks.values(), optimizer._optimizer_step_pre_hooks.values()
    ):
        result = pre_hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    out = step(*args, **kwargs)
    optimizer._optimizer_step_code()
    for post_hook in chain(
        optimizer._optimizer_step_post_hooks.values(), torch_optimizer._global_optimizer_post_hooks.values()
    ):
        post_hook(optimizer, args, kwargs)
    return out


def _making_optimizer_state() -> bool:
    """Whether this ``step()`` is torch.distributed.checkpoint's ``_init_optim_state``: on an
    optimizer with no state yet it sets every gradient to zeros and every learning rate to 0 and
    calls ``step()`` once, only so that the inner optimizer creates its state before a save or load.
    No training step happened, so fastavg must not count it or take a snapshot (as with a step
    GradScaler skips). Its frame is two to four calls up (through the step wrappers)."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and frame.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            return True
        frame = frame.f_back
    return False


# The global hooks and the profiler's entry point are private to torch.optim; where a torch lacks
# them, its own wrapper is used.
_CAN_HOOK_STEP = all(
    hasattr(torch_optimizer, name) for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
) and hasattr(torch.optim.Optimizer, "_optimizer_step_code")


class AveragedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; every ``step()`` also updates the averages due at that step.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so
    schedulers, gradient clipping and GradScaler act on it exactly as without the wrapper.
    """

    def __init__(self, optimizer, averaging="ema", *, backend="auto", dtype=None, **spec_kwargs):
        if isinstance(optimizer, torch.nn.Module):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got the module {type(optimizer).__name__}: wrap "
                "the optimizer (fastavg.wrap(torch.optim.AdamW(model.parameters()), ...)), or average "
                "the module's parameters with fastavg.Averager(model.parameters(), ...)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, AveragedOptimizer):
            raise TypeError(
                "optimizer is already an AveragedOptimizer; keep several averages with a dict of specs instead"
            )
        # Optimizer.__init__ is not called: it would build param_groups of its own. These are the
        # attributes it sets that the base class's methods and hooks rely on.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.averager = Averager(optimizer.param_groups, averaging, backend=backend, dtype=dtype, **spec_kwargs)

    # Properties, not copies: the inner load_state_dict() rebinds its `state` and `param_groups`.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler asks the optimizer it is given; a fused inner optimizer unscales inside its step.
        return getattr(self.optimizer, "_step_supports_amp_scaling", False)

    @property
    def step_count(self) -> int:
        """``t``: the number of ``step()`` calls so far (steps GradScaler skipped do not count)."""
        return self.averager.step_count

    @property
    def names(self) -> list[str]:
        """The averages' names."""
        return self.averager.names

    def num_averaged(self, name: str | None = None) -> int:
        """Snapshots in average ``name`` so far."""
        return self.averager.num_averaged(name)

    def averaged(self, name: str | None = None):
        """Context manager: the parameters hold average ``name`` inside, training values bit for bit after."""
        return self.averager.averaged(name)

    def averaged_params(self, name: str | None = None) -> list[torch.Tensor]:
        """New tensors holding average ``name`` in the averages' dtype, in parameter order."""
        return self.averager.averaged_params(name)

    def step(self, closure=None):
        """The inner optimizer's step, then the update of every average due at the new ``t``."""
        self._before_inner_step()
        # GradScaler sets grad_scale / found_inf on the optimizer it was given (this wrapper) when
        # the inner one is fused; the fused step reads them from itself, so hand them on.
        amp = {name: self.__dict__[name] for name in _AMP_ATTRS if name in self.__dict__}
        for name, value in amp.items():
            setattr(self.optimizer, name, value)
        try:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            for name in amp:
                self.optimizer.__dict__.pop(name, None)
        self._after_inner_step(amp.get("found_inf"))
        return loss

    if _CAN_HOOK_STEP:
        step = _hooked_step(step)

    # The schedule is host-side bookkeeping: under torch.compile it stays out of the graph (a
    # traced t or n would be guarded on and recompile as the schedule moves); the inner
    # optimizer's step still compiles. The due list passes through self, not through the frame.
    @torch.compiler.disable
    def _before_inner_step(self) -> None:
        averager = self.averager
        averager.check_can_step()
        # `not self.state` first: the frames are read only while the inner optimizer has no state.
        if not self.state and _making_optimizer_state():
            self._due = _NO_TRAINING_STEP
            return
        self._due = averager.due_at(averager.step_count + 1)
        if self._due:
            averager.check_params()  # before the inner step runs and before t advances

    @torch.compiler.disable
    def _after_inner_step(self, found_inf) -> None:
        due, self._due = self._due, None
        if due is _NO_TRAINING_STEP:
            return
        # A step GradScaler skips is no call (API.md). The fused path skips on the device, so the
        # only way to know is a host read; GradScaler's non-fused path makes the same read.
        if found_inf is not None and bool(found_inf.item()):
            return
        self.averager.advance(due)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group) -> None:
        """Not supported after wrapping: the averages' buffers are laid out at wrap time."""
        raise RuntimeError("add_param_group() after wrapping is not supported: add every group, then wrap")

    # The state-dict hooks registered on the wrapper run as torch.optim.Optimizer runs its own
    # (the inner optimizer's hooks run inside its own calls); the wrapper's methods replace the
    # base class's, so they call them.
    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus a ``"fastavg"`` entry with every average."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd["fastavg"] = self.averager.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            sd = sd if result is None else result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of ``state_dict()``; nothing changes unless everything is valid."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        self.averager.check_can_load("load_state_dict()")  # before the inner optimizer loads
        state_dict = state_dict.copy()  # shallow, as torch.optim: a pre-hook may edit its copy
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if "fastavg" not in state_dict and {"version", "averages"} <= state_dict.keys():
            raise ValueError(
                "cannot load fastavg state: this is an Averager's state dict (opt.averager.state_dict()), "
                "without the inner optimizer's; load it with opt.averager.load_state_dict(sd)"
            )
        inner = {k: v for k, v in state_dict.items() if k != "fastavg"}
        if "fastavg" in state_dict:
            plan = state.validate(self.averager, state_dict["fastavg"])
            self.optimizer.load_state_dict(inner)  # validates itself before changing anything
            state.apply(self.averager, plan)
        else:
            self.optimizer.load_state_dict(inner)
            self.averager.reset()
            warnings.warn(
                "fastavg: the state dict has no 'fastavg' entry (saved from the unwrapped optimizer, or by "
                "torch.distributed.checkpoint's get_optimizer_state_dict, which keeps only 'state' and "
                "'param_groups'); the inner optimizer's state was loaded and the averages start afresh. "
                "Averages saved apart (opt.averager.state_dict()) load with opt.averager.load_state_dict()",
                stacklevel=2,
            )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; the wrapper is its __dict__.
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"AveragedOptimizer({self.optimizer!r}, {self.averager!r})"


def wrap(optimizer, averaging="ema", *, backend="auto", dtype=None, **spec_kwargs) -> AveragedOptimizer:
    """Wrap ``optimizer`` so it keeps weight averages: ``fastavg.wrap(opt, "lawa", window=5, every=200)``."""
    return AveragedOptimizer(optimizer, averaging, backend=backend, dtype=dtype, **spec_kwargs)
