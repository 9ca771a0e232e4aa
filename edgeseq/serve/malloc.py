"""A fixed mmap threshold for glibc's malloc, so that a long-running server's RSS levels off.

glibc serves a block over its mmap threshold (128 KiB at start) with its own mmap, unmapped when freed; but
each time it frees such a block it raises the threshold to that block's size (up to 32 MiB), and from then
on blocks of that size come from the heap. A server's cached states (hundreds of KiB to megabytes, made and
dropped with every request) then land in the heap, whose freed holes RSS keeps: the demo's load run grew
225 -> 318 MB over 4,000 requests with its 64 MB state cache full from the fifth second on (docs/serve.md).
Setting the threshold (mallopt M_MMAP_THRESHOLD, which also ends its adjustment) keeps such blocks mapped
and returned: the same run holds 185-188 MB. The price is an mmap and munmap per big block, so the per-token
path allocates none (runtime/sampling.py reuses its buffers). MALLOC_MMAP_THRESHOLD_ in the environment
(glibc's own setting) is left to win; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def pin_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Fix glibc's mmap threshold at `nbytes`; True where it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their malloc works otherwise
            return False
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
