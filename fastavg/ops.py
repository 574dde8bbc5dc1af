"""The fused in-place ops, named once; each backend registers them in its own namespace.

Every op works on ONE flat group (parameters of one device and dtype). ``params`` are the group's
parameters as 1-D views in memory order; their concatenation is the group's flat parameter vector
``p`` of ``N`` elements. ``table`` is the backend's description of where they live, built once per
group by ``Backend.make_table`` (kernels read the parameters through its pointers; the torch
backend needs none and gets an empty tensor). Averages are flat ``(N,)`` buffers, LAWA rings
``(window, N)`` buffers in the parameter dtype.

- ``update_``: for every ``(avg, w)``: ``avg.lerp_(p, w)`` in the averages' dtype; w == 1 is a
  copy that never reads ``avg`` (a first update must not keep a NaN left in the buffer); for every ``(ring, slot)``: ``ring[slot] = p``. One read of ``p`` serves them all.
- ``swap_in_``: ``backup = p; p = average`` (cast to the parameter dtype).
- ``swap_in_ring_``: ``backup = p; p = mean(ring[:count])``, the mean taken in float64, rounded to
  ``dtype`` (the averages' dtype) and then to the parameter dtype, so it equals ``ring_mean_``.
- ``restore_``: ``p = backup``, bit for bit.
- ``ring_mean_``: ``out = mean(ring[:count])``, taken in float64 and rounded to ``out.dtype``.

A namespace cannot hold both Python definitions and a C++ ``TORCH_LIBRARY`` (loading the .so then
aborts), and one (op, device) slot cannot hold two backends: hence one namespace per backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SCHEMAS: dict[str, str] = {
    "update_": "(Tensor[] params, Tensor table, Tensor(a!)[] averages, float[] weights, Tensor(b!)[] rings, int[] slots) -> ()",
    "swap_in_": "(Tensor(a!)[] params, Tensor table, Tensor(b!) backup, Tensor average) -> ()",
    "swap_in_ring_": "(Tensor(a!)[] params, Tensor table, Tensor(b!) backup, Tensor ring, int count, ScalarType dtype) -> ()",
    "restore_": "(Tensor(a!)[] params, Tensor table, Tensor backup) -> ()",
    "ring_mean_": "(Tensor(a!) out, Tensor ring, int count) -> ()",
}

# Which arguments each op writes (torch.library needs them by name).
MUTATES: dict[str, tuple[str, ...]] = {
    "update_": ("averages", "rings"),
    "swap_in_": ("params", "backup"),
    "swap_in_ring_": ("params", "backup"),
    "restore_": ("params",),
    "ring_mean_": ("out",),
}

NAMESPACES: dict[str, str] = {"torch": "fastavg_ref", "triton": "fastavg_triton", "native": "fastavg_native"}


def register_python_ops(namespace: str, impls: dict[str, Callable]) -> dict[str, Callable]:
    """Register every op of SCHEMAS in ``namespace`` as an opaque custom op; returns the op handles."""
    ops = {}
    for name, schema in SCHEMAS.items():
        op = torch.library.custom_op(f"{namespace}::{name}", impls[name], mutates_args=MUTATES[name], schema=schema)
        # The ops mutate in place and return nothing, so the fake (meta) kernel has nothing to do.
        op.register_fake(_no_op)
        ops[name] = op
    return ops


def _no_op(*args, **kwargs) -> None:
    return None


def update_launches(averages, weights, rings, slots, max_averages: int, max_rings: int) -> list[tuple]:
    """``update_``'s buffers in batches for kernels that take at most ``max_averages`` averages and
    ``max_rings`` ring slots per launch: a list of (averages, weights, ring slot views), one per launch."""
    slot_views = [ring[slot] for ring, slot in zip(rings, slots)]
    if len(averages) <= max_averages and len(slot_views) <= max_rings:
        # One launch, the usual case: runs every training step, so it skips the batching (1 us).
        return [(averages, weights, slot_views)] if averages or slot_views else []
    launches = max(-(-len(averages) // max_averages), -(-len(slot_views) // max_rings))
    return [
        (
            averages[i * max_averages : (i + 1) * max_averages],
            weights[i * max_averages : (i + 1) * max_averages],
            slot_views[i * max_rings : (i + 1) * max_rings],
        )
        for i in range(launches)
    ]


# The parameter dtypes of the Triton and native kernels (float8 weights: the torch reference).
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass
class Backend:
    """One backend: direct callables for eager mode, registered ops for tracing, and availability."""

    name: str
    impls: dict[str, Callable]
    ops: dict[str, Callable]
    # A device (its type; native also asks its index, or the current device's) -> None, or why the
    # backend cannot run there.
    unavailable: Callable[[torch.device], str | None]
    make_table: Callable  # FlatGroup -> the table tensor its ops take (built once per group)
    speed_rank: dict[str, int] = field(default_factory=dict)  # device type -> rank; "auto" takes the highest
    # The parameter dtypes its kernels take; None: every floating dtype (the torch reference).
    param_dtypes: frozenset[torch.dtype] | None = None

    def call(self, op: str, *args) -> None:
        """Run ``op``: the implementation directly in eager mode, the registered op when compiling."""
        # A registered op costs a dispatcher round trip per call: +100 us over GPT-2's 148 tensors
        # (measured, CPU; 25% of the 0.41 ms an H100 needs for GPT-2's EMA at full bandwidth), so
        # eager mode skips it. Tracing (torch.compile) needs the opaque op: it must not look inside.
        if torch.compiler.is_compiling():
            self.ops[op](*args)
        else:
            self.impls[op](*args)

    def __reduce__(self):
        # Backends are per-process singletons holding op handles: copies and pickles refer by name.
        return (backend_by_name, (self.name,))


_BACKENDS: dict[str, Backend] = {}
BACKEND_NAMES = ("torch", "triton", "native")


def add_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name."""
    _BACKENDS[backend.name] = backend


