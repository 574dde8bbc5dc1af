"""Backend "native": the compiled extension fastavg._C (csrc/), C++ kernels for CPU tensors and
CUDA kernels for CUDA tensors, registered in C++ under torch.ops.fastavg_native."""

from __future__ import annotations

import functools

import torch

from .ops import KERNEL_DTYPES, SCHEMAS, Backend, add_backend
from .table import build_table

try:
    from . import _C  # loading it registers the ops

    MISSING = None
    # Its C check that parameters were not replaced (flat.py), where the build has it.
    params_check = _C if hasattr(_C, "params_unchanged") else None
except ImportError as err:
    params_check = None
    MISSING = (
        f"the compiled extension fastavg._C is not built ({err}); reinstall where a C++ compiler and torch "
        "are present: `pip install --no-build-isolation .` (and FASTAVG_NO_NATIVE unset)"
    )


def unavailable(device: torch.device) -> str | None:
    """None where the native backend runs on ``device``'s tensors (CUDA: that device, or the current one), else why not."""
    if MISSING:
        return MISSING
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastavg_native::update_", "CUDA"):
            return "fastavg._C was built without CUDA: rebuild where nvcc and a CUDA build of torch are present"
        return kernels_missing(torch.cuda.current_device() if device.index is None else device.index)
    return f"fastavg._C has no kernels for {device.type} tensors"


@functools.cache
def kernels_missing(device: int) -> str | None:
    """None where fastavg._C's CUDA kernels run on CUDA device ``device``, else why not and how to fix it.

    A build for other architectures (a wheel built for sm_80 and sm_90, on a B200) loads and registers
    its ops, then fails at the first launch; asked here, "auto" takes another backend instead.
    """
    try:
        why = torch.ops.fastavg_native_cuda.kernels_missing(device)
    except RuntimeError as err:  # a device that cannot be selected: whatever failed here fails a launch too
        return f"fastavg._C could not check its CUDA kernels on CUDA device {device} ({err})"
    if not why:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"fastavg._C has no CUDA kernels for this GPU ({torch.cuda.get_device_name(device)}, compute capability "
        f"{major}.{minor}; CUDA: {why}); rebuild it on this machine: "
        f"`TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation .`"
    )


def _make_table(group) -> torch.Tensor:
    # The CUDA kernels read parameters through the table; the CPU kernels walk the tensors themselves.
    if group.device.type == "cuda":
        return build_table(group.flat_params)
    # On the group's device by name: a table on torch's default device, where that is another
    # (torch.set_default_device("cuda") around a CPU model), would send the op to that device's kernel.
    return torch.empty(0, dtype=torch.int64, device=group.device)


def _no_op(*args, **kwargs) -> None:
    return None


def _check_count(op, ring_at: int):
    """The ring ops' count checked in Python before the C++ op runs.

    On the H200 machine (torch 2.11, extension built there) a failed TORCH_CHECK inside fastavg._C
    once crashed the process (segfault, run 2) instead of raising; it raised in runs 3 and 4, and
    with torch 2.13 here. Cause not found; checking here gives the same ValueError on every torch.
    """

    def call(*args):
        ring, count = args[ring_at], args[ring_at + 1]  # the count follows the ring in both schemas
        if not 1 <= count <= ring.shape[0]:
            raise ValueError(f"count must be in [1, {ring.shape[0]}], got {count}")
        return op(*args)

    return call


OPS = {}
IMPLS = {}
if MISSING is None:
    for _name in SCHEMAS:
        # In-place ops returning nothing: the fake (meta) kernel has nothing to do.
        torch.library.register_fake(f"fastavg_native::{_name}", _no_op)
        OPS[_name] = getattr(torch.ops.fastavg_native, _name).default
    # C++ ops: dispatch costs microseconds, so eager mode calls the registered op itself.
    IMPLS = dict(
        OPS, ring_mean_=_check_count(OPS["ring_mean_"], 1), swap_in_ring_=_check_count(OPS["swap_in_ring_"], 3)
    )

BACKEND = Backend(
    name="native",
    impls=IMPLS,
    ops=OPS,
    unavailable=unavailable,
    make_table=_make_table,
    # H200, GPT-2 shapes (bench/results): faster than triton on every update in the run with both.
    speed_rank={"cpu": 1, "cuda": 3},
    param_dtypes=KERNEL_DTYPES,
)
add_backend(BACKEND)
