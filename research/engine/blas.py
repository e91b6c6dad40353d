"""One BLAS call numpy does not expose: C ← β·C + α·Aᵀ·B, on numpy's own BLAS library.

``np.matmul`` always writes a fresh product; general matrix multiply (GEMM) can also accumulate
into its output. Plain SGD's weight update W ← W − inputsᵀ·(learning_rate·δ) is exactly such a
GEMM, so the gradient never needs to be stored and subtracted in a second pass over the
weights (docs/performance.md).

The call goes to the very OpenBLAS library numpy loaded (found through threadpoolctl, bound with
ctypes), so one BLAS, one thread pool and one thread setting serve every product: a second
OpenBLAS (SciPy's, say) in the same loop would fight numpy's for the cores. Where numpy's BLAS is
not a 64-bit-integer OpenBLAS build with the ``cblas_?gemm`` symbols the numpy wheels ship,
:func:`gemm_update` returns None and callers take the two-pass numpy route.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

from research.engine.blas_kernels import numpy_openblas_pool

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# numpy ≥ 2 wheels ship scipy-openblas64 (symbols prefixed scipy_, suffixed 64_); older ones
# ship an OpenBLAS with the 64_ suffix only. Both take 64-bit integers.
_SYMBOL_PATTERNS = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_")

GemmUpdate = Callable[[np.ndarray, np.ndarray, np.ndarray, float, float], None]


@functools.cache
def _numpy_openblas() -> ctypes.CDLL | None:
    pool = numpy_openblas_pool()
    if pool is None:
        return None
    try:
        return ctypes.CDLL(str(pool["filepath"]))
    except OSError:
        return None


@functools.cache
def _gemm(dtype: np.dtype) -> Callable[..., None] | None:
    library = _numpy_openblas()
    if library is None:
        return None
    letter = {"float32": "s", "float64": "d"}[np.dtype(dtype).name]
    scalar = ctypes.c_float if letter == "s" else ctypes.c_double
    for pattern in _SYMBOL_PATTERNS:
        function = getattr(library, pattern.format(letter), None)
        if function is not None:
            i64, pointer, enum = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            function.argtypes = [enum, enum, enum, i64, i64, i64, scalar, pointer, i64, pointer,
                                 i64, scalar, pointer, i64]  # fmt: skip
            function.restype = None
            return function
    return None


def _gemm_update(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, beta: float) -> None:
    """c ← beta·c + alpha·aᵀ·b in place, for C-contiguous a (K, M), b (K, N), c (M, N)."""
    k, m = a.shape
    n = b.shape[1]
    if b.shape[0] != k or c.shape != (m, n):
        raise ValueError(f"shapes do not fit: aᵀ {a.shape[::-1]} · b {b.shape} into c {c.shape}")
    if not (a.dtype == b.dtype == c.dtype):
        raise ValueError(f"dtypes differ: {a.dtype}, {b.dtype}, {c.dtype}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and c.flags.c_contiguous):
        raise ValueError("gemm_update needs C-contiguous arrays")
    function = _gemm(c.dtype)
    assert function is not None  # gemm_update() returns None otherwise
    function(_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, alpha, a.ctypes.data, m, b.ctypes.data, n,
             beta, c.ctypes.data, n)  # fmt: skip


def gemm_update() -> GemmUpdate | None:
    """``update(c, a, b, alpha, beta)``: c ← beta·c + alpha·aᵀ·b in place, for C-contiguous
    a (K, M), b (K, N), c (M, N) of one dtype (float32 or float64); None where numpy's BLAS
    does not offer it."""
    found = all(_gemm(np.dtype(t)) is not None for t in (np.float32, np.float64))
    return _gemm_update if found else None
