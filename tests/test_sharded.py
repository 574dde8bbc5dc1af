"""Sharded parameters (FSDP2's DTensors): refused by wrap with a recipe that works, checked across
two processes on the CPU."""

import os
import subprocess
import sys

import pytest
import torch

import fastavg


class _Redirecting(torch.Tensor):
    """A tensor subclass that intercepts every operation, as DTensor and quantised tensors do."""

    @staticmethod
    def __new__(cls, size):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_a_tensor_subclass_that_redirects_its_operations_is_refused():
    with pytest.raises(TypeError, match="_Redirecting, a tensor subclass that redirects its operations"):
        fastavg.Averager([torch.zeros(3), _Redirecting((4,))], "ema")


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fsdp2_parameters_are_refused_and_the_per_shard_recipe_averages_the_whole_model(backend):
    if fastavg.available_backends("cpu")[backend] is not None:
        pytest.skip(fastavg.available_backends("cpu")[backend])
    worker = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")
    # --standalone: a free port of its own, so runs side by side (pytest-xdist) cannot collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, backend]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout
