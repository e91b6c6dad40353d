"""Elementwise stages of a training step in cache-sized blocks: one pass over memory, not one
per operation.

A stage such as a Nesterov update (``v ← β·v + g; p ← p − rate·(g + β·v)``) written as whole-array
numpy calls makes one pass over memory per call: six passes over three 11.6 MB arrays for w3's
2.9M parameters. :class:`Blocks` runs the same calls block by block instead, so that a block of
each array stays in the core's cache from the stage's first call to its last: the arrays are read
and written once.

Every element goes through the same ufunc calls in the same order whichever block it falls in,
so the results are bit for bit those of the whole-array calls, for any block size. Only
elementwise work may be split this way.

Why one thread: numpy releases the GIL inside its ufunc loops, so a second thread could take half
the blocks, and alone it does (w3's Nesterov update, 2-vCPU Intel Xeon: 3.3 ms in one thread,
2.8 ms in two). But inside a training step every stage follows a matrix product, after which
OpenBLAS's worker thread spins on the other core for ~0.1 s waiting for the next one; the second
thread then shares a core instead of having one (3.6 ms in one thread, 3.9 ms in two; whole w3
steps 1–3% slower with two, docs/performance.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

#: The most bytes of one array in a block: a block of each of a stage's arrays (up to four, and
#: two scratch blocks) fits a core's L2 cache. Measured on w3's Nesterov update, 2-vCPU Intel
#: Xeon (2 MB L2 per core): blocks of 64–128k float32 elements 3.6 ms, 16k 5.5 ms, whole arrays
#: (one pass per operation) 5.7 ms.
BLOCK_BYTES = 1 << 18

#: ``kernel(*views, *scratch)``: in-place ufunc calls on one block of each array of a group (1-D
#: views of equal length), with ``scratch`` free buffers of that length in the first array's dtype.
Kernel = Callable[..., None]


class Blocks:
    """Runs elementwise kernels over groups of equally shaped C-contiguous arrays, block by block.

    Args:
        block_bytes: the most bytes of one array in a block.
    """

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        # scratch blocks per (thread id, dtype, count, length): made once, reused by every call
        self._scratch: dict[tuple[int, np.dtype, int, int], list[np.ndarray]] = {}

    def run(self, kernel: Kernel, groups: Sequence[Sequence[np.ndarray]], scratch: int = 0) -> None:
        """``kernel(*blocks of one group, *scratch)`` over every block of every group, in order.

        Args:
            kernel: the stage, in-place ufunc calls on its arguments (elementwise only).
            groups: tuples of arrays of one shape each (say a parameter, its gradient and its
                velocity). C-contiguous ones are seen flattened, block by block; a group with
                another layout (a user layer's ``W.T``) is given whole, with scratch arrays of
                its shape.
            scratch: how many free buffers the kernel needs, one block long each.
        Raises:
            ValueError: the arrays of a group differ in shape (before any kernel runs).
        """
        for group in groups:
            if any(a.shape != group[0].shape for a in group):
                shapes = ", ".join(str(a.shape) for a in group)
                raise ValueError(f"Blocks.run needs arrays of one shape per group, got {shapes}")
        for group in groups:
            if not all(a.flags.c_contiguous for a in group):
                kernel(*group, *(np.empty_like(group[0]) for _ in range(scratch)))
                continue
            flat = [np.reshape(a, -1) for a in group]
            first = flat[0]
            length = max(1, self.block_bytes // first.itemsize)
            buffers = self._buffers(first.dtype, scratch, length) if scratch else []
            for start in range(0, len(first), length):
                stop = min(start + length, len(first))
                kernel(*(a[start:stop] for a in flat), *(b[: stop - start] for b in buffers))

    def _buffers(self, dtype: np.dtype, count: int, length: int) -> list[np.ndarray]:
        """``count`` scratch blocks of ``dtype`` owned by the calling thread (made once)."""
        key = (threading.get_ident(), dtype, count, length)
        if key not in self._scratch:
            self._scratch[key] = [np.empty(length, dtype) for _ in range(count)]
        return self._scratch[key]


#: What the in-place updates run on (its scratch blocks are made once per thread and dtype).
BLOCKS = Blocks()
