"""Host cost of the Triton backend's update path, measured without a GPU.

Triton's own launch path runs as on a GPU: argument binding, specialisation, the cache key, the
kernels compiled for sm_90. A stand-in driver answers for the device. A no-op replaces the
launcher's C call, which needs a GPU.

What this cannot see:
- the launcher itself (about 10 us per launch on run 6's H200 host, by its profile);
- torch's own answer to `torch.cuda.current_device()`, which each launch asks (a stand-in here);
- anything CUDA tensors cost beyond CPU ones.

GPU time is scarce, and LAWA alone is bound by this cost on a slow host: this lets a change to the
host path be measured before a run. Usage: python bench/triton_host_cost.py [--repeats N]
"""

import argparse
import os
import time
import types

os.environ["TRITON_INTERPRET"] = "0"  # before fastavg's kernels are imported: compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from fastavg.kernels import table, update  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import compiler as triton_compiler  # noqa: E402
from triton.runtime import driver  # noqa: E402

import fastavg  # noqa: E402
from fastavg import ops  # noqa: E402
from fastavg.bench.cases import WINDOW, _NoOpOptimizer  # noqa: E402
from fastavg.bench.shapes import gpt2_shapes  # noqa: E402

RESIDENT_PROGRAMS = 1056  # what an H200 holds of the update kernels (8 per SM): sizes the grids


class StandInDriver:
    """The driver calls a launch makes, answered for one sm_90 device; anything else fails loudly."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(f"bench/triton_host_cost.py: the stand-in driver has no {name!r}")


def _load_without_gpu(kernel) -> None:
    # CompiledKernel._init_handles loads the binary on the device and builds the launcher.
    if kernel.module is None:
        kernel.module, kernel.function, kernel.n_regs, kernel.n_spills, kernel.n_max_threads = 1, 1, 32, 0, 1024
        kernel._run = lambda *args: None
        if not isinstance(getattr(type(kernel), "run", None), property):  # Triton 3.2 to 3.4 call kernel.run
            kernel.run = kernel._run


def stand_in_for_the_gpu() -> None:
    """Route the Triton backend's launches through Triton's JIT with no GPU behind it."""
    driver.set_active(StandInDriver())
    triton_compiler.CompiledKernel._init_handles = _load_without_gpu
    ops.backend_by_name("triton").unavailable = lambda device: None
    cuda = types.SimpleNamespace(type="cuda", index=0)
    torch.cuda.current_device = lambda: 0  # the stand-in device is the current one: no switch
    launch = table.launch
    update.launch = lambda kernel, work, device, *args, **meta: launch(kernel, work, cuda, *args, **meta)

    # table._resident_programs still makes its key (its cost counts); every key is found, with a
    # fixed count, so nothing asks the device for its properties or the kernel for its registers.
    table._RESIDENT = AlwaysResident()


class AlwaysResident(dict):
    """table._RESIDENT for a stand-in device: every launch shape is known, at RESIDENT_PROGRAMS."""

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return RESIDENT_PROGRAMS


def best_us(fn, repeats: int, rounds: int = 5) -> float:
    """The fastest of ``rounds`` means over ``repeats`` calls, in microseconds (a shared VM is noisy)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    stand_in_for_the_gpu()
    # GPT-2 124M's 148 tensors, shrunk: what is timed is the host side, not memory traffic.
    params = [torch.nn.Parameter(torch.zeros(min(64, s[0]), dtype=torch.bfloat16)) for s in gpt2_shapes()]
    lawa = fastavg.Averager(params, fastavg.LAWA(WINDOW, every=1), backend="triton")
    group, ring = lawa._groups[0], lawa._averages["lawa"].buffers[0]
    averages = [torch.zeros(group.numel) for _ in range(2)]
    opt = fastavg.wrap(_NoOpOptimizer(params), {"lawa": fastavg.LAWA(WINDOW, every=1)}, backend="triton")
    rows = {
        "update_, LAWA alone": lambda: update.update_(group.flat_params, group.table, [], [], [ring], [2]),
        "update_, EMA": lambda: update.update_(group.flat_params, group.table, averages[:1], [0.01], [], []),
        "update_, EMA+SWA+LAWA": lambda: update.update_(
            group.flat_params, group.table, averages, [0.01, 0.1], [ring], [2]
        ),
        "Averager.step(), LAWA due": lawa.step,
        "opt.step(), LAWA due": opt.step,
    }
    print(f"triton {triton.__version__}, torch {torch.__version__}: 148 tensors, no GPU")
    for name, fn in rows.items():
        print(f"{name:28s} {best_us(fn, args.repeats):8.1f} us")


if __name__ == "__main__":
    main()
