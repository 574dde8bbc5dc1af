"""The training loop: one trajectory, the raw weights and every average evaluated on the same batches."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os

import torch
import torch.distributed as dist

import fastavg

from ..whole_files import written_whole
from . import report
from .cli import checkpoint_path
from .data import check_fits, get_batch, load_corpus
from .model import GPT, config_for
from .progress import Progress


def lr_at(step: int, args) -> float:
    """Linear warm-up to ``args.lr``, then cosine decay to ``args.lr * min_lr_ratio`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - min_lr)


def average_specs(args) -> dict:
    """The averages the paper compares, all on one trajectory."""
    specs = {
        "ema": fastavg.EMA(decay=args.ema_decay),
        # SWA: the uniform mean of every checkpoint; LAWA: of the latest `window` of them.
        "swa": fastavg.SWA(every=args.lawa_every),
        "lawa": fastavg.LAWA(window=args.lawa_window, every=args.lawa_every),
    }
    return {name: specs[name] for name in args.averages}


def _setup_distributed(args):
    """(rank, world size, device) for torchrun (DDP: nccl on CUDA, gloo on the CPU) or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"fastavg-train: --device {wanted} but torch sees no CUDA device")
    index = torch.device(wanted).index
    if index is not None and index >= torch.cuda.device_count():
        raise SystemExit(f"fastavg-train: --device {wanted} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if world == 1:
        if index is not None:  # the current device too, as for DDP below: one device per process
            torch.cuda.set_device(index)
        return 0, 1, torch.device(wanted)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


@torch.no_grad()
def evaluate(model, batches, device, autocast, rank, world) -> float:
    """Mean loss over the held-out batches (split across ranks, then all-reduced)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches[rank::world]:
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _rng_state(device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def train(args) -> dict:
    """Run ``fastavg-train``; returns the last evaluation's record."""
    rank, world, device = _setup_distributed(args)
    unavailable = args.backend != "auto" and fastavg.available_backends(device)[args.backend]
    if unavailable:
        raise SystemExit(f"fastavg-train: --backend {args.backend} cannot run on {device}: {unavailable}")
    try:
        corpus = load_corpus(args.data, args.cache_dir)
        config = config_for(args.preset, corpus.vocab_size, args.block_size)
        check_fits(corpus, config.block_size)
    except ValueError as err:
        raise SystemExit(f"fastavg-train: {err}") from None
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    fused = device.type == "cuda"
    inner = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95), fused=fused)
    opt = fastavg.wrap(inner, average_specs(args), backend=args.backend)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if fused else None)
    if args.compile:
        net = torch.compile(net)
    # bf16 autocast on CUDA (no loss scaling needed); full float32 on the CPU.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if fused else contextlib.nullcontext
    generator = torch.Generator().manual_seed(args.seed + rank)  # each rank its own batches
    eval_batches = [get_batch(corpus.val, args.batch_size, config.block_size, torch.Generator().manual_seed(10_000 + i))
                    for i in range(args.eval_batches)]  # fmt: skip
    tokens_per_step = args.batch_size * config.block_size * args.grad_accum * world
    try:  # the options' check saw no file in the way; what else fails here (permissions) is said plainly
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"fastavg-train: --out {args.out}: cannot make the output folder ({err.strerror})") from None
    metrics_path, ckpt_path = os.path.join(args.out, "metrics.jsonl"), checkpoint_path(args.out)
    start = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["data_generator"][rank])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start = ckpt["step"]
        if rank == 0:  # keep the evaluations up to the checkpoint, drop any made after it
            kept = []
            if os.path.exists(metrics_path):
                kept = [line for line in open(metrics_path) if json.loads(line)["step"] <= start]
            with written_whole(metrics_path) as partial, open(partial, "w") as f:  # a full disk keeps the old file
                f.writelines(kept)
    elif rank == 0:  # a fresh start: nothing of an earlier run here (--overwrite) may outlive its metrics
        report.remove_outputs(args.out)
        open(metrics_path, "w").close()
    if rank == 0:
        print(f"fastavg-train: {args.preset} ({model.num_params() / 1e6:.2f}M parameters) on {device} x{world}, "
              f"{corpus.description}, lr {args.lr:g}, averages {opt.names} ({opt.averager.backends[0]} backend)")  # fmt: skip
    progress = Progress(args.steps, start, tokens_per_step, enabled=rank == 0 and not args.no_progress)
    record = None
    for step in range(start, args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        train_loss = 0.0
        for micro in range(args.grad_accum):
            x, y = get_batch(corpus.train, args.batch_size, config.block_size, generator)
            last = micro == args.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else net.no_sync()
            with sync, autocast():
                _, loss = net(x.to(device), y.to(device))
            (loss / args.grad_accum).backward()
            train_loss += loss.item() / args.grad_accum
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.update(step + 1, train_loss)
        done = step + 1
        if done % args.eval_interval == 0 or done == args.steps:
            val = {"raw": evaluate(net, eval_batches, device, autocast, rank, world)}
            for name in opt.names:
                if opt.num_averaged(name) == 0:
                    val[name] = None  # no checkpoint averaged yet
                    continue
                with opt.averaged(name):
                    val[name] = evaluate(net, eval_batches, device, autocast, rank, world)
            record = {
                "step": done,
                "tokens": done * tokens_per_step,
                "lr": lr,
                "train_loss": train_loss,
                "val_loss": val,
            }
            gathered = _gather_generator_states(generator, world)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.note(report.eval_line(record))
                with written_whole(ckpt_path) as partial:  # a crash mid-save keeps the last good checkpoint
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                                "data_generator": gathered, "rng": _rng_state(device), "args": vars(args)},
                               partial)  # fmt: skip
    progress.close()
    if world > 1:
        report.check_identical_averages(opt, world, rank)
    if rank == 0:
        report.finish(args.out, model, opt, metrics_path)
    if world > 1:
        del net  # DDP first: see _destroy_process_group
        _destroy_process_group()
    return record


def _destroy_process_group() -> None:
    """Destroy the process group once DDP is gone (the caller dropped it: its reducer holds the
    process group too).

    Whichever owner lets go last runs ProcessGroupGloo's destructor, which joins the gloo worker
    threads. A worker may still be freeing the last collective's work, and its tensors' decref takes
    the GIL. The reducer's binding keeps the GIL while it is destroyed, so that join could wait
    forever. The process group's own binding releases the GIL first, so it must be the last owner
    (torch issue 56297). tests/test_train.py's 2-process CPU run, 4 at once on 2 cores: 3 of 24 hung
    at exit before, none of 48 since.
    """
    gc.collect()  # DDP in a reference cycle would otherwise die later, holding the process group
    dist.destroy_process_group()


def _gather_generator_states(generator, world) -> list:
    """Every rank's data-generator state (rank 0 saves them all, so each rank resumes its own stream)."""
    if world == 1:
        return [generator.get_state()]
    states = [None] * world
    dist.all_gather_object(states, generator.get_state())
    return states
