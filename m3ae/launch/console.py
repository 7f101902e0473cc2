"""The launcher's console: one progress bar, with every other line written above it.

Ray forwards each host actor's output to the driver's `sys.stdout` / `sys.stderr` from a thread
of its own; printed as they come, those lines land in the middle of the bar's line. While
`above_the_bar(bar)` is active, both streams are replaced by writers that hold a partial line
until its newline, then clear the bar, write the whole lines to the real stream and draw the bar
again, under tqdm's lock. A disabled bar (no progress, or not wanted) changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO


class AboveTheBar(io.TextIOBase):
    """A text stream that writes complete lines to `target` above `bar`."""

    def __init__(self, target: TextIO, bar: Any):
        self.target, self.bar = target, bar
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            head, newline, tail = (self._partial + text).rpartition("\n")
            self._partial = tail
            if newline:
                self._emit(head + newline)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._emit(self._partial + "\n")
                self._partial = ""
            self.target.flush()

    def _emit(self, lines: str) -> None:
        with self.bar.get_lock():
            self.bar.clear(nolock=True)
            self.target.write(lines)
            self.target.flush()
            self.bar.refresh(nolock=True)

    def isatty(self) -> bool:
        return self.target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.target.fileno()


@contextlib.contextmanager
def above_the_bar(bar: Any) -> Iterator[None]:
    """Route `sys.stdout` / `sys.stderr` above `bar` while the block runs."""
    if getattr(bar, "disable", True):
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = AboveTheBar(saved[0], bar), AboveTheBar(saved[1], bar)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
