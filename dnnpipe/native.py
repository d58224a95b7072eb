"""Holding back what native (C++) code writes to stderr: the interpreter's delegate banner on a board, the
converter's MLIR dumps on a workstation. Imports nothing, so a board can have it without TensorFlow."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import IO, Iterator, Optional


class _Redirect:
    """File descriptor 2 is one per process, so its redirection is too: the first block in (any thread) points
    it at a sink, the last one out points it back. Overlapping blocks in threads share the sink (each gets what
    was written while it ran), instead of restoring each other's descriptors in the wrong order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = -1
        self.sink: Optional[IO[bytes]] = None

    def enter(self) -> int:
        """Redirected (if not already); the sink's offset where this block's text starts."""
        with self.lock:
            sys.stderr.flush()
            if self.depth == 0:
                self.sink = tempfile.TemporaryFile(mode="w+b")
                self.saved = os.dup(2)
                os.dup2(self.sink.fileno(), 2)
            self.depth += 1
            assert self.sink is not None
            return os.fstat(self.sink.fileno()).st_size

    def leave(self, start: int) -> str:
        """This block's text; fd 2 restored when it was the last block open."""
        with self.lock:
            sys.stderr.flush()
            assert self.sink is not None
            sink = self.sink
            end = os.fstat(sink.fileno()).st_size
            text = os.pread(sink.fileno(), end - start, start).decode(errors="replace")
            self.depth -= 1
            if self.depth == 0:
                os.dup2(self.saved, 2)
                os.close(self.saved)
                sink.close()
                self.sink, self.saved = None, -1
            return text


_STDERR = _Redirect()  # one per process, as fd 2 is


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Hold back what C++ code writes to file descriptor 2.

    The text is yielded in a list after the block, so a caller can show it when something failed. Safe to nest
    and to use from several threads at once.
    """
    captured: list[str] = []
    start = _STDERR.enter()
    try:
        yield captured
    finally:
        captured.append(_STDERR.leave(start))
