"""Host memory: give freed heap back to the OS."""
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

