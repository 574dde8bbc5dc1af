"""The contract on CUDA tensors (skipped without a GPU): formulas, swaps, mixed devices."""

import itertools
import os

import pytest
import torch
from conftest import CUDA_BACKENDS, reference
from helpers import run

import fastavg
from fastavg import EMA, LAWA, SWA

pytestmark = pytest.mark.cuda
SPECS = {"ema": EMA(0.9, power=0.7), "swa": SWA(every=2), "lawa": LAWA(window=3, every=2)}


def _unless_bulk_left_out():
    # gpu_check.sh runs bench/bulk_probe.py first: where LAWA alone through the TMA's copies hung or
    # wrote a wrong slot there, the tests that use them would only repeat it, or hang to the time limit.
    if os.environ.get("FASTAVG_SKIP_BULK"):
        pytest.skip("gpu_check.sh's bulk probe failed: the TMA's copies are left out of this run")


def _unless_driver_copies_left_out():
    # The same for the driver's copies (bulk_probe.py --driver-copies): a batch the driver refused.
    if os.environ.get("FASTAVG_SKIP_DRIVER_COPIES"):
        pytest.skip("gpu_check.sh's driver copy probe failed: the driver's copies are left out of this run")
    if not _has_driver_copies():
        pytest.skip("a build of CUDA before 13.0: no driver's copies")


def _has_driver_copies() -> bool:
    # Builds of CUDA before 13.0 refuse every mode of set_driver_copies, 0 (off) too.
    return torch.ops.fastavg_native_tuning.set_driver_copies(0) == 0


@pytest.fixture(params=CUDA_BACKENDS)
def cuda_backend(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference_and_restores(dtype, cuda_backend):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in [(1,), (7,), (4099,), (33, 5)]]
    avg = fastavg.Averager(params, SPECS, backend=cuda_backend)
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
    opt = fastavg.wrap(torch.optim.SGD(params, lr=0.1), SPECS)  # auto: a backend per device
    for _ in range(4):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(opt.averager._groups) == 2
    got = opt.averaged_params("swa")
    assert got[0].device.type == "cpu" and got[1].is_cuda


def test_auto_picks_the_fastest_cuda_backend():
    avg = fastavg.Averager([torch.nn.Parameter(torch.randn(3, device="cuda"))], "ema")
    assert avg.backends == [max(CUDA_BACKENDS, key=["torch", "triton", "native"].index)]


def test_native_cuda_kernels_run_on_every_visible_gpu():
    """The build's own check (kernels_missing) says yes here, where its kernels launch: a false
    "missing" would take native out of CUDA_BACKENDS and skip its GPU tests without a word."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastavg_native::update_", "CUDA"):
        pytest.skip(fastavg.available_backends("cuda")["native"])
    for device in range(torch.cuda.device_count()):
        assert torch.ops.fastavg_native_cuda.kernels_missing(device) == ""
        assert fastavg.available_backends(f"cuda:{device}")["native"] is None
    assert "native" in CUDA_BACKENDS


def test_parameters_on_a_gpu_that_is_not_the_current_one(cuda_backend):
    """A model moved to cuda:1 with no torch.cuda.set_device: every op runs on cuda:1 (Triton
    launches on the current device unless told otherwise) and matches the torch backend there,
    beside a group on the current GPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    other = torch.device("cuda", torch.cuda.device_count() - 1)
    assert torch.cuda.current_device() != other.index
    results = {}
    for backend in ("torch", cuda_backend):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device=other).bfloat16()) for n in (4099, 7, 70_000)]
        params.append(torch.nn.Parameter(torch.randn(33, device="cuda").bfloat16()))  # the current GPU
        avg = fastavg.Averager(params, SPECS, backend=backend)
        for step in range(5):
            with torch.no_grad():
                for p in params:
                    p.add_(0.01 * (step + 1))
            avg.step()
        before = [p.detach().clone() for p in params]
        with avg.averaged("lawa"):
            swapped = [p.detach().clone() for p in params]
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        results[backend] = ([t for name in avg.names for t in avg.averaged_params(name)], swapped)
    (averages, swapped), (ref_averages, ref_swapped) = results[cuda_backend], results["torch"]
    devices = [other] * 3 + [torch.device("cuda", torch.cuda.current_device())]
    for i, (got, want) in enumerate(zip(averages, ref_averages)):
        assert got.device == devices[i % 4]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want, device in zip(swapped, ref_swapped, devices):
        assert got.device == device
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bf16: the two may round an ulp apart


