"""Backend "native": the compiled extension fastavg._C (csrc/), C++ kernels for CPU tensors and
CUDA kernels for CUDA tensors, registered in C++ under torch.ops.fastavg_native."""

from __future__ import annotations

import torch

from .ops import SCHEMAS, Backend, add_backend
from .table import build_table

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    MISSING = None
except ImportError as err:
    MISSING = (
        f"the compiled extension fastavg._C is not built ({err}); reinstall where a C++ compiler and torch "
        "are present: `pip install --no-build-isolation .` (and FASTAVG_NO_NATIVE unset)"
    )


def unavailable(device_type: str) -> str | None:
    """None where the native backend runs on ``device_type`` tensors, else why not."""
    if MISSING:
        return MISSING
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastavg_native::update_", "CUDA"):
            return "fastavg._C was built without CUDA: rebuild where nvcc and a CUDA build of torch are present"
        return None
    return f"fastavg._C has no kernels for {device_type} tensors"


def _make_table(group) -> torch.Tensor:
    # The CUDA kernels read parameters through the table; the CPU kernels walk the tensors themselves.
    if group.device.type == "cuda":
        return build_table(group.flat_params)
    return torch.empty(0, dtype=torch.int64)


def _no_op(*args, **kwargs) -> None:
    return None


OPS = {}
if MISSING is None:
    for _name in SCHEMAS:
        # In-place ops returning nothing: the fake (meta) kernel has nothing to do.
        torch.library.register_fake(f"fastavg_native::{_name}", _no_op)
        OPS[_name] = getattr(torch.ops.fastavg_native, _name).default

BACKEND = Backend(
    name="native",
    impls=OPS,  # C++ ops: dispatch costs microseconds, so eager mode calls the registered op itself
    ops=OPS,
    unavailable=unavailable,
    make_table=_make_table,
    speed_rank={"cpu": 1, "cuda": 1},
)
add_backend(BACKEND)
