"""A small real run on the CPU: a byte-level MLP language model trained on the Python standard
library's source at a high learning rate, comparing the raw weights with EMA, SWA and LAWA.

    python -m fastavg.example [--steps 1000] [--lr 3e-3] [--seed 0]

It stands in as the README's main job until the GPT-2 trainer lands.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import fastavg


def load_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The standard library's .py files (sorted, so every machine reads the same order) as bytes."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and total < max_bytes:
            with open(os.path.join(root, name), "rb") as f:
                chunks.append(f.read())
            total += len(chunks[-1])
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteMLP(torch.nn.Module):
    """Predicts the next byte from the previous ``context`` bytes."""

    def __init__(self, context: int = 16, dim: int = 32, hidden: int = 512):
        super().__init__()
        self.embed = torch.nn.Embedding(256, dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(context * dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 256)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))


def batch(data: torch.Tensor, context: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(data) - context - 1, (size,), generator=generator)
    index = start[:, None] + torch.arange(context + 1)
    window = data[index]
    return window[:, :-1], window[:, -1]


@torch.no_grad()
def evaluate(model, batches) -> float:
    return sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (high on purpose)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.batch < 1:
        parser.error("--steps, --eval-every and --batch must be >= 1")

    torch.manual_seed(args.seed)
    data = load_corpus()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    context = 16
    model = ByteMLP(context)
    averages = {
        "ema": fastavg.EMA(decay=0.99),
        "swa": fastavg.SWA(start=args.steps // 2),
        "lawa": fastavg.LAWA(window=5, every=max(1, args.eval_every // 5)),
    }
    opt = fastavg.wrap(torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1), averages)
    gen = torch.Generator().manual_seed(args.seed)
    val_batches = [batch(val, context, 512, torch.Generator().manual_seed(1000 + i)) for i in range(8)]

    print(
        f"fastavg {fastavg.__version__} example: byte MLP, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data):,} bytes of stdlib source, lr {args.lr}, backend {opt.averager.backends[0]}"
    )
    header = f"{'step':>6} {'train':>7} {'raw':>7} " + " ".join(f"{n:>7}" for n in opt.names)
    print(header)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(train, context, args.batch, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"raw": evaluate(model, val_batches)}
            for name in opt.names:
                with opt.averaged(name):
                    row[name] = evaluate(model, val_batches)
            cells = " ".join(f"{row[n]:7.4f}" if opt.num_averaged(n) else f"{'-':>7}" for n in opt.names)
            print(f"{step:6d} {loss.item():7.4f} {row['raw']:7.4f} {cells}")
    best = min(row, key=row.get)
    print(f"done in {time.perf_counter() - start:.1f}s; lowest final validation loss: {best} ({row[best]:.4f})")


if __name__ == "__main__":
    main()
