"""Importing TensorFlow quietly, and only where a model is loaded, converted or profiled."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


def import_tensorflow():
    """(tensorflow, keras), with TensorFlow's start-up chatter turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with native_stderr_captured():
        import tensorflow as tf
        import keras
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    return tf, keras


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Hold back what C++ code writes to file descriptor 2 (converter and MLIR dumps).

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
