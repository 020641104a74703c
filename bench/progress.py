"""A one-line live progress report on stderr (redrawn with \\r on a terminal, a line every few s otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_INTERVAL_S = 0.25
LOG_INTERVAL_S = 5.0


class Progress:
    def __init__(self, label: str, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last_shown = 0.0
        self._last_done = 0
        self._last_t = self.started
        self._rate = 0.0

    def update(self, done: int, errors: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_shown < (TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S):
            return
        if now > self._last_t:
            self._rate = (done - self._last_done) / (now - self._last_t)
        self._last_done, self._last_t, self._last_shown = done, now, now
        of = f"/{self.total:,}" if self.total else ""
        elapsed = now - self.started
        line = f"{self.label}: {done:,}{of} requests  {self._rate:,.0f} req/s  errors {errors:,}  {elapsed:.1f} s"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self, done: int, errors: int) -> None:
        elapsed = time.monotonic() - self.started
        rate = done / max(elapsed, 1e-9)
        line = f"{self.label}: {done:,} requests in {elapsed:.1f} s ({rate:,.0f} req/s), errors {errors:,}"
        self.stream.write(("\r" + line + "\x1b[K\n") if self.tty else line + "\n")
        self.stream.flush()
