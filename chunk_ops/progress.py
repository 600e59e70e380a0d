"""Progress of long steps, on stderr: a bar on a terminal, timestamped lines elsewhere.

On a terminal, tqdm draws a bar with the rate and the ETA.  In a log (Airflow task
logs, a pipe, CI) a bar's carriage returns are noise, so the same progress comes
as plain lines, at the start, at most every ``every_s`` seconds, and at the end::

    2026-12-01T03:55:12Z stage 1: 10/75 chunks (13%), 2.1 chunks/s, ETA 31 s

stdout stays for results: nothing here writes to it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts work done of ``total``; use as a context manager, call :meth:`update` or :meth:`set`."""

    def __init__(self, total: int, desc: str, *, unit: str = "chunks", initial: int = 0,
                 stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._started = time.perf_counter()
        self._initial = initial
        self._last_line = 0.0
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)
        else:
            self._line()

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """The count now (e.g. done markers polled); never goes back."""
        if done <= self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self._bar is None and time.perf_counter() - self._last_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last_line = time.perf_counter()
        elapsed = self._last_line - self._started
        text = f"{timestamp()} {self.desc}: {self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            text += f", {rate:.2f} {self.unit}/s"
            if self.done < self.total:
                text += f", ETA {duration_text((self.total - self.done) / rate)}"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def event(message: str, stream: TextIO | None = None) -> None:
    """One timestamped line of chatter on stderr."""
    print(f"{timestamp()} {message}", file=stream or sys.stderr, flush=True)
