"""fastavg-bench: the quick run end to end, its outputs, its bad options."""

import csv
import json
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import make_params
from torch.utils._python_dispatch import TorchDispatchMode

import fastavg
from fastavg.bench import cases, cli, native_launch, report, timing, train_step
from fastavg.bench.shapes import gpt2_shapes, parameter_shapes
from fastavg.train.model import GPT, config_for


class FakeTuningHooks:
    """The native CUDA build's tuning hooks' contract (set, return the previous setting; refuse with
    -1, changing nothing), on the CPU; ``log`` keeps every call. It starts at 256 threads and no
    unroll, not at the build's defaults, so a row's restore is seen to undo its own setting."""

    def __init__(self):
        self.state, self.log, self.bulk, self.driver = [256, 1, 0], [], 0, 0

    def set_block_threads(self, threads):
        if threads % 32 or not 32 <= threads <= 256:
            return -1
        self.log.append(("threads", threads))
        previous, self.state[0] = self.state[0], threads
        return previous

    def set_unroll(self, unroll):
        if unroll not in (1, 2, 4):
            return -1
        self.log.append(("unroll", unroll))
        previous, self.state[1] = self.state[1], unroll
        return previous

    def set_block_per_row(self, on):
        if on not in (0, 1):
            return -1
        self.log.append(("block_per_row", on))
        previous, self.state[2] = self.state[2], on
        return previous

    def set_bulk_rings(self, stage_kb):
        if stage_kb not in (0, 4, 8, 16, 32):
            return -1
        self.log.append(("bulk_rings", stage_kb))
        previous, self.bulk = self.bulk, stage_kb
        return previous

    def set_driver_copies(self, mode):
        if mode not in (0, 1, 2):
            return -1
        self.log.append(("driver_copies", mode))
        previous, self.driver = self.driver, mode
        return previous


REQUIRED = {"update", "impl", "dtype", "numel", "median_ms", "host_ms", "gbps", "pct_of_copy", "speedup_vs_stock",
            "speedup_vs_averaged_model"}  # fmt: skip


@pytest.mark.parametrize(
    "name, tensors, numel",
    [("gpt2", 148, 124_439_808), ("gpt2-medium", 292, 354_823_168), ("gpt2-large", 436, 774_030_080)],
)
def test_parameter_sets_are_gpt2s_sizes_or_one_flat_tensor(name, tensors, numel):
    label, shapes = parameter_shapes(name, None)  # Hugging Face's counts, the tied head once
    assert label == name and len(shapes) == tensors and sum(torch.Size(s).numel() for s in shapes) == numel
    assert name != "gpt2" or shapes == gpt2_shapes()  # gpt2_shapes' defaults: 124M
    assert parameter_shapes(name, 1) == ("numel=1", [(1,)])  # --numel wins over the default set
    with pytest.raises(ValueError, match="--numel must be > 0, got 0"):
        parameter_shapes(name, 0)
    with pytest.raises(ValueError, match=r"unknown parameter set 'gpt3'; expected one of \['gpt2', "):
        parameter_shapes("gpt3", None)


def test_minimal_bytes_follow_the_design_table():
    bf16, fp32 = 2, 4
    assert cases.minimal_bytes_per_element("ema", bf16, fp32) == 10
    assert cases.minimal_bytes_per_element("swa", bf16, fp32) == 10
    assert cases.minimal_bytes_per_element("lawa", bf16, fp32) == 4
    assert cases.minimal_bytes_per_element("all", bf16, fp32) == 20
    assert cases.minimal_bytes_per_element("swap", bf16, fp32) == 14  # swap-in 10 + restore 4


class AtenLog(TorchDispatchMode):
    """The aten ops a call runs, as dispatched (the top-level calls, not what they run inside), each
    as (name, its number arguments, the first tensor it writes or reads)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        numbers = tuple(a for a in args if isinstance(a, (int, float)))
        self.ops.append((func.overloadpacket.__name__, numbers, first))
        return func(*args, **(kwargs or {}))


def _aten_ops(step, names=None):
    with torch.no_grad(), AtenLog() as log:
        step()
    return [op for op in log.ops if names is None or op[0] in names]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "update, work",
    [
        ("ema", ["cast", ("_foreach_lerp_", 0.001)]),
        ("swa", ["cast", ("_foreach_lerp_", 0.01)]),  # SWA's cost: its weight changes, the work does not
        ("lawa", [("_foreach_copy_",)]),
        ("all", ["cast", ("_foreach_lerp_", 0.001), ("_foreach_lerp_", 0.01), ("_foreach_copy_",)]),
        ("swap", [("_foreach_copy_",)] * 3),  # the weights out, the EMA in, the weights back
    ],
)
def test_the_stock_paths_do_the_work_fastavg_is_timed_against(update, work, dtype):
    # A baseline that skipped a pass would flatter nothing but itself: each stock path runs exactly
    # the foreach ops its note names, one cast pass first where the weights are not fp32.
    params = make_params([(3, 4), (5,)], dtype)
    expected = [("_foreach_copy_",) if op == "cast" else op for op in work if op != "cast" or dtype != torch.float32]
    case = cases.stock_case(update, params, torch.float32)
    before = [p.detach().clone() for p in params]
    ops = _aten_ops(case.step)
    assert [(name, *numbers) for name, numbers, _ in ops] == [pytest.approx(op) for op in expected]
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # swap's last copy puts the weights back
    loop = cases.loop_case(update, params, torch.float32)
    if update not in ("ema", "swa"):
        assert loop is None and cases.averaged_model_case(update, params) is None
        return
    weight = expected[-1][1]
    per_tensor = [("_to_copy",)] * (dtype != torch.float32) + [("lerp_", weight)]  # a cast, then lerp_, per tensor
    assert [(name, *numbers) for name, numbers, _ in _aten_ops(loop.step)] == [
        pytest.approx(op) for op in per_tensor * 2
    ]
    # AveragedModel's third update (two untimed first): EMA at 1 - decay, SWA at 1 / (averaged + 1).
    model = cases.averaged_model_case(update, params)
    lerps = _aten_ops(model.step, ("_foreach_lerp_",))
    assert [numbers for _, numbers, _ in lerps] == [pytest.approx((0.001 if update == "ema" else 1 / 3,))]


@pytest.mark.parametrize("update", cases.UPDATES)
def test_every_timed_fastavg_call_does_the_whole_update(update):
    # A timed call that found nothing due (LAWA every other step, or EMA's first, copying update)
    # would time less than the update: each call runs the same foreach work as the one before.
    step = cases.fastavg_case(update, make_params([(3, 4), (5,)], torch.float32), "torch").step
    calls = [[name for name, _, _ in _aten_ops(step, ("_foreach_copy_", "_foreach_lerp_"))] for _ in range(3)]
    assert calls[0] and calls[0] == calls[1] == calls[2]
    assert ("_foreach_lerp_" in calls[0]) == (update in ("ema", "swa", "all"))


def test_the_stock_lawa_ring_takes_each_slot_in_turn():
    params = make_params([(3, 4), (5,)], torch.bfloat16)
    step = cases.stock_case("lawa", params, torch.float32).step
    slots = [first.data_ptr() for _ in range(2 * cases.WINDOW) for _, _, first in _aten_ops(step)]
    assert len(set(slots[: cases.WINDOW])) == cases.WINDOW and slots[cases.WINDOW :] == slots[: cases.WINDOW]
    assert all(p.data_ptr() not in slots for p in params)


@pytest.mark.parametrize(
    "ms_per_call, calls, expected",
    [(0.13, 5, 39), (1.6, 5, 5), (360.0, 1, 1), (0.001, 5, timing.MAX_CALLS_PER_SAMPLE), (0.0, 1, 100)],
)
def test_gpu_samples_span_the_minimum_time(ms_per_call, calls, expected):
    # LAWA's 0.13 ms kernel takes enough calls for 5 ms; a training step keeps its single call.
    assert timing.calls_per_sample(ms_per_call, calls) == expected


def test_medians_are_per_call_and_gpu_samples_span_the_minimum_time(monkeypatch):
    """interleaved_median_ms's GPU branch on the host: each fn costs a fixed number of GPU
    milliseconds, which the fake events see; the result is per call, and each fn's calls per
    sample are fixed from one sample of ``calls`` after the warm-up."""
    gpu = {"clock": 0.0}

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = gpu["clock"]

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    counts = {"lawa": 0, "step": 0}

    def costs(name, ms):
        def fn():
            counts[name] += 1
            gpu["clock"] += ms

        return fn

    fns = [costs("lawa", 0.125), costs("step", 40.0)]
    assert timing.interleaved_median_ms(fns, torch.device("cuda"), 3, 2, calls=2) == pytest.approx([0.125, 40.0])
    # warm-up 2; the sizing sample: 1 untimed + 2; then 3 samples of 1 untimed + 40 (5 ms of 0.125 ms calls) or + 2
    assert counts == {"lawa": 2 + 3 + 3 * 41, "step": 2 + 3 + 3 * 3}
    # On the CPU: one call a sample, on the host's clock (here the same fake time, in seconds).
    monkeypatch.setattr(timing.time, "perf_counter", lambda: gpu["clock"] / 1e3)
    counts.update(lawa=0, step=0)
    assert timing.interleaved_median_ms(fns, torch.device("cpu"), 3, 2, calls=2) == pytest.approx([0.125, 40.0])
    assert counts == {"lawa": 5, "step": 5}


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    copies = []

    def one_ms(fn, device, repeats, warmup):
        fn()
        copies.append((repeats, warmup))
        return 1.0

    monkeypatch.setattr(timing, "median_ms", one_ms)
    # 2 MB moved (1 MB read, 1 MB written) in 1 ms: 2 GB/s
    assert timing.copy_bandwidth_gbps(torch.device("cpu"), 2_000_000, 7, 3) == pytest.approx(2.0)
    assert copies == [(7, 3)]


class FakeCudaQueue:
    """torch.cuda's sleep kernel and events, on the CPU: the sleep lasts ``sleep_ms`` of host time
    from the moment it is queued (10 million cycles take 10 ms), as a busy GPU's queue would."""

    def __init__(self, monkeypatch, sleep_ms_real: float):
        self.sleeps, self.sleep_ms_real, self.ends = [], sleep_ms_real, []
        queue = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = queue.ends[-1] if queue.ends else time.perf_counter()

            def query(self):
                return time.perf_counter() >= self.at

            def elapsed_time(self, end):
                return 10.0  # the calibration's sleep of 10 million cycles

        def sleep(cycles):
            self.sleeps.append(cycles)
            self.ends.append(time.perf_counter() + self.sleep_ms_real / 1e3)

        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "_sleep", sleep)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(timing, "_SLEEP_CYCLES_PER_MS", {})


