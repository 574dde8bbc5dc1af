"""The contract on CUDA tensors (skipped without a GPU): formulas, swaps, mixed devices."""

import pytest
import torch
from conftest import reference
from helpers import run

import fastavg
from fastavg import EMA, LAWA, SWA

pytestmark = pytest.mark.cuda
SPECS = {"ema": EMA(0.9, power=0.7), "swa": SWA(every=2), "lawa": LAWA(window=3, every=2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference_and_restores(dtype):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in [(1,), (7,), (4099,), (33, 5)]]
    avg = fastavg.Averager(params, SPECS, backend="torch")
    snaps = run(avg, params, 13)
    for name, spec in SPECS.items():
        got = avg.averaged_params(name)
        for i in range(len(params)):
            assert got[i].is_cuda and got[i].dtype == torch.float32
            torch.testing.assert_close(
                got[i].double().cpu(), reference(spec, [s[i].cpu() for s in snaps[name]]), rtol=1e-5, atol=1e-5
            )
        before = [p.detach().clone() for p in params]
        with avg.averaged(name):
            assert all(torch.equal(p.detach(), g.to(dtype)) for p, g in zip(params, got))
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_parameters_on_cpu_and_cuda():
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6, device="cuda"))]
    opt = fastavg.wrap(torch.optim.SGD(params, lr=0.1), SPECS)
    for _ in range(4):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(opt.averager._groups) == 2
    got = opt.averaged_params("swa")
    assert got[0].device.type == "cpu" and got[1].is_cuda


def test_no_host_sync_in_the_update_path():
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda")) for _ in range(4)]
    avg = fastavg.Averager(params, SPECS, backend="torch")
    avg.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            avg.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
