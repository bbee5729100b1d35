"""Process memory: resident size now and at its peak, and giving freed C heap back to the OS.

Not here: GPU memory (torch.cuda reports it), memory limits (the sandbox sets those).
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["peak_rss_gib", "rss_gib", "trim_heap"]


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A train step frees gigabytes of activations and temporaries that glibc keeps in its arenas
    (one per thread), so the resident size of a long run keeps the high-water mark of every
    thread's past allocations. Trimming after each step measured 6.4 -> 3.7 GiB resident between
    steps of the addition run (``examples/addition.yaml``, docs/benchmarks.md).
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def rss_gib() -> float:
    """Resident memory of this process now (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