@pytest.mark.parametrize("sleep_ms_real, call_ms, measured", [(500.0, 1.0, True), (5.0, 1.0, False)])
def test_host_time_is_taken_while_the_gpu_sleeps(monkeypatch, sleep_ms_real, call_ms, measured):
    """A case's host time per call, with a sleeping kernel queued ahead of its kernels; None where
    the sleep ended first (a call that waited for the GPU, or a slow host)."""
    queue, calls = FakeCudaQueue(monkeypatch, sleep_ms_real), []

    def step():
        calls.append(1)
        time.sleep(call_ms / 1e3)

    host_ms = timing.host_ms_per_call(step, torch.device("cuda"), 2.0, calls=5)
    # After the calibration: a sleep of 5 ms + 3 x 5 calls x 2 ms, at a million cycles per ms.
    assert len(calls) == 5 and queue.sleeps[1] == 35_000_000
    if measured:
        assert call_ms <= host_ms < 20 * call_ms  # per call: the 5 calls together take 5x as long
    else:
        assert host_ms is None
    assert timing.host_ms_per_call(step, torch.device("cpu"), 2.0) is None and len(calls) == 5


def test_quick_run_writes_every_output(tmp_path, capsys):
    out = {kind: tmp_path / f"b.{kind}" for kind in ("json", "csv", "png")}
    cli.main(["--quick", "--update", "ema", "lawa", "--json", str(out["json"]), "--csv", str(out["csv"]),
              "--plot", str(out["png"])])  # fmt: skip
    table = capsys.readouterr().out
    assert "fastavg-torch" in table and "stock-foreach" in table and "AveragedModel" in table
    header, *records = json.loads(out["json"].read_text())
    assert header["record"] == "header" and header["copy_gbps"] > 0 and header["torch"] == torch.__version__
    assert header["complete"]
    tiny = gpt2_shapes(layers=2, dim=128, vocab=1000, context=128)  # --quick's shapes: a 2-layer GPT-2
    assert header["params"] == "gpt2-tiny (--quick)" and header["numel"] == sum(torch.Size(s).numel() for s in tiny)
    assert records and all(REQUIRED <= set(r) for r in records)
    assert {r["update"] for r in records} == {"ema", "lawa"} and {r["dtype"] for r in records} == {
        "bfloat16",
        "float32",
    }
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in records)
    ms = {(r["update"], r["dtype"], r["impl"]): r["median_ms"] for r in records}
    for r in records:
        itemsize = getattr(torch, r["dtype"]).itemsize
        assert r["bytes_per_element"] == cases.minimal_bytes_per_element(r["update"], itemsize, 4)  # fp32 averages
        assert r["gbps"] == pytest.approx(r["numel"] * r["bytes_per_element"] / r["median_ms"] / 1e6)
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / header["copy_gbps"])
        stock, model = (ms.get((r["update"], r["dtype"], impl)) for impl in ("stock-foreach", "AveragedModel"))
        if r["impl"].startswith("fastavg"):  # only fastavg's rows are compared with the stock paths
            assert r["speedup_vs_stock"] == pytest.approx(stock / r["median_ms"])
            assert r["speedup_vs_averaged_model"] == (pytest.approx(model / r["median_ms"]) if model else None)
        else:
            assert r["speedup_vs_stock"] is None and r["speedup_vs_averaged_model"] is None
    bf16_model = [r for r in records if r["impl"] == "AveragedModel" and r["dtype"] == "bfloat16"]
    assert bf16_model and not bf16_model[0]["same_numerics"]  # said plainly: it keeps bf16 averages
    with out["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(records)
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_stopped_part_way_keeps_what_it_measured(monkeypatch, tmp_path, capsys):
    # gpu_check.sh gives the benchmark a time limit; the updates timed before it hits stay on disk.
    run_dtype = cli.run_dtype

    def stopped_at_swa(update, *args):
        if update == "swa":
            raise KeyboardInterrupt  # what timeout's SIGTERM stands for here: the process ends
        return run_dtype(update, *args)

    monkeypatch.setattr(cli, "run_dtype", stopped_at_swa)
    path = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--backends", "torch", "--update", "ema", "swa", "--dtype", "bf16", "--json", str(path)])
    header, *records = json.loads(path.read_text())
    assert header["complete"] is False
    assert records and {r["update"] for r in records} == {"ema"}
    assert "fastavg-torch" in capsys.readouterr().out  # the EMA rows were printed as they came
    assert "stopped part way" in _bench_script("make_table").table_for(str(path))  # and the README says so


def test_a_numbered_cuda_device_becomes_the_current_one(monkeypatch):
    # CUDA events, torch.cuda._sleep and Triton's launches use the current device: timing cuda:1
    # with cuda:0 current would record the events where none of the work runs.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert cli.resolve_device("cuda:1") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert cli.resolve_device("cuda") == torch.device("cuda") and len(chosen) == 1  # the current one already
    with pytest.raises(SystemExit, match=r"device 'cuda:2': torch sees 2 CUDA device\(s\)"):
        cli.resolve_device("cuda:2")
    assert len(chosen) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--numel", "0"], "numel"),
        (["--numel", "-5"], "numel"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "not"),
        (["--device", "nonsense"], "device"),
        (["--repeats", "0", "--quick"], "repeats"),
        (["--warmup", "-1", "--quick"], "warmup"),
        (["--train-step", "--train-batch", "0"], "--train-batch and --train-accum must be >= 1"),
        (["--train-step", "--train-accum", "0"], "--train-batch and --train-accum must be >= 1"),
        (["--train-step", "--train-preset", "gpt3"], "unknown --train-preset 'gpt3'"),
        (["--train-step", "--train-preset", ""], "unknown --train-preset ''"),
    ],
)
def test_bad_options_get_clear_errors(argv, message, monkeypatch):
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: pytest.fail("timed before the options were checked"))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert message in str(info.value)