def backend_by_name(name: str) -> Backend:
    """The registered backend called ``name``."""
    _load_backends()
    return _BACKENDS[name]


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")


def available_backends(device=None) -> dict[str, str | None]:
    """For a device (default: CUDA if available, else CPU): ``None`` per usable backend, else why not.

    ``"cuda"`` with no index means the current CUDA device."""
    device = _as_device(device)
    _load_backends()
    out = {}
    for name in BACKEND_NAMES:
        backend = _BACKENDS.get(name)
        out[name] = "not registered" if backend is None else backend.unavailable(device)
    return out


def resolve_backend(name: str, device, param_dtype: torch.dtype | None = None) -> Backend:
    """The backend to run on ``device`` (a str or torch.device), for parameters of ``param_dtype``
    when given: ``name`` itself, or the fastest available for "auto"."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(BACKEND_NAMES)}")
    device = _as_device(device)
    reasons = available_backends(device)
    if name == "auto":
        usable = [_BACKENDS[n] for n, why in reasons.items() if why is None and _takes(_BACKENDS[n], param_dtype)]
        return max(usable, key=lambda b: b.speed_rank.get(device.type, 0))
    if reasons[name] is not None:
        raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors: {reasons[name]}")
    backend = _BACKENDS[name]
    if not _takes(backend, param_dtype):
        taken = ", ".join(str(d).removeprefix("torch.") for d in sorted(backend.param_dtypes, key=str))
        raise RuntimeError(
            f"backend {name!r} cannot average {str(param_dtype).removeprefix('torch.')} parameters: its kernels "
            f"take {taken}; backend='torch' (or 'auto') averages every floating dtype"
        )
    return backend


def _takes(backend: Backend, param_dtype: torch.dtype | None) -> bool:
    return param_dtype is None or backend.param_dtypes is None or param_dtype in backend.param_dtypes


def _load_backends() -> None:
    # Imported here, not at module top: each backend module imports this one to register itself.
    from . import native_backend, torch_backend, triton_backend  # noqa: F401
