"""fastavg-bench: the quick run end to end, its outputs, its bad options."""

import csv
import json

import pytest
import torch

import fastavg
from fastavg.bench import cases, cli, timing
from fastavg.bench.shapes import gpt2_shapes

REQUIRED = {"update", "impl", "dtype", "numel", "median_ms", "gbps", "pct_of_copy", "speedup_vs_stock",
            "speedup_vs_averaged_model"}  # fmt: skip


def test_gpt2_shapes_are_gpt2_124m():
    shapes = gpt2_shapes()
    assert len(shapes) == 148
    assert sum(torch.Size(s).numel() for s in shapes) == 124_439_808


def test_minimal_bytes_follow_the_design_table():
    bf16, fp32 = 2, 4
    assert cases.minimal_bytes_per_element("ema", bf16, fp32) == 10
    assert cases.minimal_bytes_per_element("swa", bf16, fp32) == 10
    assert cases.minimal_bytes_per_element("lawa", bf16, fp32) == 4
    assert cases.minimal_bytes_per_element("all", bf16, fp32) == 20
    assert cases.minimal_bytes_per_element("swap", bf16, fp32) == 14  # swap-in 10 + restore 4


@pytest.mark.parametrize(
    "ms_per_call, calls, expected",
    [(0.13, 5, 39), (1.6, 5, 5), (360.0, 1, 1), (0.001, 5, timing.MAX_CALLS_PER_SAMPLE), (0.0, 1, 100)],
)
def test_gpu_samples_span_the_minimum_time(ms_per_call, calls, expected):
    # LAWA's 0.13 ms kernel takes enough calls for 5 ms; a training step keeps its single call.
    assert timing.calls_per_sample(ms_per_call, calls) == expected


