"""available_backends() and backend selection."""

import types

import pytest
import torch

import fastavg
from fastavg import native_backend
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


def test_auto_picks_native_on_the_cpu_where_it_is_built_else_torch():
    # README: native where the extension is built, else the torch reference (Triton's CPU path is
    # its interpreter, for tests only).
    expected = "native" if fastavg.available_backends("cpu")["native"] is None else "torch"
    avg = fastavg.Averager([torch.nn.Parameter(torch.zeros(2))], "ema")
    assert avg.backends == [expected]
    assert resolve_backend("auto", "cpu").name == expected


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_parameters_go_to_the_torch_reference_and_the_kernels_refuse_them_at_wrap(dtype):
    # The kernels take 16-, 32- and 64-bit floats. "auto" must not pick a backend that fails at the
    # first update (after the inner step ran); asking for one names the dtype, before any step.
    torch.manual_seed(0)
    p = torch.randn(37).to(dtype)
    avg = fastavg.Averager([p, torch.randn(5)], {"ema": fastavg.EMA(0.5), "lawa": fastavg.LAWA(2, every=1)})
    assert avg.backends[0] == "torch"  # the float32 group keeps the fastest backend
    ema, snapshots = None, []
    for _ in range(3):
        p.copy_(torch.randn(37).to(dtype))
        avg.step()
        snapshots.append(p.double())
        ema = snapshots[-1] if ema is None else 0.5 * ema + 0.5 * snapshots[-1]
    lawa = (snapshots[-1] + snapshots[-2]) / 2
    torch.testing.assert_close(avg.averaged_params("ema")[0].double(), ema, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(avg.averaged_params("lawa")[0].double(), lawa, rtol=1e-6, atol=1e-6)
    training = p.view(torch.uint8).clone()
    with avg.averaged("lawa"):
        assert torch.equal(p.view(torch.uint8), lawa.float().to(dtype).view(torch.uint8))
    assert torch.equal(p.view(torch.uint8), training)
    for name in ("native", "triton"):
        if fastavg.available_backends("cpu")[name] is None:
            with pytest.raises(RuntimeError, match=f"'{name}' cannot average {str(dtype)[6:]} parameters"):
                fastavg.Averager([torch.zeros(3, dtype=dtype)], "ema", backend=name)


@pytest.fixture
def gpu_without_kernels(monkeypatch):
    """A CUDA device, as the native backend sees it, on which fastavg._C's CUDA kernels do not run
    (a build for sm_80 and sm_90 on a B200): the calls the build's check receives, by device."""
    if native_backend.MISSING:
        pytest.skip(native_backend.MISSING)
    asked = []

    def kernels_missing(device):
        asked.append(device)
        return "no kernel image is available for execution on the device"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(
        torch._C,
        "_dispatch_has_kernel_for_dispatch_key",
        lambda op, key: key == "CUDA" or has_kernel(op, key),
    )
    monkeypatch.setattr(
        torch.ops, "fastavg_native_cuda", types.SimpleNamespace(kernels_missing=kernels_missing), raising=False
    )
    native_backend.kernels_missing.cache_clear()
    yield asked
    native_backend.kernels_missing.cache_clear()


def test_native_cuda_build_for_other_gpus_is_unavailable_with_the_fix(gpu_without_kernels):
    why = fastavg.available_backends("cuda")["native"]
    assert why is not None and "NVIDIA B200" in why and "compute capability 10.0" in why
    assert "no kernel image" in why and "TORCH_CUDA_ARCH_LIST=10.0 pip install --no-build-isolation ." in why
    assert gpu_without_kernels == [3]  # "cuda": the current device
    fastavg.available_backends(torch.device("cuda", 1))
    assert gpu_without_kernels == [3, 1]
    fastavg.available_backends("cuda:1")  # asked once per device
    assert gpu_without_kernels == [3, 1]
    assert resolve_backend("auto", "cuda").name != "native"
    with pytest.raises(RuntimeError, match="no CUDA kernels for this GPU"):
        resolve_backend("native", "cuda:1")


def test_native_cuda_check_that_fails_is_a_reason_not_an_error(gpu_without_kernels, monkeypatch):
    def fails(device):
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.ops.fastavg_native_cuda, "kernels_missing", fails)
    why = fastavg.available_backends("cuda:7")["native"]
    assert "could not check its CUDA kernels on CUDA device 7" in why and "invalid device ordinal" in why
    assert resolve_backend("auto", "cuda:7").name != "native"


def test_native_cuda_build_for_this_gpu_is_available(gpu_without_kernels, monkeypatch):
    monkeypatch.setattr(torch.ops.fastavg_native_cuda, "kernels_missing", lambda device: "")
    assert fastavg.available_backends("cuda")["native"] is None
    assert resolve_backend("auto", "cuda").name == "native"


@pytest.mark.parametrize(
    "version, too_old",
    [("3.0.0", True), ("3.1.0+git1a2b", True), ("3.2.0", False), ("3.10.1", False), ("4.0", False), ("dev", False)],
)
def test_triton_too_old_to_compile_the_kernels_is_unavailable(monkeypatch, version, too_old):
    """torch 2.4 and 2.5 pin triton 3.0 and 3.1, which reject the kernels at their first launch
    (checked by hand: CompilationError "element_ty is a constexpr"): "auto" must not take Triton there."""
    pytest.importorskip("triton")
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    why = fastavg.available_backends("cpu")["triton"]
    if too_old:
        assert why is not None and ">= 3.2" in why and f"triton {version}" in why
        assert resolve_backend("auto", "cpu").name != "triton"
    else:
        assert why is None or ">= 3.2" not in why


@pytest.fixture
def triton_on_a_stand_in_gpu(monkeypatch):
    """triton_backend, with CUDA reported available and the kernels compiled (not interpreted)."""
    pytest.importorskip("triton")
    from fastavg.kernels import table

    from fastavg import triton_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(table, "INTERPRET", False)
    return triton_backend


@pytest.mark.parametrize("capability, refused", [((6, 1), True), ((7, 0), False), ((9, 0), False)])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_triton_needs_compute_capability_7(triton_on_a_stand_in_gpu, monkeypatch, capability, refused, device):
    # torch.compile's rule for Triton. A Pascal GPU would otherwise fail in Triton's compiler at the
    # first due step, after the inner step ran; refused here, "auto" takes another backend.
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    why = triton_on_a_stand_in_gpu.unavailable(torch.device(device))
    assert asked == [torch.device(device)]  # that GPU; with no index, torch takes the current one
    if refused:
        assert why == "Triton needs a GPU of compute capability 7.0 or later; this one is 6.1"
    else:
        assert why is None


def test_triton_on_a_cuda_device_torch_cannot_query_says_so(triton_on_a_stand_in_gpu, monkeypatch):
    def invalid(device=None):
        raise AssertionError("Invalid device id")

    monkeypatch.setattr(torch.cuda, "get_device_capability", invalid)
    assert (
        triton_on_a_stand_in_gpu.unavailable(torch.device("cuda:7"))
        == "CUDA device cuda:7 cannot be queried (Invalid device id)"
    )
