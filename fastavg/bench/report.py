"""The benchmark's outputs: a terminal table, JSON, CSV and a bar chart."""

from __future__ import annotations

import csv
import json

from ..whole_files import written_whole

FIELDS = ["update", "impl", "dtype", "numel", "median_ms", "host_ms", "gbps", "pct_of_copy", "speedup_vs_stock",
          "speedup_vs_averaged_model", "bytes_per_element", "same_numerics", "note"]  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_head(header: dict) -> str:
    """The table's first lines: the device and the copy bandwidth, then the column names."""
    return "\n".join([
        f"{header['device_name']} | torch {header['torch']} | triton {header['triton']} | "
        f"{header['params']} ({header['tensors']} tensors, {header['numel']:,} elements) | "
        f"copy {header['copy_gbps']:.1f} GB/s",
        f"{'update':6} {'impl':23} {'dtype':9} {'ms':>9} {'host ms':>8} {'GB/s':>8} {'%copy':>6} {'vs stock':>8} {'vs AvgM':>8}  note",
    ])  # fmt: skip


def table_rows(records: list[dict]) -> str:
    """One table line per record (under table_head)."""
    lines = []
    for r in records:
        note = r["note"] + ("" if r["same_numerics"] else " [other numerics]")
        lines.append(
            f"{r['update']:6} {r['impl']:23} {r['dtype']:9} {r['median_ms']:9.3f} {_fmt(r['host_ms'], '8.3f'):>8} "
            f"{r['gbps']:8.1f} {r['pct_of_copy']:6.1f} {_fmt(r['speedup_vs_stock'], '8.2f'):>8} "
            f"{_fmt(r['speedup_vs_averaged_model'], '8.2f'):>8}  {note}"
        )
    return "\n".join(lines)


def native_launch_table(by_setting: dict[str, dict[str, float]]) -> str:
    """Native's % of copy at each launch setting (native_launch.pct_of_copy_by_setting), one line per
    setting, its worst row first."""
    lines = ["native % of copy by launch setting (worst first):"]
    for name, pcts in by_setting.items():
        cells = "  ".join(f"{row} {pct:.1f}" for row, pct in sorted(pcts.items(), key=lambda item: item[1]))
        lines.append(f"  {name:14} {cells}")
    return "\n".join(lines)


def write_json(path: str, header: dict, records: list[dict]) -> None:
    """A list: one header record (device, versions, copy bandwidth) then one record per measurement.
    The benchmark rewrites it after each update it times, its header's "complete" false until the
    last: a run stopped part way (a time limit on a lent GPU) keeps what it measured."""
    with written_whole(path) as partial, open(partial, "w") as f:  # the limit may stop the run mid-write
        json.dump([header, *records], f, indent=1)


def write_csv(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in FIELDS} for r in records)


def plot(path: str, header: dict, records: list[dict]) -> None:
    """Bars of % of copy bandwidth per update and implementation, one panel per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"--plot needs matplotlib ({err}); pip install matplotlib") from err
    dtypes = sorted({r["dtype"] for r in records})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in records if r["dtype"] == dtype]
        updates = list(dict.fromkeys(r["update"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for u, update in enumerate(updates):
                match = [r for r in rows if r["update"] == update and r["impl"] == impl]
                if match:
                    xs.append(u + i * width)
                    ys.append(match[0]["pct_of_copy"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([u + 0.4 - width / 2 for u in range(len(updates))], updates)
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_title(f"{dtype} params, {header['params']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"fastavg-bench on {header['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every figure until closed: a caller that plots again would pile them up
