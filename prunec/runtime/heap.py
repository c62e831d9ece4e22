"""Giving freed memory back to the operating system.

glibc's allocator keeps memory that was freed in many small blocks (a parsed protobuf's arena,
graphsurgeon's objects) for reuse instead of returning it, so a process that drops a 500 MB
ModelProto still shows it as resident. `trim()` asks glibc to return every free page
(malloc_trim); elsewhere, or when it is unavailable, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim  # noqa: B018  (musl has no malloc_trim)
    except (OSError, AttributeError):
        _libc = None


#: Below this size of model (weight bytes), callers may skip `trim`: little to give back.
TRIM_MIN_BYTES = 8 * 2**20


def trim() -> None:
    """Collect unreachable Python objects, then return free heap pages to the OS (glibc)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
