"""Drive an Averager with known parameter values and record the due snapshots."""

from __future__ import annotations

import io

import torch

import fastavg


def make_params(shapes, dtype=torch.float32, seed=0, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)) for s in shapes]


def run(averager: fastavg.Averager, params: list[torch.Tensor], steps: int, seed: int = 1) -> dict[str, list]:
    """``steps`` steps: new random values, then ``averager.step()``. Returns each spec's due snapshots."""
    g = torch.Generator().manual_seed(seed)
    snapshots = {name: [] for name in averager.names}
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        averager.step()
        for name, spec in averager.specs.items():
            if spec.is_due(averager.step_count):
                snapshots[name].append([p.detach().clone() for p in params])
    return snapshots


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(..., weights_only=True)``, as a checkpoint file takes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same_state(a, b) -> bool:
    """Two state dicts equal in structure, plain values and every tensor's values (bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def torch_version() -> tuple[int, int]:
    """The installed torch's (major, minor), for checks that differ across the supported range."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)
