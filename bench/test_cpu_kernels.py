"""pytest-benchmark suite of the CPU paths: `pytest bench/ --benchmark-only`.

GPT-2-like tensor counts at a size a 2-core machine times in seconds; each benchmark is one
step of one implementation. For the full comparison with ratios, use `fastavg-bench`.
"""

import pytest
import torch

from fastavg.bench import cases
from fastavg.bench.shapes import gpt2_shapes

SHAPES = gpt2_shapes(layers=4, dim=256, vocab=8192, context=256)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def params(request):
    torch.manual_seed(0)
    return [torch.randn(s).to(request.param) for s in SHAPES]


@pytest.mark.parametrize("update", cases.UPDATES)
def test_fastavg_torch(benchmark, params, update):
    case = cases.fastavg_case(update, params, "torch")
    with torch.no_grad():
        benchmark(case.step)


@pytest.mark.parametrize("update", cases.UPDATES)
def test_stock_foreach(benchmark, params, update):
    case = cases.stock_case(update, params, torch.float32)
    with torch.no_grad():
        benchmark(case.step)


@pytest.mark.parametrize("update", ["ema", "swa"])
def test_averaged_model(benchmark, params, update):
    case = cases.averaged_model_case(update, params)
    with torch.no_grad():
        benchmark(case.step)
