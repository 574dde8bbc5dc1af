"""Files written whole or not at all: the trainer's checkpoint and metrics, the data cache, the
benchmark's JSON. A kill, a crash or a full disk during a write leaves the previous version."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def written_whole(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it over
    ``path`` (atomic on one filesystem), otherwise delete it and leave ``path`` as it was."""
    partial = f"{path}.partial{os.getpid()}"  # per process: two writers never share one
    try:
        yield partial
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    os.replace(partial, path)
