"""Backend "triton": the fused ops as Triton kernels (``kernels/``, installed as ``fastavg.kernels``).

CUDA tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the
kernels are first imported). The kernels are imported on first use, so ``import fastavg`` works
without Triton and ``available_backends()`` says why the backend is missing.
"""

from __future__ import annotations

import functools
import os
import re

import torch

from .ops import KERNEL_DTYPES, NAMESPACES, SCHEMAS, Backend, add_backend, register_python_ops


@functools.cache
def _kernels():
    from . import kernels

    return kernels


# The oldest Triton that compiles every kernel of kernels/: 3.0 and 3.1 (torch 2.4 and 2.5 pin them)
# reject them ("element_ty is a constexpr"), and the first launch would fail; 3.2 compiles them all.
MIN_TRITON = (3, 2)


def _too_old(version: str) -> str | None:
    numbers = re.match(r"(\d+)\.(\d+)", version)
    if numbers is None or tuple(map(int, numbers.groups())) >= MIN_TRITON:
        return None
    return (
        f"fastavg's Triton kernels need triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]} and this is triton {version}, "
        "with which they do not compile (torch 2.4 and 2.5 come with triton 3.0 and 3.1; torch >= 2.6 with one that "
        "compiles them); the native and torch backends do not need Triton"
    )


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable(device: torch.device) -> str | None:
    """None where the Triton backend runs on ``device``'s tensors, else why not."""
    device_type = device.type
    try:
        import triton
    except ImportError as err:
        return (
            f"Triton is not installed ({err}); `pip install triton` (CUDA) or run CPU tensors under TRITON_INTERPRET=1"
        )
    too_old = _too_old(triton.__version__)
    if too_old:
        return too_old
    try:
        _kernels()
    except ImportError as err:
        return f"fastavg's Triton kernels do not import with triton {triton.__version__} ({err})"
    from .kernels.table import INTERPRET

    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if INTERPRET:
            return (
                "TRITON_INTERPRET=1 was set when the kernels were loaded: the interpreter cannot follow device pointers"
            )
        # torch.compile's own rule for Triton (torch.utils._triton.has_triton): compute capability 7.0
        # or later. Before it, the first due step would fail in Triton's compiler, after the inner step.
        try:
            major, minor = torch.cuda.get_device_capability(device)  # no index: the current GPU
        except (AssertionError, RuntimeError) as err:  # torch's "Invalid device id" is an AssertionError
            return f"CUDA device {device} cannot be queried ({err})"
        if major < 7:
            return f"Triton needs a GPU of compute capability 7.0 or later; this one is {major}.{minor}"
        return None
    if device_type == "cpu":
        if not INTERPRET:
            why = "set TRITON_INTERPRET=1 before fastavg's Triton kernels are first imported"
            if _interpret_requested():
                why = "TRITON_INTERPRET=1 was set after the kernels were loaded; set it before importing fastavg"
            return f"Triton runs CPU tensors only in its interpreter: {why}"
        return None
    return f"Triton kernels do not run on {device_type} tensors"


def _impl(name: str):
    def call(*args):
        return getattr(_kernels(), name)(*args)

    call.__name__ = name
    return call


IMPLS = {name: _impl(name) for name in SCHEMAS}

BACKEND = Backend(
    name="triton",
    impls=IMPLS,
    ops=register_python_ops(NAMESPACES["triton"], IMPLS),
    unavailable=unavailable,
    make_table=lambda group: _kernels().build_table(group.flat_params),
    # Never "auto" on the CPU: the interpreter is for testing, orders of magnitude slower than torch.
    speed_rank={"cuda": 2, "cpu": -1},
    param_dtypes=KERNEL_DTYPES,
)
add_backend(BACKEND)