def test_no_host_sync_in_the_update_path(cuda_backend):
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda").bfloat16()) for _ in range(4)]
    avg = fastavg.Averager(params, SPECS, backend=cuda_backend)
    avg.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            avg.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_cuda_graph_capture_is_refused_and_the_recipes_the_errors_give_work(cuda_backend):
    """A captured opt.step() would replay one update and count none: it raises before the inner
    step. The error's recipe (the inner step in the graph, the averager's step after each replay)
    averages what every replay left. averaged() is refused too, and its recipe (the evaluation
    captured alone, replayed inside averaged()) reads the average; load_state_dict() is refused."""
    model = torch.nn.Linear(16, 4, device="cuda")
    opt = fastavg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), LAWA(window=2, every=1), backend=cuda_backend)
    model(torch.randn(8, 16, device="cuda")).square().mean().backward()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a first step outside the graph, as torch asks
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert opt.step_count == 1 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.optimizer.step()
    snapshots = []
    for _ in range(3):
        graph.replay()
        opt.averager.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    assert opt.step_count == 4 and opt.num_averaged() == 2
    lawa = opt.averaged_params()
    for got, a, b in zip(lawa, *snapshots[-2:]):
        torch.testing.assert_close(got, ((a.double() + b.double()) / 2).float(), rtol=1e-6, atol=1e-7)
    # averaged() too is refused in a capture; its recipe: capture the evaluation, replay it inside.
    x = torch.randn(8, 16, device="cuda")
    with pytest.raises(RuntimeError, match=r"averaged\(\) while a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()), opt.averaged():
            pass
    saved = opt.state_dict()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) while a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # its copies would wait for a replay
            opt.load_state_dict(saved)
    assert opt.step_count == 4 and opt.num_averaged() == 2
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):  # warm-up outside the graph, as torch asks
        model(x)
    torch.cuda.current_stream().wait_stream(stream)
    evaluation = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(evaluation):
        out = model(x)
    with opt.averaged():
        evaluation.replay()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, *lawa), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt2_sized_update_matches_torch_backend(dtype, cuda_backend):
    _gpt2_sized_update_matches_torch_backend(dtype, cuda_backend)


@pytest.mark.parametrize(
    "threads, unroll, block_per_row, bulk, driver",
    [(256, 1, False, 0, 0), (128, 1, False, 0, 0), (256, 2, False, 0, 0), (128, 2, False, 0, 0),
     (128, 4, False, 0, 0), (128, 2, True, 0, 0), (128, 2, False, 8, 0), (128, 2, True, 32, 0), (256, 1, False, 4, 0),
     (128, 2, False, 0, 1), (128, 2, False, 0, 2)],
)  # fmt: skip
def test_native_kernels_at_the_sweeps_settings(threads, unroll, block_per_row, bulk, driver):
    """bench/kernel_sweep.py times the native kernels at 256 and 128 threads per block, at one, two
    and four vectors per thread per pass, with one block per table row, and LAWA alone through the
    TMA's or the driver's copies (tuning hooks, not ops): they must give the same results at each,
    LAWA-only steps included, and the hooks refuse other settings without raising in C++ (their old
    error, a number in its message, crashed the process on the H200 image, run 6: error_text.h)."""
    if "native" not in CUDA_BACKENDS:
        pytest.skip(fastavg.available_backends("cuda")["native"])
    if bulk:
        _unless_bulk_left_out()
    if driver:
        _unless_driver_copies_left_out()
    from fastavg.bench import native_launch

    tuning = torch.ops.fastavg_native_tuning
    default = native_launch.current_settings(tuning)
    assert tuning.set_block_threads(100) == -1 and tuning.set_unroll(3) == -1 and tuning.set_block_per_row(2) == -1
    assert tuning.set_bulk_rings(2) == -1 and tuning.set_bulk_rings(12) == -1 and tuning.set_bulk_rings(64) == -1
    assert tuning.set_driver_copies(3) == -1 and tuning.set_driver_copies(-1) == -1
    with pytest.raises(ValueError, match="multiple of 32"):
        native_launch.set_block_threads(tuning, 100)
    with pytest.raises(ValueError, match="1, 2 or 4"):
        native_launch.set_unroll(tuning, 3)
    assert native_launch.current_settings(tuning) == default == native_launch.Setting(128, 2)  # the build's defaults
    with native_launch.launch_settings(tuning, threads, unroll, block_per_row, bulk, driver):
        _gpt2_sized_update_matches_torch_backend(torch.bfloat16, "native")
        _gpt2_sized_update_matches_torch_backend(torch.bfloat16, "native", {"lawa": LAWA(window=3, every=1)})
    assert native_launch.current_settings(tuning) == default
    assert native_launch.set_block_per_row(tuning, False) is False  # the persistent grid is back
    assert native_launch.set_bulk_rings(tuning, 0) == 0  # and the vector kernel for LAWA alone
    assert tuning.set_driver_copies(0) in (0, -1)  # not the driver's copies (-1: a build of CUDA before 13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("misaligned", [False, True])
