"""--train-step: a trainer preset's full step (forward, backward, AdamW) without averaging and with
EMA + SWA + LAWA updated every step; the difference is what averaging costs a training run."""

from __future__ import annotations

import contextlib

import torch

import fastavg

from ..train.model import GPT, config_for
from .timing import median_ms


def _step_fn(model, opt, batches, device):
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )

    def step():
        for x, y in batches:
            with autocast():
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_records(preset: str, device: torch.device, batch_size: int, grad_accum: int, backends: list[str],
                       repeats: int, warmup: int) -> list[dict]:  # fmt: skip
    """Median step time of plain AdamW and of AdamW wrapped with EMA+SWA+LAWA (every step) per backend."""
    vocab = 256 if preset == "nano" else 50304
    config = config_for(preset, vocab)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        tuple(torch.randint(vocab, (batch_size, config.block_size), generator=g).to(device) for _ in range(2))
        for _ in range(grad_accum)
    ]
    fused = device.type == "cuda"
    inner = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    every_step = {"ema": fastavg.EMA(0.999), "swa": fastavg.SWA(), "lawa": fastavg.LAWA(5, every=1)}
    base_ms = median_ms(_step_fn(model, inner, batches, device), device, repeats, warmup, calls=1)
    tokens = batch_size * config.block_size * grad_accum
    common = {"record": "train_step", "preset": preset, "numel": model.num_params(), "tokens_per_step": tokens,
              "batch_size": batch_size, "grad_accum": grad_accum}  # fmt: skip
    records = [{**common, "impl": "adamw", "median_ms": base_ms, "overhead_pct": 0.0}]
    for backend in backends:
        opt = fastavg.wrap(inner, every_step, backend=backend)
        ms = median_ms(_step_fn(model, opt, batches, device), device, repeats, warmup, calls=1)
        records.append({**common, "impl": f"adamw+fastavg-{backend} (ema+swa+lawa)", "median_ms": ms,
                        "overhead_pct": 100 * (ms - base_ms) / base_ms})  # fmt: skip
        del opt
    return records


def table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [f"train step: {r0['preset']} ({r0['numel'] / 1e6:.1f}M params), {r0['batch_size']} x "
             f"{r0['tokens_per_step'] // (r0['batch_size'] * r0['grad_accum'])} tokens x {r0['grad_accum']} accumulation",
             f"{'impl':42} {'ms':>10} {'overhead':>9}"]  # fmt: skip
    lines += [f"{r['impl']:42} {r['median_ms']:10.1f} {r['overhead_pct']:8.2f}%" for r in records]
    return "\n".join(lines)
