"""Flat groups: the parameters of one (device, dtype), laid end to end in memory order.

Parameters stay where they are. A group keeps a 1-D view of each one (built once; it shares the
parameter's memory, so the optimizer's in-place updates show through it), the offsets of each in
the group's flat vector, and what it needs to notice a parameter replaced after wrapping.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from operator import attrgetter

import torch

_data_ptr = torch.Tensor.data_ptr
_shape = attrgetter("shape")


def _params_check(params: list[torch.Tensor]):
    """``f()``: whether ``params`` still have their present data pointers and shapes, checked in
    fastavg._C; None without the extension."""
    from .native_backend import params_check  # here, not at the top: backends import this module

    if params_check is None:
        return None
    return functools.partial(params_check.params_unchanged, params_check.params_snapshot(params), params)


def collect_params(params) -> tuple[list[torch.Tensor], list[str]]:
    """Parameters and their names from tensors, (name, tensor) pairs or param-group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single Tensor")
    if isinstance(params, torch.nn.Module):  # a Sequential iterates over its layers, not its tensors
        raise TypeError(
            f"params must be an iterable of tensors or of param-group dicts, got the module "
            f"{type(params).__name__}: pass model.parameters() or model.named_parameters()"
        )
    if isinstance(params, Mapping):  # a state dict (or one param group) iterates over its keys
        fix = "a list of param groups: [group]" if "params" in params else "its .items() for names and tensors"
        raise TypeError(
            f"params must be an iterable of tensors or of param-group dicts, got {type(params).__name__}, a "
            f"mapping (it iterates over its keys): pass model.parameters(), model.named_parameters() or {fix}"
        )
    try:
        items = list(params)
    except TypeError:
        call = f" {getattr(params, '__name__', '')}: call it" if callable(params) else ""  # model.parameters
        raise TypeError(
            f"params must be an iterable of tensors or param-group dicts, got {type(params).__name__}{call}"
        ) from None
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    for item in items:
        if isinstance(item, dict):
            if "params" not in item:
                raise TypeError("a param-group dict needs a 'params' entry")
            group = item["params"]
            group = [group] if isinstance(group, torch.Tensor) else list(group)
            group_names = item.get("param_names")
            for i, p in enumerate(group):
                tensors.append(p)
                names.append(group_names[i] if group_names else None)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names.append(item[0])
            tensors.append(item[1])
        else:
            tensors.append(item)
            names.append(None)
    if not tensors:
        raise ValueError("no parameters to average: params is empty")
    seen = set()
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a torch.Tensor")
        if id(p) in seen:
            raise ValueError(f"parameter {i} appears more than once")
        seen.add(id(p))
        names[i] = names[i] or f"param {i}"
    for name, p in zip(names, tensors):
        _check_param(name, p)
    _check_no_shared_memory(tensors, names)
    return tensors, names


def _check_no_shared_memory(tensors: list[torch.Tensor], names: list[str]) -> None:
    """ValueError if two parameters share memory (two Parameters over one tensor, or overlapping
    views): swapping an average into one would change the other, whose backup would then hold the
    average, and the training values could not come back."""
    spans = sorted(
        (str(p.device), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), name)
        for p, name in zip(tensors, names)
        if p.numel() > 0  # dense (checked above): the elements fill [data_ptr, data_ptr + bytes)
    )
    for (device, _, end, name), (next_device, start, _, next_name) in zip(spans, spans[1:]):
        if device == next_device and start < end:
            raise ValueError(
                f"parameters {name!r} and {next_name!r} share memory; average each tensor once "
                "(tied weights: one Parameter object, listed once)"
            )


def _check_param(name: str, p: torch.Tensor) -> None:
    if type(p).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        # A subclass that redirects every operation (DTensor, quantised tensors) has no memory of
        # its own elements for a kernel to address: its data_ptr() is 0 and as_strided fails.
        kind = type(p).__name__
        if kind == "DTensor":
            raise TypeError(
                f"parameter {name!r} is a DTensor (FSDP2 or tensor parallelism); fastavg averages plain tensors. "
                "Average each rank's shard instead: fastavg.Averager([p.to_local() for p in model.parameters()], "
                "...), with its step() after each optimizer step (README, 'Sharded parameters')"
            )
        raise TypeError(
            f"parameter {name!r} is a {kind}, a tensor subclass that redirects its operations; fastavg "
            "averages plain tensors in memory"
        )
    if p.is_meta:
        # No values to average, and data_ptr() is 0 for every meta tensor, so the check for
        # replaced parameters could not see the model materialised behind the optimizer's back.
        raise ValueError(
            f"parameter {name!r} is on the meta device and holds no values; materialise the model "
            "(model.to_empty(device=...) and initialise it, or load its weights) before building the "
            "optimizer and wrapping it"
        )
    if p.is_sparse or p.layout != torch.strided:
        raise ValueError(f"parameter {name!r} is sparse ({p.layout}); only dense tensors can be averaged")
    if not p.is_floating_point():
        raise ValueError(f"parameter {name!r} has dtype {p.dtype}; only floating-point tensors can be averaged")
    if not _is_dense(p):
        raise ValueError(
            f"parameter {name!r} (shape {list(p.shape)}, stride {list(p.stride())}) has gaps or overlaps "
            "in memory; only dense parameters can be averaged"
        )


