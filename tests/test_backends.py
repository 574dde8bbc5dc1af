"""available_backends() and backend selection."""

import pytest
import torch

import fastavg
from fastavg.ops import resolve_backend


def test_available_backends_reports_each_backend():
    cpu = fastavg.available_backends("cpu")
    assert set(cpu) == {"torch", "triton", "native"}
    assert cpu["torch"] is None
    assert all(why is None or (isinstance(why, str) and why) for why in cpu.values())
    assert fastavg.available_backends(torch.device("cpu")) == cpu
    default = fastavg.available_backends()
    assert default == fastavg.available_backends("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TypeError):
        fastavg.available_backends(3)


def test_unavailable_backend_raises_runtime_error_with_the_reason():
    for name, why in fastavg.available_backends("cpu").items():
        if why is None:
            continue
        with pytest.raises(RuntimeError, match="not available") as info:
            fastavg.Averager([torch.nn.Parameter(torch.zeros(2))], "ema", backend=name)
        assert why in str(info.value)


def test_auto_picks_an_available_backend():
    avg = fastavg.Averager([torch.nn.Parameter(torch.zeros(2))], "ema")
    assert fastavg.available_backends("cpu")[avg.backends[0]] is None
    assert resolve_backend("auto", "cpu").name in fastavg.available_backends("cpu")
