"""Holding back what native (C++) code writes to stderr: the interpreter's delegate banner on a board, the
converter's MLIR dumps on a workstation. Imports nothing, so a board can have it without TensorFlow."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Hold back what C++ code writes to file descriptor 2.

    The text is yielded in a list after the block, so a caller can show it when something failed.
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))
