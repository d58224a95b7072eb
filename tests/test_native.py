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


def test_overlapping_blocks_in_threads_restore_stderr(capfd):
    """Block a opens, b opens, a closes, b closes: fd 2 must end where it began (it was left on a's file)."""
    import threading

    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    logs = {}

    def a():
        with native_stderr_captured() as log:
            a_open.set()
            b_open.wait(10)
            os.write(2, b"from a\n")
        logs["a"] = log
        a_closed.set()

    def b():
        a_open.wait(10)
        with native_stderr_captured() as log:
            b_open.set()
            a_closed.wait(10)
            os.write(2, b"from b\n")
        logs["b"] = log

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert "from a\n" in logs["a"][0] and "from b\n" in logs["b"][0]
    os.write(2, b"after\n")
    sys.stderr.flush()
    assert capfd.readouterr().err == "after\n"


def test_nested_blocks_each_get_their_text(capfd):
    with native_stderr_captured() as outer:
        os.write(2, b"one\n")
        with native_stderr_captured() as inner:
            os.write(2, b"two\n")
    assert inner == ["two\n"] and outer == ["one\ntwo\n"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
