"""What native code writes to stderr is held back during the block and handed over after it."""

import os
import sys

from dnnpipe.native import native_stderr_captured


def test_native_stderr_is_captured_and_restored(capfd):
    with native_stderr_captured() as log:
        os.write(2, b"Created TensorFlow Lite XNNPACK delegate\n")
    assert log == ["Created TensorFlow Lite XNNPACK delegate\n"]
    os.write(2, b"after\n")
    sys.stderr.flush()
    assert capfd.readouterr().err == "after\n"
