"""What the local ONNX Runtime CPU kernels prefer, for passes that shape a model for them."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def channel_block() -> tuple[int, str]:
    """Channel multiple ONNX Runtime's blocked (NCHWc) CPU convolutions use here, and why.

    MLAS blocks channels by 16 with AVX-512 and by 8 otherwise; a conv whose channel counts
    are not multiples of the block runs on slower kernels with layout reorders around it.
    """
    if platform.machine().lower() in ("x86_64", "amd64") and "avx512f" in cpu_flags():
        return 16, "AVX-512: ONNX Runtime blocks conv channels by 16"
    return 8, "ONNX Runtime blocks conv channels by 8 (by 16 only with AVX-512)"
