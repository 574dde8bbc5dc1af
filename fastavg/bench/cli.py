"""fastavg-bench command line: ``fastavg-bench --help``."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import platform

import torch

import fastavg

from . import cases, native_launch, report
from .shapes import GPT2_SIZES, gpt2_shapes, parameter_shapes
from .timing import copy_bandwidth_gbps, host_ms_per_call, interleaved_median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastavg-bench",
        description="Time fastavg's fused updates against stock PyTorch paths and the copy bandwidth.",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--params", default="gpt2", choices=sorted(GPT2_SIZES), help="parameter shapes (default gpt2)")
    which.add_argument("--numel", type=int, help="one flat parameter of N elements instead")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--update", nargs="+", default=list(cases.UPDATES), choices=cases.UPDATES)
    parser.add_argument("--backends", nargs="+", choices=fastavg.ops.BACKEND_NAMES, help="default: every available one")
    parser.add_argument(
        "--native-launch",
        nargs="+",
        default=[],
        metavar="SETTING",
        help="also time the native CUDA kernels at these launch settings, "
        "THREADS[xUNROLL][/row][/bulk[KB]][/copy|/copyce] "
        "(threads per block; vectors per thread per pass, 1, 2 or 4 times one, for LAWA alone and "
        "swap; /row: one block per table row, not the persistent grid; /bulk: LAWA alone through the "
        "TMA's bulk copies, sm_90 and later, in shared-memory stages of 8 KB or KB: 4, 8, 16, 32; "
        "/copy: LAWA alone as the driver's copies, one cudaMemcpyBatchAsync, CUDA 13 builds; /copyce: "
        "the same, asking for the copy engines): e.g. 256 128x4 128x2/row 128x2/bulk32 128/copy. "
        "Rows 'fastavg-native T=128', 'fastavg-native T=128 x2 per row', 'fastavg-native T=128 bulk 32K', "
        "'fastavg-native T=128 driver copies', ...",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed samples (default 30 on GPU, 5 calls each; 10 on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 10 on GPU, 2 on CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke test")
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="instead: time a trainer preset's full step without and with EMA+SWA+LAWA every step",
    )
    parser.add_argument("--train-preset", help="for --train-step (default gpt2 on a GPU, nano on the CPU)")
    parser.add_argument("--train-batch", type=int, default=16, help="for --train-step: sequences per micro-batch")
    parser.add_argument("--train-accum", type=int, help="for --train-step: micro-batches (default 8 GPT-2, 1 nano)")
    parser.add_argument("--json", help="write the records as JSON here")
    parser.add_argument("--csv", help="write the records as CSV here")
    parser.add_argument("--plot", help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)
    check_outputs(parser, args)
    return args


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything is timed, an output the run could not write at its end."""
    for option in ("json", "csv", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        if args.train_step and option != "json":
            parser.error(f"--{option}: --train-step writes its records to --json only")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"--{option} {path}: there is no folder {folder}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")


def resolve_device(name: str) -> torch.device:
    """``--device``: auto, cpu or cuda[:N]; a clear error when it is not there. cuda:N becomes the
    current device: the timing events, ``torch.cuda._sleep`` and the copy baseline's streams are
    the current device's, so timing cuda:1 from cuda:0 would time nothing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"fastavg-bench: unknown device {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastavg-bench: device {name!r} is not available: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"fastavg-bench: device {name!r} is not supported (cpu or cuda)")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"fastavg-bench: device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def resolve_backends(requested, device: torch.device) -> list[str]:
    available = fastavg.available_backends(device)
    if requested is None:
        usable = [name for name, why in available.items() if why is None]
        # The Triton interpreter is for tests: minutes per update at benchmark sizes.
        return [b for b in usable if not (device.type == "cpu" and b == "triton")]
    for name in requested:
        if available[name] is not None:
            raise SystemExit(f"fastavg-bench: backend {name!r} is not available on {device.type}: {available[name]}")
    return list(requested)


def resolve_native_launches(texts: list[str], device: torch.device, backends: list[str]) -> list[native_launch.Setting]:
    """``--native-launch``: (threads, unroll, per row, bulk, driver) settings the CUDA build accepts; a clear
    error otherwise, before anything is timed."""
    if not texts:
        return []
    hooks = native_launch.tuning_hooks()
    if device.type != "cuda" or "native" not in backends or hooks is None:
        raise SystemExit("fastavg-bench: --native-launch needs a CUDA device and the native backend's CUDA build")
    settings = []
    for text in texts:
        try:
            setting = native_launch.parse_setting(text)
            with native_launch.launch_settings(hooks, *setting):  # the hooks refuse what the kernels cannot run
                pass
        except ValueError as err:
            raise SystemExit(f"fastavg-bench: --native-launch {text}: {err}") from None
        settings.append(setting)
    return settings


def launches_for(update: str, settings, default) -> list[native_launch.Setting]:
    """The settings that change ``update``'s native launches: each once, the default left out (the
    plain native row times it), the unroll only where it applies."""
    return [s for s in native_launch.distinct(update, settings) if s != native_launch.effective(update, default)]


def header_record(device: torch.device, label: str, shapes, copy_gbps: float) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "record": "header",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastavg": fastavg.__version__,
        "params": label,
        "tensors": len(shapes),
        "numel": sum(torch.Size(s).numel() for s in shapes),
        "copy_gbps": copy_gbps,
    }


def run_dtype(update, dtype, shapes, device, backends, repeats, warmup, copy_gbps, launches=()) -> list[dict]:
    """Every implementation of one update for one parameter dtype, as records; ``launches``: native
    CUDA launch settings (native_launch.Setting) to time beside the default."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    average_dtype = torch.float32
    numel = sum(p.numel() for p in params)
    bytes_per_element = cases.minimal_bytes_per_element(update, params[0].element_size(), 4)
    makers = [lambda b=b: cases.fastavg_case(update, params, b) for b in backends]
    makers += [lambda s=s: cases.fastavg_case(update, params, "native", launch=s) for s in launches]
    makers += [
        lambda: cases.stock_case(update, params, average_dtype),
        lambda: cases.loop_case(update, params, average_dtype),
        lambda: cases.averaged_model_case(update, params),
    ]
    built = [case for case in (make() for make in makers) if case is not None]
    with torch.no_grad():  # as in a training loop's averaging: no autograd on the parameters
        times = interleaved_median_ms([case.step for case in built], device, repeats, warmup)
        host_times = [host_ms_per_call(case.step, device, ms) for case, ms in zip(built, times)]
    records = []
    for case, ms, host_ms in zip(built, times, host_times):
        gbps = numel * bytes_per_element / (ms * 1e-3) / 1e9
        records.append({
            "update": update, "impl": case.impl, "dtype": str(dtype).replace("torch.", ""), "numel": numel,
            "median_ms": ms, "host_ms": host_ms, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_gbps,
            "bytes_per_element": bytes_per_element, "same_numerics": case.same_numerics, "note": case.note,
        })  # fmt: skip
    del built
    gc.collect()
    by_impl = {r["impl"]: r["median_ms"] for r in records}
    for r in records:
        stock, averaged_model = by_impl.get("stock-foreach"), by_impl.get("AveragedModel")
        fast = r["impl"].startswith("fastavg")
        r["speedup_vs_stock"] = stock / r["median_ms"] if fast and stock else None
        r["speedup_vs_averaged_model"] = averaged_model / r["median_ms"] if fast and averaged_model else None
    return records


