"""Training data with no download: the Python standard library's source by default, byte-level.

- default: every ``.py`` file of the running Python's standard library (about 30 MB), bytes as
  tokens (vocabulary 256);
- ``--data FILE`` or ``--data FOLDER`` of text files: the same, byte-level;
- ``--data FOLDER`` holding nanoGPT's ``train.bin`` / ``val.bin`` (uint16 GPT-2 BPE tokens):
  vocabulary 50304, as for OpenWebText in the paper.

Text corpora are split deterministically (the last 10% of the bytes, in sorted file order, is
validation) and cached as uint8 memmaps keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from ..whole_files import written_whole

BYTE_VOCAB = 256
BPE_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT
VAL_FRACTION = 0.1


@dataclass
class Corpus:
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    vocab_size: int
    description: str


def stdlib_files() -> list[str]:
    """The standard library's .py files, sorted (site-packages and caches left out)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return found


def _text_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".")]
    return found


def _cache_key(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _build_byte_cache(files: list[str], folder: str) -> None:
    """Write train.bin / val.bin (uint8) for ``files``; atomically, so a crash leaves no half cache."""
    os.makedirs(folder, exist_ok=True)
    total = sum(os.path.getsize(f) for f in files)
    split = int(total * (1 - VAL_FRACTION))
    written = 0
    with (
        written_whole(os.path.join(folder, "train.bin"), concurrent_writers=True) as train_path,
        written_whole(os.path.join(folder, "val.bin"), concurrent_writers=True) as val_path,
        open(train_path, "wb") as train,
        open(val_path, "wb") as val,
    ):
        for f in files:
            with open(f, "rb") as src:
                data = src.read()
            head = max(0, min(len(data), split - written))
            train.write(data[:head])
            val.write(data[head:])
            written += len(data)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"files": len(files), "bytes": total, "train": split, "val": total - split}, f)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastavg")


def load_corpus(data: str | None, cache_dir: str | None = None) -> Corpus:
    """The corpus ``--data`` names (None: the standard library), as memmaps; clear errors for bad paths."""
    if data is not None and not os.path.exists(data):
        raise ValueError(f"--data {data!r} does not exist")
    if data is not None and os.path.isdir(data) and os.path.exists(os.path.join(data, "train.bin")):
        if not os.path.exists(os.path.join(data, "val.bin")):
            raise ValueError(f"--data {data!r} has train.bin but no val.bin (nanoGPT format needs both)")
        train = np.memmap(os.path.join(data, "train.bin"), dtype=np.uint16, mode="r")
        val = np.memmap(os.path.join(data, "val.bin"), dtype=np.uint16, mode="r")
        return Corpus(train, val, BPE_VOCAB, f"{data} (nanoGPT .bin, GPT-2 BPE)")
    files = stdlib_files() if data is None else _text_files(data)
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files and data is None:
        raise ValueError(
            f"the Python standard library ({sysconfig.get_paths()['stdlib']}) holds no .py files here, as in "
            "installs stripped to bytecode: give a corpus with --data FILE or --data FOLDER"
        )
    if not files:
        raise ValueError(f"--data {data!r} holds no non-empty files")
    folder = os.path.join(cache_dir or default_cache_dir(), f"bytes-{_cache_key(files)}")
    if not os.path.exists(os.path.join(folder, "meta.json")):
        _build_byte_cache(files, folder)
    train = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint8, mode="r")
    val = np.memmap(os.path.join(folder, "val.bin"), dtype=np.uint8, mode="r")
    name = "the Python standard library's source" if data is None else data
    return Corpus(train, val, BYTE_VOCAB, f"{name} ({len(files)} files, byte-level)")


def check_fits(corpus: Corpus, block_size: int) -> None:
    """Both splits must hold at least one context plus its next token."""
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than one context of {block_size} + 1: "
                "use more data or a smaller --block-size"
            )


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator):
    """``batch_size`` random windows (inputs, next-token targets) as int64 tensors on the CPU."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([tokens[s : s + block_size] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[s + 1 : s + 1 + block_size] for s in starts]).astype(np.int64))
    return x, y
