"""Process settings that suit sampling small models on a few CPU cores.

glibc's malloc hands large blocks (above a threshold that it raises and lowers by itself) straight back to the
operating system when they are freed, and trims the heap top; the next step then allocates the same activations
again and takes a page fault on every 4 KiB of them. A DiT step on the CPU allocates and frees megabytes of
temporaries, so a process can fall into this mode for a while and run a quarter slower (measured on the embedded
default: a dense step at batch 16 with CFG took 71-74 ms in some processes and 92 ms in others; with the settings
below, 68-74 ms in every process; docs/wallclock.md). `tune_allocator` keeps freed blocks of up to 32 MiB in the
heap for reuse. It is process-wide, so the library never calls it by itself: the `lazydit` command does, and so
do the benchmarks, for every row alike.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # blocks below this come from the heap and stay there when freed (glibc's maximum)
TRIM_THRESHOLD = 2**30  # free memory at the heap top kept before it is returned to the system

_tuned = None


def tune_allocator() -> bool:
    """Keep freed activation-sized blocks in the heap (glibc only; a no-op elsewhere). Idempotent.

    Returns:
        True when glibc accepted the settings, False where there is no glibc (macOS, Windows, musl).
    """
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                _tuned = False
    return _tuned