def test_quick_run_writes_every_output(tmp_path, capsys):
    out = {kind: tmp_path / f"b.{kind}" for kind in ("json", "csv", "png")}
    cli.main(["--quick", "--update", "ema", "lawa", "--json", str(out["json"]), "--csv", str(out["csv"]),
              "--plot", str(out["png"])])  # fmt: skip
    table = capsys.readouterr().out
    assert "fastavg-torch" in table and "stock-foreach" in table and "AveragedModel" in table
    header, *records = json.loads(out["json"].read_text())
    assert header["record"] == "header" and header["copy_gbps"] > 0 and header["torch"] == torch.__version__
    assert records and all(REQUIRED <= set(r) for r in records)
    assert {r["update"] for r in records} == {"ema", "lawa"} and {r["dtype"] for r in records} == {
        "bfloat16",
        "float32",
    }
    fast = [r for r in records if r["impl"] == "fastavg-torch"]
    assert all(r["speedup_vs_stock"] > 0 for r in fast)
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in records)
    bf16_model = [r for r in records if r["impl"] == "AveragedModel" and r["dtype"] == "bfloat16"]
    assert bf16_model and not bf16_model[0]["same_numerics"]  # said plainly: it keeps bf16 averages
    assert len(list(csv.DictReader(out["csv"].open()))) == len(records)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--numel", "0"], "numel"),
        (["--numel", "-5"], "numel"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "not"),
        (["--device", "nonsense"], "device"),
        (["--repeats", "0", "--quick"], "repeats"),
    ],
)
def test_bad_options_get_clear_errors(argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert message in str(info.value)


def test_unknown_backend_or_update_is_refused(capsys):
    for argv in (["--backends", "cuda"], ["--update", "polyak"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        assert "invalid choice" in capsys.readouterr().err


def test_unavailable_backend_is_refused_with_the_reason(monkeypatch):
    reasons = {"torch": None, "triton": None, "native": "fastavg._C is not built (a test's reason)"}
    monkeypatch.setattr(cli.fastavg, "available_backends", lambda device=None: reasons)
    with pytest.raises(SystemExit, match="a test's reason"):
        cli.resolve_backends(["native"], torch.device("cpu"))
    assert cli.resolve_backends(None, torch.device("cpu")) == ["torch"]  # the interpreter is never benchmarked


def test_train_step_reports_the_overhead(tmp_path, capsys):
    path = tmp_path / "train.json"
    cli.main(["--train-step", "--train-batch", "2", "--repeats", "2", "--warmup", "1", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "train step: nano" in printed and "overhead" in printed
    header, *records = json.loads(path.read_text())
    assert header["record"] == "header" and records[0]["impl"] == "adamw" and records[0]["overhead_pct"] == 0.0
    wrapped = records[1:]
    assert wrapped and all("ema+swa+lawa" in r["impl"] for r in wrapped)
    base = records[0]["median_ms"]
    for r in wrapped:
        assert r["overhead_pct"] == pytest.approx(100 * (r["median_ms"] - base) / base)


def test_train_step_rejects_unknown_preset():
    with pytest.raises(SystemExit, match="train-preset"):
        cli.main(["--train-step", "--train-preset", "gpt9"])


def test_readme_table_is_generated_from_the_recorded_results():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "bench" / "make_table.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert list((root / "bench" / "results").glob("*.json")), "no recorded benchmark run"


def _kernel_sweep():
    """bench/kernel_sweep.py as a module (a script, not part of the package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "kernel_sweep.py"
    spec = importlib.util.spec_from_file_location("kernel_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_kernel_sweep_runs_every_kernel(capsys):
    """bench/kernel_sweep.py (run on GPUs by gpu_check.sh): its smoke mode here, every row printed."""
    sweep = _kernel_sweep()
    sweep.main(["--device", "cpu", "--quick", "--repeats", "1", "--blocks", "1024", "--warps", "4"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    available = [b for b, why in fastavg.available_backends("cpu").items() if why is None]
    kernels = {"triton B=1024 w=4": "triton", "native": "native"}
    expected = {(u, k) for u in ("ema", "lawa", "ema+lawa", "all") for k, b in kernels.items() if b in available}
    expected |= {("swap", k) for k in ("triton", "native") if k in available}
    expected |= {("all", f"opt.step() {b}") for b in ("triton", "native") if b in available}
    assert {(r[0], " ".join(r[1:-3])) for r in rows} == expected and expected
    assert all(float(r[-3]) > 0 for r in rows)
    for update in ("ema", "lawa", "all", "swap"):  # the sweep's byte counts are the benchmark's
        assert sweep.bytes_per_element(update) == cases.minimal_bytes_per_element(update, 2, 4)


def test_kernel_sweep_native_rows_set_and_restore_their_tuning():
    """On a GPU the sweep times the native kernels at each threads-per-block and unroll setting
    (unroll only where set_unroll applies), through the build's tuning hooks, and restores them."""
    sweep = _kernel_sweep()

    class Tuning:  # the hooks' contract: set, and return the previous setting
        state = [256, 1]

        def set_block_threads(self, threads):
            previous, self.state[0] = self.state[0], threads
            return previous

        def set_unroll(self, unroll):
            previous, self.state[1] = self.state[1], unroll
            return previous

    tuning = Tuning()
    lawa = sweep.native_rows("lawa", print, tuning, [256, 128], [1, 2])
    assert {k: v[1] for k, v in lawa.items()} == {
        "native T=256": (256, 1), "native T=256 x2": (256, 2), "native T=128": (128, 1), "native T=128 x2": (128, 2)
    }  # fmt: skip
    assert list(sweep.native_rows("ema", print, tuning, [128], [1, 2])) == ["native T=128"]
    assert sweep.native_rows("ema", print, None, [128], [1, 2]) == {"native": (print, None)}
    with pytest.raises(RuntimeError), sweep.native_settings(tuning, 128, 2):
        assert tuning.state == [128, 2]
        raise RuntimeError("a failed row")
    assert tuning.state == [256, 1]
