"""Every Triton kernel compiles for sm_80 and sm_90 here (no GPU needed), and its aligned paths
use 16-byte vector loads and stores while the masked paths (misaligned rows, tails) stay scalar."""

import inspect
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton", minversion="3.2")  # fastavg.triton_backend.MIN_TRITON
tl = pytest.importorskip("triton.language")
from fastavg.kernels import ring_mean, swap, update  # noqa: E402

# BLOCK: the launches' own, so the checks below see the block a GPU runs (in this file's
# compiling process; the interpreter's, 4x larger, is never compiled).
from fastavg.kernels.table import BLOCK, FP_FUSION, INTERPRET, NUM_WARPS  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastavg.table import build_table  # noqa: E402

# Under TRITON_INTERPRET=1 (set by conftest without a GPU) the kernels are interpreter objects that
# cannot be compiled: then one test reruns this file in a process that compiles.
compiling = pytest.mark.skipif(INTERPRET, reason="run by test_ptx_checks_in_a_compiling_process")


@pytest.mark.skipif(not INTERPRET, reason="this process compiles: the checks below run directly")
def test_ptx_checks_in_a_compiling_process():
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


ARCHS = [80, 90]


def _compile(fn, signature: dict, constexprs: dict, arch: int):
    """``fn`` compiled for ``arch`` with pointer and stride arguments 16-aligned (as Triton's
    launcher specialises them when they are)."""
    names = list(signature)
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*") or n == "stride"
    }
    if "constants" in inspect.signature(ASTSource).parameters:  # Triton 3.2 (torch 2.6): its own arguments
        from triton.backends.compiler import AttrsDescriptor

        hints = {i: 16 for (i,) in aligned}
        source = ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=AttrsDescriptor.from_hints(hints))
    else:
        full = dict(signature, **{k: "constexpr" for k in constexprs})
        source = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": NUM_WARPS, "enable_fp_fusion": FP_FUSION}  # as the launches pass them
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    assert f".target sm_{arch}" in compiled.asm["ptx"]
    return compiled


def _ptx(fn, signature: dict, constexprs: dict, arch: int) -> Counter:
    """Global memory instructions in ``fn``'s PTX."""
    ptx = _compile(fn, signature, constexprs, arch).asm["ptx"]
    return Counter(re.findall(r"((?:ld|st)\.global[.\w]*)", ptx))


def _aligned_loop(fn, signature: dict, constexprs: dict, arch: int) -> str:
    """The TTGIR of the row-walking kernels' aligned loop: the second scf.for (the first walks the rows)."""
    loops = _compile(fn, signature, constexprs, arch).asm["ttgir"].split("scf.for")
    body = loops[2]
    loads = re.findall(r"tt\.load [^:]*:", body)
    assert loads and not any("," in load for load in loads), f"not the unmasked loop: {loads}"
    return body


def _update_signature(avg="*fp32", ring="*bf16"):
    sig = {"table": "*i64", "n_rows": "i32", **{f"a{i}": avg for i in range(4)}}
    for i in range(4):
        sig.update({f"h{i}": "fp32", f"l{i}": "fp32", f"c{i}": "i32"})
    return {**sig, "r0": ring, "r1": ring}


# The parameter dtypes, each with its ring pointer type (rings are in the parameter dtype).
every_param_dtype = pytest.mark.parametrize(
    "p_dtype, ring",
    [(tl.bfloat16, "*bf16"), (tl.float16, "*fp16"), (tl.float32, "*fp32")],
    ids=["bf16", "fp16", "fp32"],
)


def _vector(counts: Counter, kind: str) -> int:
    return sum(n for op, n in counts.items() if op.startswith(f"{kind}.global.v"))