@pytest.mark.parametrize("processor, name", [("x86_64", "x86_64"), ("", "cpu")])
def test_the_header_names_the_processor_where_python_knows_it(monkeypatch, processor, name):
    monkeypatch.setattr(cli.platform, "processor", lambda: processor)
    header = cli.header_record(torch.device("cpu"), "two tensors", [(3, 4), (5,)], 12.5)
    assert header["device_name"] == name and header["device"] == "cpu" and header["params"] == "two tensors"
    assert header["tensors"] == 2 and header["numel"] == 17 and header["copy_gbps"] == 12.5


def _name_a_gpu(monkeypatch):
    """``--device auto`` resolves to CUDA on the host: with the timing faked, nothing touches it."""
    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a faked GPU")


@pytest.mark.parametrize(
    "argv, gpu, expected",
    [
        (["--quick"], False, (3, 1, 1 << 26)),
        ([], False, (10, 2, 1 << 28)),
        (["--repeats", "1", "--warmup", "0"], False, (1, 0, 1 << 28)),  # the smallest accepted
        ([], True, (30, 10, 1 << 30)),
    ],
)
def test_samples_and_the_copy_size_default_per_device(monkeypatch, argv, gpu, expected):
    seen = {}

    def copy_gbps(device, nbytes, repeats, warmup):
        seen["copy"] = repeats, warmup, nbytes
        return 1.0

    def run_dtype(update, dtype, shapes, device, backends, repeats, warmup, *rest):
        seen["update"] = repeats, warmup
        return []

    monkeypatch.setattr(cli, "copy_bandwidth_gbps", copy_gbps)
    monkeypatch.setattr(cli, "run_dtype", run_dtype)
    if gpu:
        _name_a_gpu(monkeypatch)
    cli.main([*argv, "--numel", "1000", "--backends", "torch", "--update", "ema", "--dtype", "fp32"])
    repeats, warmup, copy_bytes = expected
    assert seen == {"copy": (repeats, warmup, copy_bytes), "update": (repeats, warmup)}


