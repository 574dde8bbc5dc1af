"""What a run leaves behind: eval lines, the summary table, the plot, the final weights."""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from ..whole_files import written_whole
from .cli import AVERAGES, checkpoint_path


def eval_line(record: dict) -> str:
    losses = "  ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in record["val_loss"].items())
    return f"step {record['step']:>6}  train {record['train_loss']:.4f}  val: {losses}"


def summary_table(records: list[dict]) -> str:
    """Validation loss per evaluation, raw and every average, the best of each row marked *."""
    names = list(records[0]["val_loss"])
    lines = [f"{'step':>7} {'tokens':>12} " + " ".join(f"{n:>9}" for n in names),
             "-" * (21 + 10 * len(names))]  # fmt: skip
    for r in records:
        values = r["val_loss"]
        best = min((v for v in values.values() if v is not None), default=None)
        cells = [("-" if v is None else f"{v:.4f}" + ("*" if v == best else " ")) for v in values.values()]
        lines.append(f"{r['step']:>7} {r['tokens']:>12,} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> bool:
    """Validation loss against step for the raw weights and each average; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in records[0]["val_loss"]:
        points = [(r["step"], r["val_loss"][name]) for r in records if r["val_loss"][name] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name, linewidth=2 if name == "raw" else 1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("raw weights vs averages, one trajectory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finish(out: str, model, opt, metrics_path: str) -> None:
    """Final weights as model state dicts (the raw ones, and each average that holds a checkpoint),
    the plot and the summary table."""
    with written_whole(os.path.join(out, "model_raw.pt")) as partial:
        torch.save(model.state_dict(), partial)
    saved, unsaved = ["model_raw.pt"], []
    for name in opt.names:
        if opt.num_averaged(name) == 0:  # averaged() would leave the raw weights, saved under its name
            unsaved.append(f"no model_{name}.pt: {name} had averaged no checkpoint by the last step")
            continue
        with opt.averaged(name), written_whole(os.path.join(out, f"model_{name}.pt")) as partial:
            torch.save(_cloned(model.state_dict()), partial)
        saved.append(f"model_{name}.pt")
    records = [json.loads(line) for line in open(metrics_path)]
    if not records:
        return
    plotted = plot(records, os.path.join(out, "val_loss.png"))
    print("\nvalidation loss (* = lowest at that step)")
    print(summary_table(records))
    final = {k: v for k, v in records[-1]["val_loss"].items() if v is not None}
    print("\nfinal: " + final_line(final))
    print(f"outputs in {out}: metrics.jsonl, {'val_loss.png, ' if plotted else ''}" + ", ".join(saved) + ", ckpt.pt")
    for line in unsaved:
        print(line)


def remove_outputs(out: str) -> None:
    """Delete what a run leaves in ``out`` but its metrics (which a fresh start empties): a
    --resume after a crash before the first evaluation would otherwise continue the earlier run's
    checkpoint, and its weights and plot would pass for the new run's."""
    names = ["val_loss.png", "model_raw.pt", *(f"model_{n}.pt" for n in AVERAGES)]
    for path in [checkpoint_path(out), *(os.path.join(out, name) for name in names)]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _cloned(state: dict) -> dict:
    """``state`` with its tensors cloned (the averages leave the parameters on exit), tied ones once:
    the tied embedding stays one tensor in the file, as in model_raw.pt, not two copies."""
    clones, cloned = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if key not in clones:
            clones[key] = v.clone()
        cloned[k] = clones[key]
    return cloned


def final_line(final: dict[str, float]) -> str:
    """Which weights reached the lowest validation loss, and their margin over the nearest rival."""
    best = min(final, key=final.get)
    line = f"lowest validation loss {final[best]:.4f} by {best}"
    if best != "raw":
        return line + f", {final['raw'] - final[best]:.4f} below the raw weights' {final['raw']:.4f}"
    averages = {k: v for k, v in final.items() if k != "raw"}
    if not averages:
        return line
    nearest = min(averages, key=averages.get)
    return line + f"; the nearest average, {nearest}, {averages[nearest]:.4f}"


def check_identical_averages(opt, world: int, rank: int) -> None:
    """Every rank holds the same averages (DDP keeps parameters equal; averaging is deterministic)."""
    digests = []
    for name in opt.names:
        digests += [float(t.double().sum()) + float(t.double().abs().sum()) for t in opt.averaged_params(name)]
    gathered = [None] * world
    dist.all_gather_object(gathered, digests)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError("fastavg-train: the averages differ between ranks")
    if rank == 0:
        print(f"averages identical on all {world} ranks")
