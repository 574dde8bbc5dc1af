"""Regenerate the README's performance table from every recorded run in bench/results/*.json.

python bench/make_table.py            # rewrites the block between the markers in README.md
python bench/make_table.py --check    # exits 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def table_for(path: str) -> str:
    with open(path) as f:
        header, *records = json.load(f)
    lines = [
        f"**{header['device_name']}** ({header['date']}; torch {header['torch']}, triton {header['triton']}, "
        f"CUDA {header['cuda']}; {header['params']}: {header['tensors']} tensors, {header['numel']:,} elements; "
        f"measured copy {header['copy_gbps']:.0f} GB/s). Source: `{os.path.relpath(path, ROOT)}`"
        + ("; **stopped part way**: the rows below are what it measured" if header.get("complete") is False else ""),
        "",
        "| update | params | impl | ms | GB/s | % of copy | vs stock | vs AveragedModel |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        impl = r["impl"] + ("" if r["same_numerics"] else " (bf16 averages)")
        lines.append(
            f"| {r['update']} | {r['dtype']} | {impl} | {r['median_ms']:.3f} | {r['gbps']:.1f} | {r['pct_of_copy']:.0f}% | "
            f"{_cell(r['speedup_vs_stock'], '.2f')} | {_cell(r['speedup_vs_averaged_model'], '.2f')} |"
        )
    return "\n".join(lines)


def render() -> str:
    """The newest run of each device in full; earlier runs of that device by file name only."""
    paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))
    paths = [p for p in paths if _is_bench(p)]
    if not paths:
        return "No benchmark run recorded yet."
    by_device: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        with open(path) as f:
            header = json.load(f)[0]
        by_device.setdefault(header["device_name"], []).append((header["date"], path))
    blocks = []
    for runs in by_device.values():
        runs.sort()
        block = table_for(runs[-1][1])
        if len(runs) > 1:
            earlier = ", ".join(f"`{os.path.relpath(path, ROOT)}`" for _, path in runs[:-1])
            block += f"\n\nEarlier runs on this device: {earlier}."
        blocks.append(block)
    return "\n\n".join(blocks)


def _is_bench(path: str) -> bool:
    with open(path) as f:
        data = json.load(f)
    # Kernel benchmark runs only (a --train-step run has no per-update rows).
    return isinstance(data, list) and len(data) > 1 and data[0].get("record") == "header" and "update" in data[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme_path = os.path.join(ROOT, "README.md")
    readme = open(readme_path).read()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{render()}\n{END}{tail}"
    if args.check:
        raise SystemExit(
            0 if updated == readme else "README.md's bench table is out of date: run python bench/make_table.py"
        )
    with open(readme_path, "w") as f:
        f.write(updated)


if __name__ == "__main__":
    main()