def _is_dense(p: torch.Tensor) -> bool:
    """Whether ``p`` covers exactly ``numel`` consecutive elements (any dimension order)."""
    if p.numel() <= 1:
        return True  # strides of empty and single-element tensors say nothing about memory
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(p.shape, p.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_view(p: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order."""
    return p.as_strided((p.numel(),), (1,), p.storage_offset())


def default_average_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float32 averages for 16-bit (and narrower) parameters; the parameter's own dtype otherwise."""
    return torch.float32 if param_dtype.itemsize < 4 else param_dtype


def check_average_dtype(dtype, param_dtypes: Iterable[torch.dtype]) -> None:
    """``dtype=``: None, or a floating dtype that holds every parameter dtype exactly."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None or a torch.dtype, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if dtype.itemsize < 2:
        raise ValueError(
            f"dtype {dtype}: torch has no arithmetic for 8-bit floats, so averages cannot be kept in them; "
            "use float32 (the default for them) or another float of 16 bits or more"
        )
    for param_dtype in param_dtypes:
        if not holds_exactly(dtype, param_dtype):
            raise ValueError(
                f"dtype {dtype} is narrower than the parameters' {param_dtype}; averages must be at least as wide"
            )


def holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether ``wide`` holds every value of ``narrow``: as many significant bits, as large a maximum,
    and a step at the bottom of its range (its smallest subnormal) that divides ``narrow``'s."""
    # Not torch.promote_types: it refuses every pair with a float8 dtype, float32 included.
    if wide == narrow:
        return True
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return w.eps <= n.eps and w.max >= n.max and w.smallest_normal * w.eps <= n.smallest_normal * n.eps


class FlatGroup:
    """The parameters of one (device, dtype) and their place in the group's flat vector."""

    def __init__(
        self, params: list[torch.Tensor], names: list[str], index: list[int], average_dtype: torch.dtype, backend
    ):
        self.params = params
        self.backend = backend
        self.names = names
        self.index = index  # position of each parameter in the averager's parameter order
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.average_dtype = average_dtype
        self.numels = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self._bind()

    @property
    def label(self) -> str:
        """The group's device and dtype as errors name them, e.g. ``cuda:0/bfloat16``."""
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"

    def _bind(self) -> None:
        """Views of the parameters, the backend's table of them, and the snapshot that detects their replacement."""
        # Views share the parameters' storage, which also keeps that memory alive: a replaced
        # parameter's new storage can never reuse the old address and pass the pointer check.
        # detach(): same storage and version counter, no autograd history.
        self.flat_params = [memory_view(p.detach()) for p in self.params]
        self._ptrs = list(map(_data_ptr, self.params))
        self._shapes = list(map(_shape, self.params))
        self._unchanged = _params_check(self.params)
        self.table = self.backend.make_table(self)

    def __getstate__(self) -> dict:
        # Copies and pickles rebuild the views from the (copied) parameters: Parameter.__deepcopy__
        # clones its data, so copied views would no longer alias them, and pointers mean nothing there.
        bound = ("flat_params", "_ptrs", "_shapes", "_unchanged", "table")
        return {k: v for k, v in self.__dict__.items() if k not in bound}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind()

    def check_unchanged(self) -> None:
        """Raise RuntimeError naming a parameter whose storage or shape was replaced after wrapping."""
        # Paid on every step that updates an average: in C where fastavg._C is built (a few ns per
        # parameter), else map() over C-level getters (~0.17 us per parameter).
        if self._unchanged is not None:
            if self._unchanged():
                return
        elif list(map(_data_ptr, self.params)) == self._ptrs and list(map(_shape, self.params)) == self._shapes:
            return
        for name, p, ptr, shape in zip(self.names, self.params, self._ptrs, self._shapes):
            if p.data_ptr() != ptr or p.shape != shape:
                raise RuntimeError(
                    f"parameter {name!r} was replaced after wrapping (storage or shape changed, e.g. by "
                    "`p.data = ...` or `model.to(...)`); fastavg's buffers still describe the old one. "
                    "Move or convert the model before wrapping the optimizer, or wrap again."
                )

    def mark_params_written(self) -> None:
        """Tell autograd that every parameter was written in place (a swap in or out of averaged())."""
        # The native and Triton kernels write through raw pointers, and eager calls skip the
        # dispatcher, so nothing bumps the parameters' version counters: a graph that saved a
        # parameter on one side of the write would backpropagate through the other side's values
        # without a word. Bumped, autograd raises as it does for the torch backend's in-place copies
        # (for which the extra bump changes nothing).
        for p in self.params:
            torch.autograd.graph.increment_version(p)

    def param_view(self, flat: torch.Tensor, i: int, leading: tuple[int, ...] = ()) -> torch.Tensor:
        """Parameter ``i``'s slice of a flat ``(N,)`` (or ``(*leading, N)``) buffer, shaped and strided like it."""
        p = self.params[i]
        lead_strides = tuple(flat.stride()[: len(leading)])
        return flat.as_strided(
            (*leading, *p.shape), (*lead_strides, *p.stride()), flat.storage_offset() + self.offsets[i]
        )


def make_groups(params: list[torch.Tensor], names: list[str], dtype, backend: str) -> list[FlatGroup]:
    """One FlatGroup per (device, dtype), in order of first appearance, each with its backend."""
    from .ops import resolve_backend  # ops imports backends, which may import this module

    check_average_dtype(dtype, {p.dtype for p in params})
    members: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        members.setdefault((p.device, p.dtype), []).append(i)
    return [
        FlatGroup(
            [params[i] for i in index],
            [names[i] for i in index],
            index,
            dtype or default_average_dtype(param_dtype),
            resolve_backend(backend, device, param_dtype),
        )
        for (device, param_dtype), index in members.items()
    ]
