"""A one-line progress bar on stderr: step, loss, tokens/s, ETA (plain lines when not a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True):
        self.total, self.start, self.tokens_per_step, self.enabled = total, start, tokens_per_step, enabled
        self.began = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last_print < 30 and step != self.total:
            return  # in logs, a line every 30 s is plenty
        self.last_print = now
        done = step - self.start
        rate = done / max(now - self.began, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
                f"{rate * self.tokens_per_step:,.0f} tok/s ETA {_clock(eta)}")  # fmt: skip
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def note(self, text: str) -> None:
        """A line of its own (an evaluation), without breaking the bar."""
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
        print(text, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
