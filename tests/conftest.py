"""Shared fixtures: the backends to test, the cuda marker, and a float64 reference of API.md's formulas."""

from __future__ import annotations

import os

import pytest
import torch
from sanitizers import use_native_library_from_environment

# Without a GPU, Triton's kernels run on CPU tensors in its interpreter; that is decided when the
# kernels are defined, so it must be set before fastavg imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# test_sanitizers.py's child run: fastavg._C is the sanitized build it names.
use_native_library_from_environment()

import fastavg  # noqa: E402

CPU_BACKENDS = [name for name, why in fastavg.available_backends("cpu").items() if why is None]
# Without a GPU these are still collected (and skipped by the cuda marker), so they stay visible.
CUDA_BACKENDS = (
    [name for name, why in fastavg.available_backends("cuda").items() if why is None]
    if torch.cuda.is_available()
    else ["torch", "triton"]
)
TARGETS = [pytest.param((b, "cpu"), id=f"{b}-cpu") for b in CPU_BACKENDS] + [
    pytest.param((b, "cuda"), id=f"{b}-cuda", marks=pytest.mark.cuda) for b in CUDA_BACKENDS
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    """Every backend usable on CPU tensors here (the contract suite runs once per backend)."""
    return request.param


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    """(backend, device) pairs: every CPU backend on the CPU, every CUDA backend on the GPU."""
    return request.param


def ema_reference(spec: fastavg.EMA, snapshots: list[torch.Tensor]) -> torch.Tensor:
    """API.md's EMA in float64: avg = p_1, then avg = d_j avg + (1 - d_j) p_j."""
    avg = snapshots[0].double().clone()
    for j, p in enumerate(snapshots[1:], start=2):
        if spec.power is None:
            d = spec.decay
        else:
            d = min(spec.decay, 1 - (1 + (j - 1) / spec.inv_gamma) ** (-spec.power))
        avg = d * avg + (1 - d) * p.double()
    return avg


def reference(spec, snapshots: list[torch.Tensor]) -> torch.Tensor:
    """The average API.md defines after the due snapshots ``p_1..p_n``, in float64."""
    if isinstance(spec, fastavg.EMA):
        return ema_reference(spec, snapshots)
    if isinstance(spec, fastavg.LAWA):
        snapshots = snapshots[-spec.window :]
    return torch.stack([p.double() for p in snapshots]).mean(0)


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances for averages held in ``dtype``."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]
