"""Keep freed memory in the process: glibc's thresholds raised at the entry point.

A training step of a network of layers allocates and frees tens of megabytes of large arrays
(a convolution's unrolled windows, activations, their gradients: about 45 MB a step for bench
w4). glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and gives the
memory back when freed, and trims the top of the heap whenever more than its trim threshold is
free there; the next step then takes the pages back one fault at a time. Measured on w4 (docs/
measurements/2026-12-06-w4.md): 3,564 minor page faults a step, and an epoch of 14–19 s against
10–12 s with the thresholds below. The MLP's in-place step keeps its buffers and is unaffected.

:func:`keep_freed_memory` raises both thresholds with ``mallopt``. It is an explicit call made
by ``python -m research`` at its entry (and by each study worker process), as the BLAS kernels
are chosen there; importing this module changes nothing. The cost: up to ``TRIM_THRESHOLD`` of
freed memory stays with the process instead of going back to the system. Outside glibc (macOS,
musl) it does nothing. A user's own settings win: with ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: Allocations below this many bytes come from the heap, which is reused (glibc's default is
#: dynamic from 128 KiB up to 32 MiB; an im2col matrix of a batch of 64 is ~5 MB, of 10,000
#: evaluation rows larger still, which keeps the mmap path for those rare ones).
MMAP_THRESHOLD = 64 * 2**20
#: Freed memory at the top of the heap kept before glibc returns it to the system.
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds (see the module's text). Returns whether they
    were set: False outside glibc on Linux, or when the user set either in the environment."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _USER_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; both must take for the effect measured.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
