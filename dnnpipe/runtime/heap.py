"""Fresh memory faulted in without Python's lock, so an agent's threads keep running while it loads a sub-model.

An agent builds interpreters and copies pushed sub-models beside the running role, and both steps hold the GIL.
The pages they write to for the first time must be faulted in by the kernel: 2-36 us a page on the 2-core VM of
the README (zeroing it, and at times the hypervisor backing it), so an EfficientNetV2B0 sub-model's build, 4-8
thousand new pages, held the lock 100-320 ms while the role's frames waited (README, issue 25). Here the pages are
touched first by NumPy, which releases the lock while it writes, and the process keeps what it frees in one heap,
so the steps that hold the lock reuse pages already in place.
"""

from __future__ import annotations

import ctypes
import mmap
import platform

import numpy as np

PAGE = mmap.PAGESIZE
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
LARGEST_FROM_HEAP = 32 << 20  # glibc's most for M_MMAP_THRESHOLD on 64 bits: larger blocks get mappings of their own
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """For a process that loads sub-models while it runs a role: with glibc, every thread allocates from one heap
    (pages touched by one thread serve another's allocations), blocks up to 32 MiB come from it rather than from
    mappings of their own, and what is freed stays, for the next sub-model. Its resident memory then stays at
    its peak. Whether it took effect (not with another C library)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, LARGEST_FROM_HEAP), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])  # each tried


def fault_in(size: int) -> None:
    """size bytes of memory touched, one write a page, and freed: the page faults are paid by this thread with the
    lock released. After keep_freed_memory the allocations that follow reuse these pages; without it this only
    costs the time."""
    if size > 0:
        pages = np.empty(size, np.uint8)
        pages[::PAGE] = 1  # a strided fill of a plain dtype: NumPy releases the GIL while it writes
        del pages
