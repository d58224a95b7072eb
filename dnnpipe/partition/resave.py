"""Child process of load.py: tf_keras reads a tf.keras SavedModel folder or .keras file and writes it as H5.

Run apart so that tf_keras (Keras 2) and Keras 3 never share a process.
"""

from __future__ import annotations

import os
import sys


def main(source: str, target: str) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_keras

    model = tf_keras.models.load_model(source, compile=False)
    model.save(target, save_format="h5")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
