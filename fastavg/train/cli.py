"""fastavg-train's command line: every option checked before any work starts."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..ops import BACKEND_NAMES
from .model import HIGH_LR, PRESETS, STANDARD_LR

AVERAGES = ("ema", "swa", "lawa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastavg-train",
        description="Train a GPT-2 (nanoGPT style) and compare the raw weights with EMA, SWA and LAWA "
        "kept along the same trajectory (Sanyal et al. 2023's recipe by default).",
    )
    p.add_argument("--preset", default="nano", help=f"model size: {', '.join(PRESETS)} (default nano, for CPUs)")
    p.add_argument("--data", help="a text file, a folder of text files, or a folder with nanoGPT train.bin/val.bin "
                   "(default: the Python standard library's source, byte-level)")  # fmt: skip
    p.add_argument("--out", default="runs/fastavg-train", help="output folder (metrics, plot, weights, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds an earlier run, replacing its checkpoint and outputs")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000 nano, 600000 GPT-2 sizes)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default 16)")
    p.add_argument("--block-size", type=int, default=None, help="context length (default: the preset's)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1 nano, 8 GPT-2)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the paper's high one)")
    p.add_argument("--standard-lr", action="store_true", help="use the standard learning rate (10x lower) instead")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 100 nano, 2000 GPT-2)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on 2-D weights")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations (default 100 nano, 1000)")
    p.add_argument(
        "--eval-batches", type=int, default=None, help="held-out batches per evaluation (default 10 nano, 40)"
    )
    p.add_argument("--averages", nargs="+", default=list(AVERAGES), help="which of ema swa lawa to keep")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="default 1 - 1/(lawa-window x lawa-every): EMA spans as many steps as LAWA's window")  # fmt: skip
    p.add_argument("--lawa-window", type=int, default=5, help="LAWA: checkpoints averaged (k)")
    p.add_argument(
        "--lawa-every", type=int, default=None, help="LAWA/SWA: steps between checkpoints (default: the eval interval)"
    )
    p.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES), help="fastavg backend")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--cache-dir", help="where the byte-level corpus is cached (default ~/.cache/fastavg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        fill_defaults_and_check(args)
    except ValueError as err:
        p.error(str(err))
    return args


def fill_defaults_and_check(args: argparse.Namespace) -> None:
    """Defaults that depend on the preset, then every check that needs no data (ValueError)."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    nano = args.preset == "nano"
    # nano: about 4.5 minutes on 2 CPU cores (14,000 tokens/s measured); GPT-2 sizes: the paper's per-GPU
    # batch (16 x 1024 tokens, 8 accumulation steps) and nanoGPT's schedule.
    defaults = dict(steps=2000 if nano else 600_000, batch_size=16, grad_accum=1 if nano else 8,
                    warmup=100 if nano else 2000, eval_interval=100 if nano else 1000,
                    eval_batches=10 if nano else 40)  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = (STANDARD_LR if args.standard_lr else HIGH_LR)[args.preset]
    elif args.standard_lr:
        raise ValueError("--lr and --standard-lr together: give one")
    if args.lawa_every is None:
        args.lawa_every = args.eval_interval
    unknown = [a for a in args.averages if a not in AVERAGES]
    if unknown:
        raise ValueError(f"unknown average(s) {unknown}; expected some of {list(AVERAGES)}")
    if len(set(args.averages)) != len(args.averages):
        raise ValueError(f"--averages lists a name twice: {args.averages}")
    for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "lawa_window", "lawa_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.ema_decay is None:  # after the checks above: it divides by the window and the interval
        # A rule fixed before any result: EMA's horizon 1/(1-d) equals the steps LAWA's window spans.
        args.ema_decay = 1 - 1 / (args.lawa_window * args.lawa_every)
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    if args.block_size is not None and args.block_size > PRESETS[args.preset]["block_size"]:
        raise ValueError(f"--block-size {args.block_size} is longer than {args.preset}'s context")
    # Each test holds for the allowed values only, so NaN fails every one.
    for name, allowed, rule in (("warmup", args.warmup >= 0, ">= 0"), ("lr", 0 < args.lr < float("inf"), "> 0 and finite"),
                                ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
                                ("weight_decay", args.weight_decay >= 0, ">= 0"), ("clip", args.clip >= 0, ">= 0")):  # fmt: skip
        if not allowed:
            raise ValueError(f"{_flag(name)} must be {rule}, got {getattr(args, name)}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.device != "auto":
        try:
            device_type = torch.device(args.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.data is not None and not os.path.exists(args.data):
        raise ValueError(f"--data {args.data!r} does not exist")
    check_out_can_be_a_folder(args.out)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite together: give one")
    if args.resume:
        check_resume(args)
    elif not args.overwrite:
        check_no_earlier_run(args)


def _flag(name: str) -> str:
    """The command-line option of an ``args`` attribute: ``lawa_window`` -> ``--lawa-window``."""
    return "--" + name.replace("_", "-")


# What a checkpoint's tensors are shaped by: a resume with another value could not load it.
RESUME_MUST_MATCH = ("preset", "block_size", "averages", "lawa_window")
# How a run is carried out, not what it computes: free to change on resume.
RESUME_FREE = ("out", "resume", "overwrite", "no_progress", "cache_dir", "backend", "device", "compile")


def check_resume(args: argparse.Namespace) -> None:
    """Refuse a resume whose options cannot load OUT/ckpt.pt (ValueError naming each); warn of
    every other option that differs from the checkpoint's, since it changes the rest of the run."""
    path = checkpoint_path(args.out)
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        saved = _read_checkpoint(path)["args"]
    except Exception as err:  # a truncated or foreign file: say so before anything is overwritten
        raise ValueError(f"--resume: cannot read {path} as a fastavg-train checkpoint ({err})") from None

    def comparable(options: dict, name: str):
        value = options.get(name)
        if name == "block_size" and value is None:
            value = PRESETS[options.get("preset", "nano")]["block_size"]
        return sorted(value) if name == "averages" else value

    def differs(name: str) -> bool:
        return comparable(saved, name) != comparable(vars(args), name)

    clashes = [f"{_flag(n)} {comparable(saved, n)} (now {comparable(vars(args), n)})"
               for n in RESUME_MUST_MATCH if differs(n)]  # fmt: skip
    if clashes:
        raise ValueError(f"--resume: {path} was made with " + ", ".join(clashes) + "; give the same to resume it")
    changed = [f"{_flag(n)} {saved[n]} -> {getattr(args, n)}"
               for n in saved if n in vars(args) and n not in RESUME_FREE + RESUME_MUST_MATCH and differs(n)]  # fmt: skip
    if changed:
        print(f"fastavg-train: warning: resuming with options other than the checkpoint's: {', '.join(changed)}",
              file=sys.stderr)  # fmt: skip


def check_out_can_be_a_folder(out: str) -> None:
    """Refuse an --out that is a file or lies under one (ValueError), without making it: the run
    makes it once the data is loaded, and a run refused before then leaves nothing behind."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        under = "" if path == os.path.abspath(out) else f" lies under {path}, which"
        raise ValueError(f"--out {out}{under} is a file, not a folder")


def check_no_earlier_run(args: argparse.Namespace) -> None:
    """Refuse a fresh start in an OUT that holds a checkpoint (ValueError): the run would empty its
    metrics at once and replace its checkpoint at the first evaluation, so a forgotten --resume
    would lose it."""
    path = checkpoint_path(args.out)
    if not os.path.exists(path):
        return
    try:
        saved = _read_checkpoint(path)
        what = f"its checkpoint is at step {saved['step']:,} of {saved['args']['steps']:,}"
    except Exception:  # unreadable here is still someone's file: refuse all the same
        what = "its ckpt.pt is not a checkpoint fastavg-train can read"
    raise ValueError(f"--out {args.out} holds an earlier run ({what}): --resume continues it, --overwrite "
                     "starts afresh and replaces it, or give another --out")  # fmt: skip


def checkpoint_path(out: str) -> str:
    """Where a run in ``out`` keeps its checkpoint: what --resume reads and a fresh start would replace."""
    return os.path.join(out, "ckpt.pt")


def _read_checkpoint(path: str) -> dict:
    """A checkpoint's entries, mmapped: only its options and step are read here, not its weights."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def main(argv=None) -> None:
    from .loop import train

    train(parse_args(argv))