@compiling
@pytest.mark.parametrize("arch", ARCHS)
@every_param_dtype
@pytest.mark.parametrize("n_avg, n_ring", [(1, 0), (0, 1), (2, 1), (4, 2)])
def test_update_kernel_vectorises_aligned_rows(arch, p_dtype, ring, n_avg, n_ring):
    vec = 4 if n_avg or p_dtype == tl.float32 else 8  # table.vector_width: fp32 averages set it
    constexprs = {"P_DTYPE": p_dtype, "MATH": tl.float32, "N_AVG": n_avg, "N_RING": n_ring, "BLOCK": BLOCK, "VEC": vec}
    counts = _ptx(update.update_kernel, _update_signature(ring=ring), constexprs, arch)
    # Vectors: the parameter read (8 bytes for bf16 beside fp32 averages, else 16), each average's
    # 16-byte read and write, each ring write.
    assert _vector(counts, "ld") >= 1 + n_avg and counts["ld.global.v4.b32"] >= n_avg, counts
    assert _vector(counts, "st") >= n_avg + n_ring and counts["st.global.v4.b32"] >= n_avg, counts
    # Every access of the aligned loop has one layout: nothing crosses shared memory per iteration.
    assert "convert_layout" not in _aligned_loop(update.update_kernel, _update_signature(ring=ring), constexprs, arch)
    # The masked loop (misaligned rows and tails) is scalar: nothing vectorised it on a hint.
    scalar_param = "ld.global.b32" if p_dtype == tl.float32 else "ld.global.b16"
    assert counts[scalar_param] > 0, counts


@compiling
@pytest.mark.parametrize("arch", ARCHS)
def test_update_kernel_contracts_the_lerp_into_fmas(arch):
    """The launches' FP_FUSION: lerp's multiply-adds are FMAs, as nvcc compiles torch's CUDA lerp
    and the native kernels. Triton 3.10 turns its default off: then each would be a mul.rn and an
    add.rn (each rounded), and the Triton backend's averages would drift from the others' by an ulp."""
    constexprs = {"P_DTYPE": tl.bfloat16, "MATH": tl.float32, "N_AVG": 1, "N_RING": 0, "BLOCK": BLOCK, "VEC": 4}
    ptx = _compile(update.update_kernel, _update_signature(), constexprs, arch).asm["ptx"]
    assert "fma.rn.f32" in ptx and "mul.rn.f32" not in ptx


@compiling
@pytest.mark.parametrize("arch", ARCHS)
@every_param_dtype
@pytest.mark.parametrize("n_ring", [1, 2])
def test_snapshot_kernel_vectorises_aligned_rows(arch, p_dtype, ring, n_ring):
    """LAWA alone: update_kernel's rows with 4 arguments; the same 16-byte accesses."""
    sig = {"table": "*i64", "n_rows": "i32", "r0": ring, "r1": ring}
    vec = 4 if p_dtype == tl.float32 else 8
    constexprs = {"P_DTYPE": p_dtype, "N_RING": n_ring, "BLOCK": BLOCK, "VEC": vec}
    counts = _ptx(update.snapshot_kernel, sig, constexprs, arch)
    assert counts["ld.global.v4.b32"] >= 1 and counts["st.global.v4.b32"] >= n_ring, counts
    assert "convert_layout" not in _aligned_loop(update.snapshot_kernel, sig, constexprs, arch)
    scalar_param = "ld.global.b32" if p_dtype == tl.float32 else "ld.global.b16"
    assert counts[scalar_param] > 0, counts  # misaligned rows and tails stay scalar


