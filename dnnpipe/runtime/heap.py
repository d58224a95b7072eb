"""Fresh memory faulted in without Python's lock, so an agent's threads keep running while it loads a sub-model.

An agent builds interpreters and copies pushed sub-models beside the running role, and both steps hold the GIL.
The pages they write to for the first time must be faulted in by the kernel: 2-36 us a page on the 2-core VM of
the README (zeroing it, and at times the hypervisor backing it), so an EfficientNetV2B0 sub-model's build, 4-8
thousand new pages, held the lock 100-350 ms while the role's frames waited (README, issue 25). Here the pages are
touched first by NumPy, which releases the lock while it writes, and the process keeps what it frees in one heap,
so the steps that hold the lock reuse pages already in place.

The allocator's settings are the process's, so whether they took effect is kept here, once per process: without
them touching pages ahead would only cost time (`fault_in` then does nothing).
"""

from __future__ import annotations

import ctypes
import mmap
import platform

import numpy as np

PAGE = mmap.PAGESIZE
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# glibc's most for M_MMAP_THRESHOLD (larger blocks always get a mapping of their own): 32 MiB on 64 bits
LARGEST_FROM_HEAP = 32 << 20 if ctypes.sizeof(ctypes.c_long) == 8 else 512 << 10
NEVER_TRIM = 2**31 - 1
_kept = [False]  # whether this process keeps freed memory (keep_freed_memory took effect)


def keep_freed_memory() -> bool:
    """For a process that loads sub-models while it runs a role: with glibc, blocks up to LARGEST_FROM_HEAP come
    from the heap rather than from mappings of their own, every thread allocates from that one heap (pages
    touched by one thread serve another's allocations), and what is freed stays, for the next sub-model. Its
    resident memory then stays at its peak. Whether it took effect (not with another C library)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, LARGEST_FROM_HEAP), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, NEVER_TRIM))
    _kept[0] = all(mallopt(parameter, value) == 1 for parameter, value in settings)  # the first refusal stops it
    return _kept[0]


def fault_in(size: int) -> None:
    """Up to size bytes of memory touched, one write a page, and freed, when this process keeps freed memory: the
    page faults are paid by this thread with the lock released, and the allocations that follow reuse the pages.
    At most LARGEST_FROM_HEAP: a larger block would get a mapping of its own, given back when freed."""
    size = min(size, LARGEST_FROM_HEAP - PAGE)
    if _kept[0] and size > 0:
        pages = np.empty(size, np.uint8)
        pages[::PAGE] = 1  # a strided fill of a plain dtype: NumPy releases the GIL while it writes
        del pages
