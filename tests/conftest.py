"""Shared fixtures: the backends to test, the cuda marker, and a float64 reference of API.md's formulas."""

from __future__ import annotations

import pytest
import torch

import fastavg

CPU_BACKENDS = [name for name, why in fastavg.available_backends("cpu").items() if why is None]


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
