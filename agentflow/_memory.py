"""Process memory: resident size now and at its peak, and giving freed C heap back to the OS.

Not here: GPU memory (torch.cuda reports it), memory limits (the sandbox sets those), other
allocators than glibc's (elsewhere both tuning calls do nothing).
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["MMAP_THRESHOLD", "mmap_large_allocations", "peak_rss_gib", "rss_gib", "trim_heap"]

MMAP_THRESHOLD = 1 << 20


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


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own ``mmap``, so freeing it
    returns the memory to the OS at once (glibc ``mallopt(M_MMAP_THRESHOLD)``). Returns whether it
    was set: not on other C libraries, nor when ``MALLOC_MMAP_THRESHOLD_`` is in the environment
    (the user's choice wins).

    glibc's default threshold starts at 128 KiB but rises to the size of each mmapped block freed
    (up to 32 MiB), so after the first step the activations of a train step (1-6 MiB tensors)
    come from the heap, whose freed holes count in the resident size until ``trim_heap``, and
    freed holes of the generation thread's arena and the trainer's stack up. Fixed at 1 MiB,
    the default LoRA run's peak resident size measured 4.03 -> 3.11 GiB over 5 steps, with no
    slower steps (docs/lora.md, "Where the memory went").
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def rss_gib() -> float:
    """Resident memory of this process now (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
