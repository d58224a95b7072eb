"""Importing TensorFlow quietly, and only where a model is loaded, converted or profiled (never on a board)."""

from __future__ import annotations

import os

from .native import native_stderr_captured


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