@compiling
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", [swap.FROM_AVERAGE, swap.FROM_RING, swap.RESTORE], ids=["average", "ring", "restore"])
def test_swap_kernel_vectorises(arch, mode):
    source = "*bf16" if mode == swap.FROM_RING else "*fp32"
    sig = {"table": "*i64", "n_rows": "i32", "backup": "*bf16", "source": source, "stride": "i64", "count": "i32"}
    vec = 4 if mode == swap.FROM_AVERAGE else 8  # table.vector_width of the params and the source
    consts = {"P_DTYPE": tl.bfloat16, "AVG_DTYPE": tl.float32, "MODE": mode, "BLOCK": BLOCK, "VEC": vec}
    counts = _ptx(swap.swap_kernel, sig, consts, arch)
    assert "convert_layout" not in _aligned_loop(swap.swap_kernel, sig, consts, arch)
    writes = 1 if mode == swap.RESTORE else 2  # restore: p; swap in: backup and p
    assert _vector(counts, "ld") >= writes and _vector(counts, "st") >= writes, counts
    assert counts["ld.global.b16"] > 0, counts  # the masked path stays scalar


def _reads_before_first_write(loop: str) -> tuple[int, int]:
    """(loads before the aligned loop body's first store, loads in the body)."""
    first_store = loop.index("tt.store")
    return loop[:first_store].count("tt.load "), loop.count("tt.load ")


@compiling
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_avg, n_ring", [(1, 1), (2, 0), (2, 1), (4, 2)])
def test_update_kernel_reads_every_buffer_before_writing_any(arch, n_avg, n_ring):
    """Loads and stores through pointers that may alias stay in program order, so a store between
    two loads makes each iteration wait one memory round trip per buffer: the SASS of EMA+SWA+LAWA
    had three, one after another (p; a0 after the ring store; a1 after a0's store)."""
    constexprs = dict(P_DTYPE=tl.bfloat16, MATH=tl.float32, N_AVG=n_avg, N_RING=n_ring, BLOCK=BLOCK, VEC=4)
    loop = _aligned_loop(update.update_kernel, _update_signature(), constexprs, arch)
    assert _reads_before_first_write(loop) == (1 + n_avg, 1 + n_avg)


@compiling
@pytest.mark.parametrize("arch", ARCHS)
def test_swap_kernel_reads_both_buffers_before_writing(arch):
    sig = {"table": "*i64", "n_rows": "i32", "backup": "*bf16", "source": "*fp32", "stride": "i64", "count": "i32"}
    consts = {"P_DTYPE": tl.bfloat16, "AVG_DTYPE": tl.float32, "MODE": swap.FROM_AVERAGE, "BLOCK": BLOCK, "VEC": 4}
    assert _reads_before_first_write(_aligned_loop(swap.swap_kernel, sig, consts, arch)) == (2, 2)


@compiling
@pytest.mark.parametrize("arch", ARCHS)
def test_ring_mean_kernel_vectorises(arch):
    sig = {"out": "*fp32", "ring": "*bf16", "n": "i64", "stride": "i64", "count": "i32"}
    counts = _ptx(ring_mean.ring_mean_kernel, sig, {"BLOCK": BLOCK}, arch)
    assert _vector(counts, "ld") >= 2 and _vector(counts, "st") >= 1, counts


