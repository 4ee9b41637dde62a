"""Host memory: give freed heap back to the OS, and read this process's resident size."""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim  # glibc only
except (OSError, AttributeError):
    _libc = None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. Each layer frees hundreds of MB of batch buffers;
    glibc keeps them otherwise, and the process's footprint creeps past the budget it planned."""
    if _libc is not None:
        _libc.malloc_trim(0)


def resident_bytes() -> int:
    """Current resident set size (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