@pytest.mark.parametrize(
    "argv, gpu, expected",
    [
        ([], False, ("nano", 16, 1, 5, 2)),  # on the CPU: at most 5 samples of the 10
        ([], True, ("gpt2", 16, 8, 10, 3)),  # on a GPU: GPT-2, the paper's accumulation, 10 samples of the 30
        (["--train-preset", "gpt2", "--train-batch", "1", "--repeats", "9", "--warmup", "4"], False, ("gpt2", 1, 8, 5, 3)),
        (["--train-preset", "gpt2", "--train-accum", "1", "--repeats", "1", "--warmup", "0"], False, ("gpt2", 16, 1, 1, 0)),
    ],
)  # fmt: skip
def test_train_step_options_and_their_defaults(monkeypatch, capsys, argv, gpu, expected):
    seen = []
    if gpu:
        _name_a_gpu(monkeypatch)

    def records(preset, device, batch_size, grad_accum, backends, repeats, warmup):
        seen.append((preset, batch_size, grad_accum, repeats, warmup))
        return []

    monkeypatch.setattr(train_step, "train_step_records", records)
    monkeypatch.setattr(train_step, "table", lambda records: "")
    cli.main(["--train-step", "--backends", "torch", *argv])
    assert seen == [expected]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--json", "/no/such/folder/b.json"], "--json /no/such/folder/b.json: there is no folder /no/such/folder"),
        (["--csv", "/no/such/folder/b.csv"], "--csv /no/such/folder/b.csv: there is no folder"),
        (["--plot", "/no/such/folder/b.png"], "--plot /no/such/folder/b.png: there is no folder"),
        (["--train-step", "--csv", "b.csv"], "--train-step writes its records to --json only"),
    ],
)
def test_an_output_it_could_not_write_is_refused_before_anything_is_timed(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda *a: pytest.fail("timed before the options were checked"))
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_the_plot_has_a_panel_per_dtype_and_a_bar_per_measurement(tmp_path, monkeypatch):
    axes = pytest.importorskip("matplotlib.axes")
    bars, real_bar = [], axes.Axes.bar

    def bar(self, xs, ys, width, **kw):
        bars.append((self, list(xs), list(ys), width, kw["label"]))
        return real_bar(self, xs, ys, width, **kw)

    monkeypatch.setattr(axes.Axes, "bar", bar)
    records = [
        {"dtype": "bfloat16", "update": "ema", "impl": "stock", "pct_of_copy": 50.0},
        {"dtype": "bfloat16", "update": "ema", "impl": "triton", "pct_of_copy": 91.0},
        {"dtype": "bfloat16", "update": "lawa", "impl": "triton", "pct_of_copy": 90.5},  # no stock lawa
        {"dtype": "float32", "update": "ema", "impl": "native", "pct_of_copy": 93.0},
    ]
    pyplot = pytest.importorskip("matplotlib.pyplot")
    open_before = pyplot.get_fignums()
    report.plot(str(tmp_path / "b.png"), {"params": "gpt2", "device_name": "a GPU"}, records)
    assert pyplot.get_fignums() == open_before  # its figure closed
    (bf16, *_), (fp32, *_) = bars[0], bars[2]
    assert [b[1:] for b in bars] == [
        ([0.0], [50.0], 0.4, "stock"),  # two implementations share each update's 0.8 of width
        ([0.4, 1.4], [91.0, 90.5], 0.4, "triton"),
        ([0.0], [93.0], 0.8, "native"),
    ]
    assert [b[0] for b in bars] == [bf16, bf16, fp32] and bf16 is not fp32  # a panel per dtype, sorted
    assert list(bf16.get_xticks()) == pytest.approx([0.2, 1.2]) and list(fp32.get_xticks()) == pytest.approx([0.0])
    assert [t.get_text() for t in bf16.get_xticklabels()] == ["ema", "lawa"]
    assert bf16.get_title() == "bfloat16 params, gpt2" and fp32.get_title() == "float32 params, gpt2"
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plot_without_matplotlib_is_refused_before_anything_is_timed(capsys, monkeypatch, tmp_path):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real_find_spec(name)
    )
    with pytest.raises(SystemExit):
        cli.parse_args(["--plot", str(tmp_path / "b.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err


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


def test_train_step_reports_the_overhead(tmp_path, capsys, monkeypatch):
    wrapped_with, wrap = [], fastavg.wrap
    monkeypatch.setattr(train_step.fastavg, "wrap", lambda inner, specs, **kw: wrapped_with.append(specs) or wrap(inner, specs, **kw))  # fmt: skip
    path = tmp_path / "train.json"
    cli.main(["--train-step", "--train-batch", "2", "--train-accum", "2", "--repeats", "2", "--warmup", "1", "--json", str(path)])  # fmt: skip
    printed = capsys.readouterr().out
    header, *records = json.loads(path.read_text())
    assert header["record"] == "header" and records[0]["impl"] == "adamw" and records[0]["overhead_pct"] == 0.0
    wrapped = records[1:]
    assert wrapped and all("ema+swa+lawa" in r["impl"] for r in wrapped)
    base = records[0]["median_ms"]
    for r in wrapped:
        assert r["overhead_pct"] == pytest.approx(100 * (r["median_ms"] - base) / base)
    # The trainer's nano model on its byte vocabulary, 2 sequences of its context, two micro-batches.
    config = config_for("nano", 256)
    numel, tokens = GPT(config).num_params(), 2 * config.block_size * 2
    assert all(r["preset"] == "nano" and r["numel"] == numel and r["tokens_per_step"] == tokens for r in records)
    assert f"train step: nano ({numel / 1e6:.1f}M params), 2 x {config.block_size} tokens x 2 accumulation" in printed
    # Every average is due at every timed step: the overhead is averaging's whole cost.
    assert len(wrapped_with) == len(wrapped)
    for specs in wrapped_with:
        assert specs == {"ema": fastavg.EMA(0.999), "swa": fastavg.SWA(), "lawa": fastavg.LAWA(5, every=1)}


@pytest.mark.parametrize("scale, clipped", [(1.0, True), (0.3, False)])  # weights scaled: smaller gradients
def test_the_timed_train_step_averages_its_micro_batches_and_clips_as_the_trainer_does(scale, clipped):
    torch.manual_seed(0)
    config = config_for("nano", 256, block_size=16)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    batches = [tuple(torch.randint(256, (2, 16)) for _ in range(2)) for _ in range(3)]
    seen = {}

    class CaptureGrads:  # the optimizer the step calls: it keeps the gradients it was given
        def step(self):
            seen["grads"] = [p.grad.clone() for p in model.parameters()]

        def zero_grad(self, set_to_none):
            model.zero_grad(set_to_none=set_to_none)

    train_step._step_fn(model, CaptureGrads(), batches, torch.device("cpu"))()
    assert all(p.grad is None for p in model.parameters())  # and freed after the step
    loss = sum(model(x, y)[1] for x, y in batches) / len(batches)  # one batch's mean loss
    loss.backward()
    assert (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) > 1.0) == clipped
    for got, want in zip(seen["grads"], (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


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


def _bench_script(name: str = "kernel_sweep"):
    """bench/<name>.py as a module (a script, not part of the package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_sweep_runs_every_kernel(capsys):
    """bench/kernel_sweep.py (run on GPUs by gpu_check.sh): its smoke mode here, every row printed."""
    sweep = _bench_script()
    sweep.main(["--device", "cpu", "--quick", "--repeats", "1", "--blocks", "1024", "--warps", "4"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    available = [b for b, why in fastavg.available_backends("cpu").items() if why is None]
    kernels = {"triton B=1024 w=4": "triton", "native": "native"}
    expected = {(u, k) for u in ("ema", "lawa", "ema+lawa", "all") for k, b in kernels.items() if b in available}
    expected |= {("swap", k) for k in ("triton", "native") if k in available}
    expected |= {("all", f"opt.step() {b}") for b in ("triton", "native") if b in available}
    torch_rows = ("torch copy_, same bytes", "torch neg (a kernel), same bytes", "torch.cat into the slot")
    expected |= {("lawa", name) for name in torch_rows}  # torch's own transfers of LAWA's bytes
    kernel_backends = [b for b in ("triton", "native") if b in available]
    expected |= {("lawa", f"{b}, rows of 2^{e}") for b in kernel_backends for e in (11, 12, 13, 16, 17)}
    expected |= {(u, f"{b}, rows of 2^13") for b in kernel_backends for u in ("ema", "ema+lawa", "all", "swap")}
    expected |= {("lawa", f"triton, a program per row, rows of 2^{e}") for e in (13, 14, 15) if "triton" in available}
    assert {(r[0], " ".join(r[1:-3])) for r in rows} == expected and expected
    assert all(float(r[-3]) > 0 for r in rows)
    for update in ("ema", "lawa", "all", "swap"):  # the sweep's byte counts are the benchmark's
        assert sweep.bytes_per_element(update) == cases.minimal_bytes_per_element(update, 2, 4)


def test_step_overhead_prints_every_row(monkeypatch, capsys):
    """bench/step_overhead.py (run on GPUs by gpu_check.sh): its rows here, with the torch backend."""
    overhead = _bench_script("step_overhead")
    monkeypatch.setattr("sys.argv", ["step_overhead.py", "--backends", "torch", "--repeats", "2"])
    overhead.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" us")]
    assert len(rows) == 6 and any("step, LAWA due" in row for row in rows)


def test_triton_launch_costs_time_both_update_kernels(monkeypatch, capsys):
    """The GPU-only part of step_overhead.py --profile: each update kernel's launch three ways.
    Here the interpreter runs the JIT rows, and a stand-in takes the compiled handle's calls."""
    if fastavg.available_backends("cpu")["triton"] is not None:
        pytest.skip("needs the Triton backend (interpreter)")
    from fastavg.kernels import table, update

    overhead, handle_calls = _bench_script("step_overhead"), []

    def compiled(kernel):
        return lambda *args, grid, **meta: {(grid[0], 1, 1): lambda *a: handle_calls.append((kernel, len(a)))}

    for kernel in (update.update_kernel, update.snapshot_kernel):
        monkeypatch.setattr(kernel, "warmup", compiled(kernel), raising=False)
    monkeypatch.setattr(table, "_resident_programs", lambda *args: 2)
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (7, 1, 33)]
    overhead.triton_launch_costs(params, 1)
    rows = capsys.readouterr().out.splitlines()
    assert [row[len("triton  ") :][:32].strip() for row in rows] == [
        "fastavg update_, EMA (20 args)",
        "JIT kernel[grid](...), EMA",
        "compiled handle[grid](...), EMA",
        "fastavg update_, LAWA (4 args)",
        "JIT kernel[grid](...), LAWA",
        "compiled handle[grid](...), LAWA",
    ]
    # Every argument and then every constexpr, positionally: 20 + 6 and 4 + 4.
    assert set(handle_calls) == {(update.update_kernel, 26), (update.snapshot_kernel, 8)}


def test_triton_host_cost_runs_the_jit_path_without_a_gpu():
    """bench/triton_host_cost.py: Triton's real launch path behind a stand-in driver, every row
    timed (its own process: it compiles, and it replaces the driver)."""
    pytest.importorskip("triton", minversion="3.2")  # fastavg.triton_backend.MIN_TRITON
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "triton_host_cost.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "3"], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line.rsplit(None, 2) for line in result.stdout.splitlines() if line.endswith(" us")]
    assert [name for name, _, _ in rows] == ["update_, LAWA alone", "update_, EMA", "update_, EMA+SWA+LAWA",
                                             "Averager.step(), LAWA due", "opt.step(), LAWA due"]  # fmt: skip
    assert all(float(us) > 0 for _, us, _ in rows)


def _lawa_sweep_buffers():
    """(params, buffers, available) for the sweep's LAWA question rows over small bf16 weights on the
    CPU: the ring poisoned, native available (its CPU op ignores the hooks), Triton not."""
    from fastavg.table import build_table

    params = [torch.randn(n).bfloat16() for n in (4099, 8, 1)]
    n = sum(p.numel() for p in params)
    ring = torch.full((3, n), float("nan"), dtype=torch.bfloat16)
    buffers = (params, build_table(params), [torch.zeros(n)], ring, torch.empty(n, dtype=torch.bfloat16))
    return params, buffers, {"triton": "not here", "native": None}


@pytest.mark.skipif(fastavg.available_backends("cpu")["native"] is not None, reason="needs the native backend")
@pytest.mark.parametrize(
    "marker, options, hook, expected",
    [
        ("TMA", ([1 << 15, 1 << 17], [8, 32], []), "bulk", {
            "native, TMA 8 KB stages, rows of 2^15": (256, 1, False, 8, 0),
            "native, TMA 32 KB stages, rows of 2^15": (256, 1, False, 32, 0),
            "native, TMA 8 KB stages, rows of 2^17": (256, 1, False, 8, 0),
            "native, TMA 32 KB stages, rows of 2^17": (256, 1, False, 32, 0),
        }),
        ("driver", ([], [], [1, 2]), "driver", {
            "native, driver's batch copy": (256, 1, False, 0, 1),
            "native, driver's batch copy, CE": (256, 1, False, 0, 2),
        }),
    ],
    ids=["tma", "driver-copies"],
)  # fmt: skip
def test_kernel_sweep_times_lawa_through_the_tma_or_the_drivers_copies_and_checks_every_lawa_row(
    marker, options, hook, expected
):
    """The sweep's LAWA rows through the TMA's bulk copies (set_bulk_rings at each stage size, over the
    default table and the longer ones asked for) and as the driver's copies (set_driver_copies in each
    mode asked for): at the build's threads and unroll, only where there are hooks. Every LAWA row of
    fastavg's kernels is checked once against a poisoned slot before timing: a variant no GPU test has
    run would otherwise print a time for wrong output."""
    sweep, tuning = _bench_script(), FakeTuningHooks()
    params, buffers, available = _lawa_sweep_buffers()
    runs = sweep.lawa_question_rows(params, buffers, [], available, tuning, *options)
    rows = {kernel: row for (_, kernel), row in runs.items() if marker in kernel}
    assert {k: v[1] for k, v in rows.items()} == expected
    for fn, settings in rows.values():
        with native_launch.launch_settings(tuning, *settings):
            assert getattr(tuning, hook) == getattr(settings, hook)
            assert sweep.writes_the_slot(fn, buffers)
        assert getattr(tuning, hook) == 0
    assert not sweep.writes_the_slot(lambda: None, buffers)  # a row that writes nothing is caught
    assert not any(marker in k for _, k in sweep.lawa_question_rows(params, buffers, [], available, None, *options))


@pytest.mark.skipif(fastavg.available_backends("cpu")["native"] is not None, reason="needs the native backend")
def test_kernel_sweep_times_lawa_with_a_block_per_row():
    """The sweep's LAWA rows with one block per row: native's through the CUDA build's hooks (a
    stand-in here), each at the build's threads and unroll, only where there are hooks; Triton's by
    its own grid. Each runs over its own table and writes the whole ring slot."""
    sweep, tuning = _bench_script(), FakeTuningHooks()
    params, buffers, available = _lawa_sweep_buffers()
    ring = buffers[3]
    runs = sweep.lawa_question_rows(params, buffers, [8, 1 << 15], available, tuning)
    per_row = {kernel: row for (update, kernel), row in runs.items() if "block per row" in kernel}
    assert {k: v[1] for k, v in per_row.items()} == {
        "native, a block per row, rows of 2^3": (256, 1, True, 0, 0),  # the stand-in's current settings
        "native, a block per row, rows of 2^15": (256, 1, True, 0, 0),
    }
    for fn, settings in per_row.values():
        ring.fill_(float("nan"))
        with native_launch.launch_settings(tuning, *settings):
            assert tuning.state == [256, 1, 1]
            fn()
        assert torch.equal(ring[1], torch.cat(params)) and tuning.state == [256, 1, 0]  # the sweep writes slot 1
    assert not any("block per row" in k for _, k in sweep.lawa_question_rows(params, buffers, [8], available, None))

    if fastavg.available_backends("cpu")["triton"] is None:  # Triton's row, a program per row (interpreter)
        available["triton"] = None
        runs = sweep.lawa_question_rows(params, buffers, [8], available, None)
        fn, settings = runs[("lawa", "triton, a program per row, rows of 2^3")]
        ring.fill_(float("nan"))
        fn()
        assert settings is None and torch.equal(ring[1], torch.cat(params))


def test_kernel_sweep_rows_over_other_tables_compute_what_the_default_table_does():
    """The sweep's rows over tables of other row lengths (the persistent grid; every backend here) and
    torch's gather into the ring slot: each writes the whole slot, or the same averages as the default
    table's kernel."""
    from fastavg.table import build_table

    sweep = _bench_script()
    available = fastavg.available_backends("cpu")
    if all(why is not None for backend, why in available.items() if backend != "torch"):
        pytest.skip("needs the native or the Triton backend")
    params = [torch.randn(n).bfloat16() for n in (4099, 8, 1, 31)]
    n = sum(p.numel() for p in params)
    ring = torch.full((3, n), float("nan"), dtype=torch.bfloat16)
    averages = [torch.randn(n) for _ in range(2)]
    buffers = (params, build_table(params), averages, ring, torch.empty(n, dtype=torch.bfloat16))
    lawa = sweep.table_rows("lawa", params, buffers, [8, 64, 1 << 15], available)
    assert {k for _, k in lawa} == {
        f"{b}, rows of 2^{e}" for b in ("triton", "native") if available[b] is None for e in (3, 6)
    }  # fmt: skip  (2^15 is the default table's own row)
    runs = {**lawa, **sweep.lawa_question_rows(params, buffers, [], available, None)}
    for (_, kernel), (fn, settings) in runs.items():
        if "same bytes" not in kernel:  # torch's copy and neg write elsewhere
            ring.fill_(float("nan"))
            fn()
            assert settings is None and torch.equal(ring[1], torch.cat(params)), kernel
    for backend, fn in sweep.default_kernel("all", buffers, available).items():
        start = [a.clone() for a in averages]
        fn()
        expected = [a.clone() for a in averages]
        for (_, kernel), (fine, _) in sweep.table_rows("all", params, buffers, [8], available).items():
            if kernel.startswith(backend):
                for a, s in zip(averages, start):
                    a.copy_(s)
                fine()
                assert all(torch.equal(a, e) for a, e in zip(averages, expected)), kernel


def test_kernel_sweep_native_rows_set_and_restore_their_tuning():
    """On a GPU the sweep times the native kernels at each threads-per-block and unroll setting
    (unroll only where set_unroll applies), through the build's tuning hooks, and restores them."""
    sweep = _bench_script()

    tuning = FakeTuningHooks()
    lawa = sweep.native_rows("lawa", print, tuning, [256, 128], [1, 2])
    assert {k: v[1] for k, v in lawa.items()} == {
        "native T=256": (256, 1, False, 0, 0),
        "native T=256 x2": (256, 2, False, 0, 0),
        "native T=128": (128, 1, False, 0, 0),
        "native T=128 x2": (128, 2, False, 0, 0),
    }  # the persistent grid: the default table's rows over one block each are the question rows' job
    assert list(sweep.native_rows("ema", print, tuning, [128], [1, 2])) == ["native T=128"]
    assert sweep.native_rows("ema", print, None, [128], [1, 2]) == {"native": (print, None)}
    with pytest.raises(RuntimeError), native_launch.launch_settings(tuning, 128, 2):
        assert tuning.state == [128, 2, 0]
        raise RuntimeError("a failed row")
    assert tuning.state == [256, 1, 0]


def test_launch_settings_with_a_block_per_row_undo_every_setting_they_made():
    tuning = FakeTuningHooks()
    with native_launch.launch_settings(tuning, 128, 2, block_per_row=True):
        assert tuning.state == [128, 2, 1]
    assert tuning.state == [256, 1, 0]
    # A refused unroll: the threads already set are undone, the grid never touched.
    tuning.log.clear()
    with (
        pytest.raises(ValueError, match="1, 2 or 4"),
        native_launch.launch_settings(tuning, 128, 3, block_per_row=True),
    ):
        pass
    assert tuning.state == [256, 1, 0] and tuning.log == [("threads", 128), ("threads", 256)]
    assert tuning.set_block_per_row(2) == -1
    with pytest.raises(ValueError, match="0 or 1"):
        native_launch.set_block_per_row(SimpleNamespace(set_block_per_row=lambda on: -1), True)  # a refusing build


@pytest.mark.parametrize(
    "text, setting",
    [("128", (128, 1, False, 0, 0)), ("256x2", (256, 2, False, 0, 0)), ("32x1", (32, 1, False, 0, 0)),
     ("128x2/row", (128, 2, True, 0, 0)), ("64/row", (64, 1, True, 0, 0))],
)  # fmt: skip
def test_native_launch_settings_parse(text, setting):
    assert native_launch.parse_setting(text) == setting


def test_native_launch_settings_with_the_tma_change_lawa_alone_only():
    assert (
        native_launch.parse_setting("128/bulk")
        == (128, 1, False, native_launch.DEFAULT_BULK_KB, 0)
        == (128, 1, False, 8, 0)
    )
    assert native_launch.parse_setting("128x2/row/bulk32") == (128, 2, True, 32, 0)
    assert native_launch.label(*native_launch.parse_setting("128x2/bulk")) == "T=128 x2 bulk 8K"
    bulk = native_launch.Setting(128, 2, bulk=32)
    # LAWA alone's bulk kernel has no unroll; swap keeps its unroll and has no bulk kernel.
    assert native_launch.effective("lawa", bulk) == (128, 1, False, 32, 0)
    assert native_launch.effective("swap", bulk) == (128, 2, False, 0, 0)
    assert native_launch.effective("ema", bulk) == (128, 1, False, 0, 0)
    hooks = FakeTuningHooks()
    with native_launch.launch_settings(hooks, *bulk):
        assert native_launch.current_settings(hooks) == (128, 2, False, 32, 0)
    assert native_launch.current_settings(hooks) == (256, 1, False, 0, 0) and hooks.bulk == 0
    with pytest.raises(ValueError, match="4, 8, 16 or 32 KB"):
        native_launch.set_bulk_rings(hooks, 12)  # refused by the hooks, nothing changed
    assert hooks.bulk == 0


def test_native_launch_settings_with_the_drivers_copies_change_lawa_alone_only():
    """``/copy`` and ``/copyce``: LAWA alone as one cudaMemcpyBatchAsync (the second asking for the
    copy engines), whatever else the setting says; every other update keeps its kernels."""
    assert native_launch.parse_setting("128/copy") == (128, 1, False, 0, native_launch.DRIVER_COPIES)
    assert native_launch.parse_setting("128x2/row/bulk32/copyce") == (128, 2, True, 32, native_launch.DRIVER_COPIES_CE)
    assert native_launch.label(*native_launch.parse_setting("128/copy")) == "T=128 driver copies"
    assert native_launch.label(*native_launch.parse_setting("128/copyce")) == "T=128 driver copies CE"
    copies = native_launch.parse_setting("128x2/row/bulk8/copy")
    assert native_launch.effective("lawa", copies) == (128, 1, False, 0, 1)  # no kernel: no unroll, grid or TMA
    assert native_launch.effective("swap", copies) == (128, 2, True, 0, 0)
    assert native_launch.effective("ema", copies) == (128, 1, True, 0, 0)
    assert native_launch.distinct("lawa", [native_launch.parse_setting("128/copy"), copies]) == [(128, 1, False, 0, 1)]
    hooks = FakeTuningHooks()
    with native_launch.launch_settings(hooks, *native_launch.parse_setting("128/copyce")):
        assert native_launch.current_settings(hooks) == (128, 1, False, 0, 2)
    assert native_launch.current_settings(hooks) == (256, 1, False, 0, 0) and hooks.driver == 0
    with pytest.raises(ValueError, match="CUDA 13.0 or later"):
        native_launch.set_driver_copies(hooks, 3)  # refused by the hooks, nothing changed
    assert hooks.driver == 0


@pytest.mark.parametrize("driver", [0, native_launch.DRIVER_COPIES, native_launch.DRIVER_COPIES_CE])
def test_current_settings_are_read_and_left_as_they_were(driver):
    hooks = FakeTuningHooks()
    hooks.state, hooks.bulk, hooks.driver = [64, 4, 1], 16, driver
    assert native_launch.current_settings(hooks) == (64, 4, True, 16, driver)
    assert (hooks.state, hooks.bulk, hooks.driver) == ([64, 4, 1], 16, driver)


def test_launch_settings_of_threads_and_unroll_set_those_two_and_put_them_back():
    hooks = FakeTuningHooks()
    with native_launch.launch_settings(hooks, 128, 2):
        assert hooks.log == [("threads", 128), ("unroll", 2)]
    assert hooks.log[2:] == [("unroll", 1), ("threads", 256)] and hooks.state == [256, 1, 0]


def test_current_settings_of_a_build_without_the_drivers_copies():
    """A build of CUDA before 13.0 refuses every mode of set_driver_copies, 0 too: its setting reads 0."""
    hooks = FakeTuningHooks()
    hooks.set_driver_copies = lambda mode: -1
    assert native_launch.current_settings(hooks) == (256, 1, False, 0, 0)


@pytest.mark.parametrize("text", ["", "x2", "128x", "128*2", "-128", "128 x2", "twelve", "/row", "128/rows", "128x2/",
                                  "128/bulk/row", "/bulk", "128/tma", "128/bulk/bulk", "128/bulkx", "128/copy/bulk",
                                  "128/copies", "128/copyCE", "/copy"])  # fmt: skip
def test_malformed_native_launch_settings_are_refused(text):
    with pytest.raises(ValueError, match=r"THREADS\[xUNROLL\]\[/row\]"):
        native_launch.parse_setting(text)


def test_native_launch_settings_read_before_the_grid_was_one_are_on_the_persistent_grid():
    # Runs 6 and 7 recorded [threads, unroll]; the labels name the grid only where it is one block per row.
    assert native_launch.Setting(*[128, 2]) == (128, 2, False, 0, 0)
    assert native_launch.Setting(128) == (128, 1, False, 0, 0)  # threads alone: no unroll, the vector kernels
    assert native_launch.label(*native_launch.Setting(128, 2)) == "T=128 x2"
    assert (
        native_launch.label(128, 2, True) == "T=128 x2 per row" and native_launch.label(256, 1, True) == "T=256 per row"
    )


def test_native_launches_per_update_skip_the_default_and_repeats():
    settings = [(128, 1), (256, 2), (128, 2), (256, 1)]  # as recorded before the grid was a setting
    # The unroll changes LAWA alone and swap only: for EMA, 256x2 is the default and 128x2 is 128.
    assert cli.launches_for("ema", settings, (256, 1)) == [(128, 1, False, 0, 0)]
    assert cli.launches_for("all", settings, (256, 1)) == [(128, 1, False, 0, 0)]
    for update in ("lawa", "swap"):
        assert cli.launches_for(update, settings, (256, 1)) == [
            (128, 1, False, 0, 0),
            (256, 2, False, 0, 0),
            (128, 2, False, 0, 0),
        ]
    # A default that unrolls: EMA's kernels run it as T=128, so only 256 is new there.
    assert cli.launches_for("ema", settings, (128, 2)) == [(256, 1, False, 0, 0)]
    assert cli.launches_for("lawa", settings, (128, 2, False)) == [
        (128, 1, False, 0, 0),
        (256, 2, False, 0, 0),
        (256, 1, False, 0, 0),
    ]
    # One block per row changes every update's launches; its unroll, again only LAWA's and swap's.
    per_row = [(128, 2, True, 0, 0), (128, 4, True, 0, 0), (128, 4, False, 0, 0)]
    assert cli.launches_for("ema", per_row, (128, 2, False)) == [(128, 1, True, 0, 0)]
    assert cli.launches_for("lawa", per_row, (128, 2, False)) == per_row
    assert cli.launches_for("swap", per_row, (128, 2, True)) == per_row[1:]


def test_native_launch_needs_the_cuda_build(monkeypatch):
    with pytest.raises(SystemExit, match="--native-launch needs a CUDA device"):
        cli.main(["--quick", "--device", "cpu", "--native-launch", "128"])
    # On a CUDA device with the hooks: settings the kernels cannot run are refused before any timing.
    hooks = FakeTuningHooks()
    monkeypatch.setattr(native_launch, "tuning_hooks", lambda: hooks)
    cuda = torch.device("cuda")
    assert cli.resolve_native_launches(["128", "256x2", "128x2/row"], cuda, ["native"]) == [
        (128, 1, False, 0, 0), (256, 2, False, 0, 0), (128, 2, True, 0, 0)
    ]  # fmt: skip
    for bad, message in (("100/row", "multiple of 32"), ("128x3", "1, 2 or 4"), ("x", "THREADS")):
        with pytest.raises(SystemExit, match=message):
            cli.resolve_native_launches([bad], cuda, ["native"])
    assert hooks.state == [256, 1, 0]
    with pytest.raises(SystemExit, match="native backend"):
        cli.resolve_native_launches(["128"], cuda, ["triton"])


@pytest.mark.skipif(fastavg.available_backends("cpu")["native"] is not None, reason="needs the native backend")
def test_native_rows_at_other_launch_settings_set_them_around_each_call(monkeypatch):
    """--native-launch rows: the native backend with the hooks set for each timed call, then restored
    (here with a stand-in for the hooks, which only CUDA builds have)."""
    hooks = FakeTuningHooks()
    monkeypatch.setattr(native_launch, "tuning_hooks", lambda: hooks)
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in [(7, 3), (5,)]]
    case = cases.fastavg_case("lawa", params, "native", launch=native_launch.Setting(128, 2))
    assert case.impl == "fastavg-native T=128 x2" and hooks.log == []
    assert native_launch.current_settings(hooks) == (256, 1, False, 0, 0) and hooks.state == [256, 1, 0]
    hooks.log.clear()
    case.step()
    assert hooks.log == [("threads", 128), ("unroll", 2), ("unroll", 1), ("threads", 256)]
    # One block per row: set around the call too, and undone last-set-first-undone.
    case = cases.fastavg_case("ema", params, "native", launch=native_launch.Setting(128, 1, True))
    assert case.impl == "fastavg-native T=128 per row"
    hooks.log.clear()
    case.step()
    assert hooks.log == [("threads", 128), ("unroll", 1), ("block_per_row", 1), ("block_per_row", 0),
                         ("unroll", 1), ("threads", 256)]  # fmt: skip
    assert hooks.state == [256, 1, 0]
    records = cli.run_dtype("swap", torch.bfloat16, [(7, 3)], torch.device("cpu"), ["native"], 1, 0, 1.0,
                            [(128, 1), (256, 2)])  # fmt: skip
    impls = [r["impl"] for r in records]
    assert impls[:3] == ["fastavg-native", "fastavg-native T=128", "fastavg-native T=256 x2"]
    assert all(r["speedup_vs_stock"] > 0 for r in records[:3]) and hooks.state == [256, 1, 0]
    with pytest.raises(ValueError, match="native backend's CUDA build"):
        cases.fastavg_case("ema", params, "torch", launch=(128, 1))


@pytest.mark.skipif(fastavg.available_backends("cpu")["native"] is not None, reason="needs the native backend")
def test_benchmark_adds_a_row_per_native_launch_setting_that_changes_the_update(monkeypatch, tmp_path, capsys):
    hooks = FakeTuningHooks()
    monkeypatch.setattr(native_launch, "tuning_hooks", lambda: hooks)
    # The CPU has no such settings: as if resolved on a CUDA device.
    launches = [
        native_launch.Setting(128, 2),
        native_launch.Setting(256, 1, True),
        native_launch.Setting(128, 2, bulk=8),
        native_launch.Setting(128, 2, driver=native_launch.DRIVER_COPIES),
    ]
    monkeypatch.setattr(cli, "resolve_native_launches", lambda texts, device, backends: launches)
    path = tmp_path / "b.json"
    cli.main(["--quick", "--backends", "native", "--update", "ema", "lawa", "--dtype", "bf16", "--json", str(path)])
    header, *records = json.loads(path.read_text())
    assert header["native_default"] == [256, 1, False, 0, 0]
    assert header["native_launches"] == [[128, 2, False, 0, 0], [256, 1, True, 0, 0], [128, 2, False, 8, 0],
                                         [128, 2, False, 0, 1]]  # fmt: skip
    printed = capsys.readouterr().out.split("native % of copy by launch setting")[1].splitlines()
    names = [
        "T=256 (default)",
        "T=128 x2",
        "T=256 per row",
        "T=128 x2 bulk 8K",
        "T=128 x2 driver copies",
    ]  # a line per setting, the default first
    assert len(printed) == 6 and all(line.strip().startswith(name + " ") for line, name in zip(printed[1:], names))
    native = [(r["update"], r["impl"]) for r in records if r["impl"].startswith("fastavg")]
    # The bulk copies change LAWA alone only, and have no unroll: "T=128 bulk 8K"; for EMA it is T=128.
    assert native == [("ema", "fastavg-native"), ("ema", "fastavg-native T=128"),
                      ("ema", "fastavg-native T=256 per row"), ("lawa", "fastavg-native"),
                      ("lawa", "fastavg-native T=128 x2"), ("lawa", "fastavg-native T=256 per row"),
                      ("lawa", "fastavg-native T=128 bulk 8K"), ("lawa", "fastavg-native T=128 driver copies")]  # fmt: skip
    assert hooks.state == [256, 1, 0] and hooks.bulk == 0 and hooks.driver == 0


def test_native_percentages_by_setting_fill_in_the_rows_a_setting_does_not_change():
    def row(update, impl, pct):
        return {"update": update, "dtype": "bfloat16", "impl": impl, "pct_of_copy": pct}

    records = [row("ema", "fastavg-native", 90.63), row("ema", "fastavg-native T=128", 92.0),  # to one decimal
               row("ema", "fastavg-triton", 93.4), row("lawa", "fastavg-native", 88.9),
               row("lawa", "fastavg-native T=128", 89.47), row("lawa", "fastavg-native T=256 x2", 91.0),
               row("lawa", "fastavg-native T=128 x2", 91.5)]  # fmt: skip
    table = native_launch.pct_of_copy_by_setting(records, [[128, 1], [256, 2], [128, 2]], [256, 1])
    assert table == {
        "T=256 (default)": {"ema bfloat16": 90.6, "lawa bfloat16": 88.9},
        "T=128": {"ema bfloat16": 92.0, "lawa bfloat16": 89.5},
        "T=256 x2": {"ema bfloat16": 90.6, "lawa bfloat16": 91.0},  # EMA ignores the unroll
        "T=128 x2": {"ema bfloat16": 92.0, "lawa bfloat16": 91.5},
    }
    # Were the default 128x2, EMA's plain row would be its T=128 and the T=128 row its T=256.
    records_then = [dict(r, impl={"fastavg-native": "fastavg-native T=256", "fastavg-native T=128": "fastavg-native"}
                         .get(r["impl"], r["impl"])) for r in records if r["update"] == "ema"]  # fmt: skip
    then = native_launch.pct_of_copy_by_setting(records_then, [[256, 1]], [128, 2])
    assert then == {"T=128 x2 (default)": {"ema bfloat16": 92.0}, "T=256": {"ema bfloat16": 90.6}}
    printed = report.native_launch_table(table).splitlines()
    assert printed[4].split() == ["T=128", "x2", "lawa", "bfloat16", "91.5", "ema", "bfloat16", "92.0"]


def test_native_percentages_by_setting_with_one_block_per_row():
    def row(update, impl, pct):
        return {"update": update, "dtype": "bfloat16", "impl": impl, "pct_of_copy": pct}

    records = [row("ema", "fastavg-native", 94.1), row("ema", "fastavg-native T=128 per row", 94.5),
               row("lawa", "fastavg-native", 89.8), row("lawa", "fastavg-native T=128 x2 per row", 92.0),
               row("lawa", "fastavg-native T=128 x4 per row", 92.4)]  # fmt: skip
    table = native_launch.pct_of_copy_by_setting(records, [[128, 2, True], [128, 4, True]], [128, 2, False])
    assert table == {
        "T=128 x2 (default)": {"ema bfloat16": 94.1, "lawa bfloat16": 89.8},
        "T=128 x2 per row": {"ema bfloat16": 94.5, "lawa bfloat16": 92.0},
        "T=128 x4 per row": {"ema bfloat16": 94.5, "lawa bfloat16": 92.4},  # EMA ignores the unroll, not the grid
    }


def test_gpu_check_script_parses_and_summarises_a_run(tmp_path):
    """bench/gpu_check.sh runs only on a lent GPU, once per lease: a typo there costs the lease. Here:
    bash parses it, and its summary step reads a run's files (a recorded benchmark, a native launch
    setting added) into summary.json."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    script = (root / "bench" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "bench" / "gpu_check.sh")]).returncode == 0
    summary_code = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    header, *records = json.loads((root / "bench" / "results" / "2026-11-28-h200-run5.json").read_text())
    header.update(native_default=[256, 1], native_launches=[[128, 1], [256, 1, True]])  # before and after the grid
    faster = [dict(r, impl="fastavg-native T=128", pct_of_copy=r["pct_of_copy"] + 1, host_ms=0.0712) for r in records
              if r["impl"] == "fastavg-native"]  # fmt: skip
    per_row = [dict(r, impl="fastavg-native T=256 per row", pct_of_copy=r["pct_of_copy"] + 2) for r in records
               if r["impl"] == "fastavg-native"]  # fmt: skip
    (tmp_path / "bench_gpt2.json").write_text(json.dumps([header, *records, *faster, *per_row]))
    (tmp_path / "env_and_install.txt").write_text(
        "install + native build: 31 s\nstage install: 40 s\nstage 1 of the build\nstage bench: 71 s\n"
        "bulk probe: ok, 170113 elements into 1 and 2 rings by the TMA's bulk copies in 0.41 s\n"
        "driver copy probe: FAILED, invalid argument (mode 1, 1 ring(s))\n"
        "memcheck of the per-op suite's CUDA cases: exit 0\n"
    )
    sweep_lines = [
        "lawa     native T=128 x2                             0.1320     3767   90.2%",
        "lawa     native, TMA 8 KB stages, rows of 2^15       0.0100    49000 1173.0%  WRONG: the ring slot differs "
        "from the parameters",
        "lawa     native, driver's batch copy              FAILED: fastavg_native::update_: CUDA launch failed",
    ]
    (tmp_path / "step_overhead.txt").write_text("\n".join(["native  step, LAWA due     44.6 us", *sweep_lines]) + "\n")
    result = subprocess.run([sys.executable, "-c", summary_code, str(tmp_path), "0", "0"], capture_output=True,
                            text=True, cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["copy_gbps"] == header["copy_gbps"]
    assert summary["kernel_sweep"] == sweep_lines  # rows marked WRONG or FAILED too, though they end in no unit
    assert summary["step_overhead_us"] == ["native  step, LAWA due     44.6 us"]
    assert summary["bench_complete"] is None  # run 5 wrote its file once, before the flag existed
    assert summary["fastavg_pct_of_copy"]["fastavg-native lawa bfloat16"] == 88.9
    by_launch = summary["native_pct_of_copy_by_launch"]
    assert by_launch["T=256 (default)"]["lawa bfloat16"] == 88.9 and by_launch["T=128"]["lawa bfloat16"] == 89.9
    assert by_launch["T=256 per row"]["lawa bfloat16"] == 90.9
    assert summary["stage_s"] == {"install": 40, "bench": 71} and summary["build"] == ["install + native build: 31 s"]
    assert summary["bulk_probe"] == [
        "bulk probe: ok, 170113 elements into 1 and 2 rings by the TMA's bulk copies in 0.41 s",
        "driver copy probe: FAILED, invalid argument (mode 1, 1 ring(s))",
    ]
    assert summary["memcheck"] == ["memcheck of the per-op suite's CUDA cases: exit 0"]
    # Host times: the rows that have them (run 5's records predate them).
    assert summary["fastavg_host_ms"]["fastavg-native T=128 lawa bfloat16"] == 0.071
    assert "fastavg-native lawa bfloat16" not in summary["fastavg_host_ms"]
    assert "no junit report" in summary["tests"]  # what the run did not leave is said, not fatal
    (tmp_path / "bench_gpt2.json").unlink()  # a benchmark that never wrote its file
    subprocess.run([sys.executable, "-c", summary_code, str(tmp_path), "0", "0"], capture_output=True, cwd=root)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "no bench results" in summary["bench"] and "native_pct_of_copy_by_launch" not in summary


def _gpu_check_function(name: str) -> str:
    """The text of shell function ``name`` in bench/gpu_check.sh, to run alone under bash."""
    import pathlib

    script = (pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh").read_text()
    start = script.index(f"{name}() {{")
    return script[start : script.index("\n}\n", start) + 2]


@pytest.mark.parametrize(
    "elapsed, stage_limit, minimum, expected",
    [(0, 150, "", "150"), (300, 150, "", "95"), (390, 40, "40", None), (395, 90, "20", None), (380, 60, "", "15")],
)
def test_gpu_check_cuts_each_stage_to_what_is_left_of_the_call(tmp_path, elapsed, stage_limit, minimum, expected):
    """gpu_check.sh's limit(): a stage gets its own limit or what is left of CALL_S less 25 s for the
    summary, whichever is less, and is skipped (saying so, in the install log too) below its minimum
    (10 s unless given), so that a run's summary is written inside the device tool's limit."""
    import subprocess

    function = _gpu_check_function("limit")
    log = tmp_path / "log"
    code = f"log={log}; CALL_S=420; started=$(( $(date +%s) - {elapsed} ))\n{function}\nlimit a-stage {stage_limit} {minimum}"
    result = subprocess.run(["bash", "-c", code], capture_output=True, text=True)
    if expected is None:
        assert result.returncode == 1 and result.stdout == ""
        assert "a-stage skipped" in result.stderr and "a-stage skipped" in log.read_text()
    else:  # a second may pass between the two clocks
        assert result.returncode == 0 and int(expected) - 1 <= int(result.stdout) <= int(expected)


@pytest.mark.parametrize("where", ["nowhere", "path", "cuda_home", "beside nvcc"])
def test_gpu_check_finds_compute_sanitizer_or_says_there_is_none(tmp_path, where):
    """gpu_check.sh's find_sanitizer(), for the memcheck stage: compute-sanitizer on the PATH, in
    $CUDA_HOME (bin/ or the toolkit's compute-sanitizer/ folder) or beside a linked nvcc; where there
    is none it fails, and the stage says it was skipped (a missing one read as "exit 127" before)."""
    import os
    import shutil
    import subprocess

    function = _gpu_check_function("find_sanitizer")
    tools = tmp_path / "tools"  # the PATH: the two commands the function uses, and what each case adds
    tools.mkdir()
    for name in ("dirname", "readlink"):
        (tools / name).symlink_to(shutil.which(name))
    home = tmp_path / "cuda"
    env = {"PATH": str(tools), "CUDA_HOME": ""}

    def executable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return str(path)

    executable(tmp_path / "bin" / "compute-sanitizer")  # in the cwd: never a place to look
    expected = None
    if where == "path":
        expected = executable(tools / "compute-sanitizer")
    elif where == "cuda_home":
        expected, env["CUDA_HOME"] = executable(home / "compute-sanitizer" / "compute-sanitizer"), str(home)
    elif where == "beside nvcc":  # nvcc reached through a link, as /usr/local/bin/nvcc can be
        (tools / "nvcc").symlink_to(executable(home / "bin" / "nvcc"))
        expected = executable(home / "bin" / "compute-sanitizer")
    if expected is None and os.access("/usr/local/cuda/bin/compute-sanitizer", os.X_OK):
        expected = "/usr/local/cuda/bin/compute-sanitizer"  # the last place looked: a real toolkit here
    result = subprocess.run([shutil.which("bash"), "-c", f"{function}\nfind_sanitizer"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)  # fmt: skip
    if expected is None:
        assert result.returncode == 1 and result.stdout == ""
    else:
        assert result.returncode == 0 and result.stdout.strip() == expected


@pytest.mark.parametrize("argv, name", [([], "bulk probe"), (["--driver-copies"], "driver copy probe")])
def test_bulk_probe_has_nothing_to_probe_without_a_gpu(capsys, argv, name):
    """bench/bulk_probe.py (run by gpu_check.sh before anything uses the TMA's or the driver's
    copies): exit 2 and a line saying so where there is no GPU or no native CUDA build; gpu_check.sh
    then leaves them out."""
    if torch.cuda.is_available():
        pytest.skip("a GPU: the probe runs for real (gpu_check.sh)")
    assert _bench_script("bulk_probe").main(argv) == 2
    assert capsys.readouterr().out.startswith(f"{name}: nothing to probe")


def test_native_error_probe_reports_a_crash_and_what_each_error_path_raised():
    """bench/native_error_probe.py (run by gpu_check.sh) runs each error path in a child: a child
    killed by a signal is reported as a crash, not suffered, and here every fastavg._C error path
    reaches Python as an exception."""
    probe = _bench_script("native_error_probe")
    assert probe.run_child("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)") == "CRASHED (SIGSEGV)"
    assert probe.run_child("raise ValueError('x')") == "raised ValueError"
    assert probe.run_child("pass") == "returned"
    if fastavg.available_backends("cpu")["native"] is not None:
        pytest.skip("needs the native backend")
    cpu = {name: expected for name, (expected, _) in probe.FASTAVG_PROBES.items() if "on the CPU" in name}
    assert len(cpu) == 3 and set(cpu.values()) == {"raised RuntimeError", "raised ValueError"}
    assert probe.main([]) == 0  # every probe raised what it should, or needs a GPU this machine lacks