def run_train_step(args, device, backends, repeats, warmup) -> None:
    """--train-step: the paper's per-GPU batch on a GPU (16 x 1024 tokens, 8 accumulation steps)."""
    from ..train.model import PRESETS
    from . import train_step

    preset = args.train_preset if args.train_preset is not None else ("gpt2" if device.type == "cuda" else "nano")
    if preset not in PRESETS:
        raise SystemExit(f"fastavg-bench: unknown --train-preset {preset!r}; expected one of {sorted(PRESETS)}")
    accum = args.train_accum if args.train_accum is not None else (1 if preset == "nano" else 8)
    if args.train_batch < 1 or accum < 1:
        raise SystemExit("fastavg-bench: --train-batch and --train-accum must be >= 1")
    records = train_step.train_step_records(preset, device, args.train_batch, accum, backends,
                                            min(repeats, 10 if device.type == "cuda" else 5), min(warmup, 3))  # fmt: skip
    print(train_step.table(records))
    if args.json:
        report.write_json(args.json, header_record(device, preset, [], 0.0), records)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    backends = resolve_backends(args.backends, device)
    if args.quick:
        label, shapes = "gpt2-tiny (--quick)", gpt2_shapes(layers=2, dim=128, vocab=1000, context=128)
    else:
        try:
            label, shapes = parameter_shapes(args.params if args.numel is None else None, args.numel)
        except ValueError as err:
            raise SystemExit(f"fastavg-bench: {err}") from None
    gpu = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (30 if gpu else 3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1 if args.quick else 2)
    if repeats < 1 or warmup < 0:
        raise SystemExit("fastavg-bench: --repeats must be >= 1 and --warmup >= 0")
    if args.train_step:
        run_train_step(args, device, backends, repeats, warmup)
        return
    settings = resolve_native_launches(args.native_launch, device, backends)
    default = native_launch.current_settings(native_launch.tuning_hooks()) if settings else None
    copy_bytes = (1 << 30) if gpu else (1 << 26 if args.quick else 1 << 28)
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, repeats, warmup)
    header = header_record(device, label, shapes, copy_gbps)
    if settings:
        header["native_default"], header["native_launches"] = list(default), [list(s) for s in settings]
    header["complete"] = False
    print(report.table_head(header), flush=True)
    records = []
    for dtype_name in args.dtype:
        for update in args.update:
            launches = launches_for(update, settings, default)
            measured = run_dtype(
                update, DTYPES[dtype_name], shapes, device, backends, repeats, warmup, copy_gbps, launches
            )
            records += measured
            # Each update's rows as soon as they exist, on screen and on disk.
            print(report.table_rows(measured), flush=True)
            if args.json:
                report.write_json(args.json, header, records)
            if gpu:
                torch.cuda.empty_cache()
    header["complete"] = True
    if settings:
        print(report.native_launch_table(native_launch.pct_of_copy_by_setting(records, settings, default)))
    if args.json:
        report.write_json(args.json, header, records)
    if args.csv:
        report.write_csv(args.csv, records)
    if args.plot:
        report.plot(args.plot, header, records)