def _specialisation(kernel, arch: int, args, constexprs) -> list:
    """How Triton's JIT specialises a launch of ``kernel`` with these arguments on ``arch``, with
    no GPU: per argument, its type and what the compiled variant assumes (a constant 1, a multiple
    of 16, nothing)."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        return list(binder(*args, **constexprs)[1])
    except (ImportError, AttributeError, TypeError) as err:  # internals of Triton 3.6 to 3.9
        pytest.skip(f"this Triton binds launches differently: {err!r}")


@compiling
@pytest.mark.parametrize("arch", ARCHS)
def test_first_calls_compile_the_kernels_later_calls_run(arch):
    """A first update copies (flags 1) and a first ring mean has one snapshot (count 1). Triton
    compiles a variant for an int argument equal to 1, and the first launch's registers size the
    grid of every later one (table.launch): so these arguments must not be specialised on."""
    from test_triton_grid import _update_launch

    copy_args, meta = _update_launch([1.0, 1.0])
    steady_args, _ = _update_launch([0.001, 0.01])
    assert _specialisation(update.update_kernel, arch, copy_args, meta) == _specialisation(
        update.update_kernel, arch, steady_args, meta
    )
    params = [torch.randn(4099).bfloat16()]
    rows, backup = build_table(params), torch.empty(4099, dtype=torch.bfloat16)
    ring, out = torch.zeros(3, 4104, dtype=torch.bfloat16)[:, :4099], torch.empty(4099)
    consts = {"P_DTYPE": tl.bfloat16, "AVG_DTYPE": tl.float32, "MODE": swap.FROM_RING, "BLOCK": BLOCK, "VEC": 8}
    swaps, means = [], []
    for count in (1, 3):
        swaps.append(_specialisation(swap.swap_kernel, arch, (rows, 1, backup, ring, ring.stride(0), count), consts))
        means.append(
            _specialisation(ring_mean.ring_mean_kernel, arch, (out, ring, 4099, 4104, count), {"BLOCK": BLOCK})
        )
    assert swaps[0] == swaps[1] and means[0] == means[1]


@compiling
@pytest.mark.parametrize("arch", [70, 75, 86, 100, 120])  # V100, T4 (the oldest the backend takes), A10, B200, RTX 50
@pytest.mark.parametrize(
    "p_dtype, p_ptr, avg_dtype, avg_ptr",
    [(tl.bfloat16, "*bf16", tl.float32, "*fp32"), (tl.float16, "*fp16", tl.float32, "*fp32"),
     (tl.float32, "*fp32", tl.float32, "*fp32"), (tl.float64, "*fp64", tl.float64, "*fp64")],
    ids=["bf16", "fp16", "fp32", "fp64"],
)  # fmt: skip
def test_every_kernel_compiles_for_gpus_no_run_has_seen(arch, p_dtype, p_ptr, avg_dtype, avg_ptr):
    """The GPU runs were on sm_90. triton_backend takes compute capability 7.0 and later
    (torch.compile's rule; Triton's README lists 8.0 and later, and these kernels use no matrix
    unit): every kernel, in every dtype, must at least compile for the oldest and the newest."""
    if arch >= 100 and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip(f"triton {triton.__version__} predates Blackwell (3.3)")
    widest = 8 if avg_dtype == tl.float64 else 4
    vec = 16 // max(widest, p_dtype.primitive_bitwidth // 8)
    math = tl.float64 if avg_dtype == tl.float64 else tl.float32
    update_consts = {"P_DTYPE": p_dtype, "MATH": math, "N_AVG": 2, "N_RING": 1, "BLOCK": BLOCK, "VEC": vec}
    _compile(update.update_kernel, _update_signature(avg=avg_ptr, ring=p_ptr), update_consts, arch)
    snapshot_sig = {"table": "*i64", "n_rows": "i32", "r0": p_ptr, "r1": p_ptr}
    snapshot_consts = {"P_DTYPE": p_dtype, "N_RING": 2, "BLOCK": BLOCK, "VEC": 16 // (p_dtype.primitive_bitwidth // 8)}
    _compile(update.snapshot_kernel, snapshot_sig, snapshot_consts, arch)
    for mode, source in [(swap.FROM_AVERAGE, avg_ptr), (swap.FROM_RING, p_ptr), (swap.RESTORE, p_ptr)]:
        sig = {"table": "*i64", "n_rows": "i32", "backup": p_ptr, "source": source, "stride": "i64", "count": "i32"}
        consts = {"P_DTYPE": p_dtype, "AVG_DTYPE": avg_dtype, "MODE": mode, "BLOCK": BLOCK, "VEC": vec}
        _compile(swap.swap_kernel, sig, consts, arch)
    mean_sig = {"out": avg_ptr, "ring": p_ptr, "n": "i64", "stride": "i64", "count": "i32"}
    _compile(ring_mean.ring_mean_kernel, mean_sig, {"BLOCK": BLOCK}, arch)
