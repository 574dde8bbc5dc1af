"""Files written whole or not at all: the trainer's checkpoint and metrics, the data cache, the
benchmark's JSON. A kill, a crash or a full disk during a write leaves the previous version."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def written_whole(path: str, *, concurrent_writers: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it over
    ``path`` (atomic on one filesystem), otherwise delete it and leave ``path`` as it was.

    The temporary name is fixed, so what a killed process left there is replaced by the next write
    (a checkpoint can be gigabytes). ``concurrent_writers``: several processes may write ``path``
    at once (ranks building one data cache), so each writes a file of its own."""
    partial = f"{path}.partial{os.getpid()}" if concurrent_writers else f"{path}.partial"
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    os.replace(partial, path)