def test_native_lawa_through_the_tma_writes_every_element(dtype, misaligned):
    """set_bulk_rings (the sweep's `TMA ... KB stages` rows, fastavg-bench's `/bulk`): LAWA alone
    through bulk_ring_kernel in stages of 4, 8 and 32 KB (past the 48 KB of shared memory a kernel
    gets unasked), one to three rings, over rows of the default length and longer, odd sizes and
    views one element off (the scalar path), against poisoned slots. On a GPU before sm_90 the
    launcher runs the vector kernel: the same results."""
    if "native" not in CUDA_BACKENDS:
        pytest.skip(fastavg.available_backends("cuda")["native"])
    _unless_bulk_left_out()
    from test_ops import _bind, _params

    from fastavg.bench import native_launch
    from fastavg.table import build_table

    params = _params([1, 7, 4099, (1 << 20) + 3, 70000], dtype, "cuda", misaligned=misaligned)
    impls, flat, table = _bind("native", params, "cuda")
    n, expected = sum(p.numel() for p in params), torch.cat(params)
    # Slots 16-byte aligned (as the Averager allocates them), with a gap after each that stays poisoned.
    storage = [torch.empty(3, -(-n // 8) * 8 + 8, dtype=dtype, device="cuda") for _ in range(3)]
    rings = [s[:, :n] for s in storage]
    tuning = torch.ops.fastavg_native_tuning
    for kb, rows in itertools.product((4, 8, 32), (table, build_table(flat, 1 << 17))):
        with native_launch.launch_settings(tuning, 128, 2, bulk=kb):
            for count in (1, 2, 3):  # three rings: two launches (at most two rings each)
                for s in storage:
                    s.fill_(float("nan"))
                impls["update_"](flat, rows, [], [], rings[:count], [2, 0, 1][:count])
                for s, ring, slot in zip(storage, rings[:count], [2, 0, 1]):
                    assert torch.equal(ring[slot], expected), (kb, rows.shape, count)
                    assert all(ring[other].isnan().all() for other in range(3) if other != slot)
                    assert s[:, n:].isnan().all()
    assert native_launch.current_settings(tuning) == native_launch.Setting(128, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("side_stream", [False, True])
def test_native_lawa_as_the_drivers_copies_writes_every_element(dtype, misaligned, side_stream):
    """set_driver_copies (the sweep's `driver's batch copy` rows, fastavg-bench's `/copy`): LAWA alone
    as one cudaMemcpyBatchAsync, in both modes, one to three rings, odd sizes, views one element off
    and an empty parameter, against poisoned slots. On torch's default stream the batch goes to the
    per-thread default stream (the legacy one is refused): the copies must see the parameters as the
    stream's earlier work left them, and its later work must see the copies, with no synchronize."""
    if "native" not in CUDA_BACKENDS:
        pytest.skip(fastavg.available_backends("cuda")["native"])
    _unless_driver_copies_left_out()
    from test_ops import _bind, _params

    from fastavg.bench import native_launch

    params = _params([1, 7, 0, 4099, (1 << 22) + 3, 70000], dtype, "cuda", misaligned=misaligned)
    impls, flat, table = _bind("native", params, "cuda")
    n = sum(p.numel() for p in params)
    storage = [torch.empty(3, -(-n // 8) * 8 + 8, dtype=dtype, device="cuda") for _ in range(3)]
    rings = [s[:, :n] for s in storage]
    tuning = torch.ops.fastavg_native_tuning
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for mode, count in itertools.product((1, 2), (1, 2, 3)):
            with native_launch.launch_settings(tuning, 128, 2, driver=mode):
                for s in storage:
                    s.fill_(float("nan"))
                for p in flat:
                    p.add_(1)  # queued just before the copies, on the same stream
                impls["update_"](flat, table, [], [], rings[:count], [2, 0, 1][:count])
                expected = torch.cat(flat)  # queued just after them
                for s, ring, slot in zip(storage, rings[:count], [2, 0, 1]):
                    assert torch.equal(ring[slot], expected), (mode, count)
                    assert all(ring[other].isnan().all() for other in range(3) if other != slot)
                    assert s[:, n:].isnan().all()
    assert native_launch.current_settings(tuning) == native_launch.Setting(128, 2)


def test_native_drivers_copies_leave_a_captured_graph_to_the_kernels():
    """Into a CUDA graph being captured, LAWA alone takes the kernels even with set_driver_copies on
    (ops_cuda.h's capturing): the replay writes the slot the parameters hold at replay time."""
    if "native" not in CUDA_BACKENDS:
        pytest.skip(fastavg.available_backends("cuda")["native"])
    _unless_driver_copies_left_out()
    from test_ops import _bind, _params

    from fastavg.bench import native_launch

    params = _params([7, 4099, 70000], torch.bfloat16, "cuda")
    impls, flat, table = _bind("native", params, "cuda")
    n = sum(p.numel() for p in params)
    ring = torch.full((2, -(-n // 8) * 8), float("nan"), dtype=torch.bfloat16, device="cuda")[:, :n]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with native_launch.launch_settings(torch.ops.fastavg_native_tuning, 128, 2, driver=1):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # a first call outside the graph, as torch asks
            impls["update_"](flat, table, [], [], [ring], [1])
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            impls["update_"](flat, table, [], [], [ring], [1])
    for p in flat:
        p.mul_(2)
    ring.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ring[1], torch.cat(flat)) and ring[0].isnan().all()


def test_benchmark_times_native_launch_settings_through_the_real_hooks():
    """fastavg-bench --native-launch (run by gpu_check.sh): the CUDA build's hooks accept the sweep's
    settings, refuse others before any timing, and are back at the defaults after a row."""
    from fastavg.bench import cases, cli, native_launch

    if "native" not in CUDA_BACKENDS:
        pytest.skip(fastavg.available_backends("cuda")["native"])
    hooks, cuda = native_launch.tuning_hooks(), torch.device("cuda")
    assert hooks is not None and native_launch.current_settings(hooks) == native_launch.Setting(128, 2)
    # Resolving only sets and restores the hooks: no launch, so the bulk setting is safe here.
    assert cli.resolve_native_launches(["256", "256x2", "128x2/row", "128x2/bulk32"], cuda, ["native"]) == [
        (256, 1, False, 0, 0), (256, 2, False, 0, 0), (128, 2, True, 0, 0), (128, 2, False, 32, 0)
    ]  # fmt: skip
    if _has_driver_copies():
        assert cli.resolve_native_launches(["128x2/copyce"], cuda, ["native"]) == [(128, 2, False, 0, 2)]
    else:
        with pytest.raises(SystemExit, match="CUDA 13.0 or later"):
            cli.resolve_native_launches(["128x2/copyce"], cuda, ["native"])
    with pytest.raises(SystemExit, match="128x3"):
        cli.resolve_native_launches(["128x3"], cuda, ["native"])
    params = [torch.nn.Parameter(torch.randn(4099, device="cuda").bfloat16())]
    cases.fastavg_case("swap", params, "native", launch=native_launch.Setting(256, 1)).step()
    cases.fastavg_case("lawa", params, "native", launch=native_launch.Setting(128, 4, True)).step()
    if not os.environ.get("FASTAVG_SKIP_BULK"):  # gpu_check.sh's bulk probe passed (or this is not gpu_check)
        cases.fastavg_case("lawa", params, "native", launch=native_launch.Setting(128, 2, bulk=8)).step()
    if not os.environ.get("FASTAVG_SKIP_DRIVER_COPIES") and _has_driver_copies():  # and its driver copy probe
        cases.fastavg_case("lawa", params, "native", launch=native_launch.Setting(128, 2, driver=1)).step()
    torch.cuda.synchronize()
    assert native_launch.current_settings(hooks) == native_launch.Setting(128, 2)


def _gpt2_sized_update_matches_torch_backend(dtype, backend, specs=SPECS):
    # Large tensors exercise the persistent grid (rows > programs) and 16-byte vector paths.
    shapes = [(50257, 768), (1024, 768), (768,), (768, 2304), (2304,), (7,)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    mine = fastavg.Averager(params, specs, backend=backend)
    ref = fastavg.Averager(twins, specs, backend="torch")
    for _ in range(7):
        with torch.no_grad():
            for p, q in zip(params, twins):
                noise = torch.randn_like(p, dtype=torch.float32).to(dtype)
                p.add_(noise)
                q.add_(noise)
        mine.step()
        ref.step()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for name in specs:
        for a, b in zip(mine.averaged_params(name), ref.averaged_params(name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with mine.averaged(name):
            swapped = [p.detach().clone() for p in params]
        with ref.averaged(name):
            for a, b in zip(swapped, twins):
                torch.testing.assert_close(a, b.detach(), **tol)  # the two may round an ulp apart
