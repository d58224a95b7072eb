"""runtime/heap.py: pages faulted in ahead serve the allocations that follow, in a process that keeps what it frees.

Each case runs in a child process: keep_freed_memory changes the C library's allocator for the whole process."""

from __future__ import annotations

import json
import platform

import pytest

from helpers import run_python

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

CHILD = """
import json, resource, sys
import numpy as np
from dnnpipe.runtime.heap import PAGE, fault_in, keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
size = 16 << 20
pushed = bytearray(size)
np.frombuffer(pushed, np.uint8)[::PAGE] = 1  # as a pushed sub-model is received into it
fault_in(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
copy = bytes(pushed)  # what an agent then does, holding Python's lock
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before, "pages": size // PAGE}))
"""


def faults(mode: str) -> dict:
    done = run_python(CHILD, mode)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_after_keep_freed_memory_a_copy_lands_on_pages_faulted_in_ahead():
    default = faults("default")  # fault_in does nothing there: the copy's pages are fresh ones
    if default["faults"] <= default["pages"] // 2:
        pytest.skip("this kernel or allocator faults a fresh 16 MiB copy in with few faults (huge pages): "
                    "nothing to compare")
    kept = faults("keep")
    assert kept["kept"] is True
    assert kept["faults"] < kept["pages"] // 10
