"""Which matrix-product kernels numpy's OpenBLAS runs: chosen before numpy loads it.

numpy's wheels ship an OpenBLAS built for many CPUs at once; it picks one set of kernels when the
library loads, from the CPU's features, or from the environment variable ``OPENBLAS_CORETYPE``
if that is set. On AMD Zen 4 (CPU family 25 with AVX-512) it picks its SkylakeX kernels, written
for Intel's AVX-512 units; Zen 4 runs each 512-bit instruction as two 256-bit halves, and there
the kernels OpenBLAS itself uses on Zen 2 and Zen 3 (``Zen``, the Haswell AVX2 kernels) are the
faster ones for this project's float32 products (docs/performance.md has the measurements).
OpenBLAS reports the Zen kernels as ``Haswell``.

Importing this module (or any of the project) changes nothing. The choice is an explicit call,
:func:`choose_openblas_kernels`, made by ``python -m research`` at its entry, before numpy loads:
it sets ``OPENBLAS_CORETYPE=Zen`` on Zen 4, only where the user has not set the variable (any
value, even an empty one, is left alone: ``OPENBLAS_CORETYPE=SkylakeX``, or an empty value, gives
back OpenBLAS's own choice). If numpy is loaded already, its kernels are chosen, and the variable
is set to those instead, so that worker processes run what their parent runs. Other CPUs are left
to OpenBLAS. A script that uses the library directly can make the same call first::

    from research.engine.blas_kernels import choose_openblas_kernels
    choose_openblas_kernels()  # before numpy is imported
    import numpy as np

The kernels change the order of the sums, hence the last bits of every result: runs record the
kernels they used (``blas_kernels``) and ``rerun`` says when they differ from its own.

This module imports only the standard library at import time, because it must run before numpy
(threadpoolctl, to ask numpy's OpenBLAS what it loaded, only once numpy is loaded).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

VARIABLE = "OPENBLAS_CORETYPE"
ZEN4_KERNELS = "Zen"
UNKNOWN = "unknown"
_AMD_ZEN3_ZEN4_FAMILY = 25  # 0x19: Zen 3 (no AVX-512: OpenBLAS already picks Zen) and Zen 4


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The ``key: value`` lines of the first processor in a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def is_zen4(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text describes an AMD Zen 4 CPU (family 25 with AVX-512)."""
    fields = _first_processor(cpuinfo)
    return (
        fields.get("vendor_id") == "AuthenticAMD"
        and fields.get("cpu family") == str(_AMD_ZEN3_ZEN4_FAMILY)
        and "avx512f" in fields.get("flags", "").split()
    )


def kernel_choice(environ: Mapping[str, str], cpuinfo: str) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to set before numpy loads, given the environment and a
    /proc/cpuinfo text, or None to leave OpenBLAS to choose (see the module docstring)."""
    if VARIABLE in environ or not is_zen4(cpuinfo):
        return None
    return ZEN4_KERNELS


def numpy_openblas_pool() -> dict[str, Any] | None:
    """threadpoolctl's description of the OpenBLAS that numpy loaded (its ``filepath``,
    ``architecture``, ``num_threads``...), or None if numpy's BLAS is not OpenBLAS.

    Other OpenBLAS copies in the process (SciPy's, say) are not numpy's and are skipped.
    """
    import numpy  # loads it if it is not loaded yet (only after the choice above, then)
    from threadpoolctl import threadpool_info

    numpy_dir = Path(numpy.__file__ or "").resolve().parent
    for pool in threadpool_info():
        path = Path(pool.get("filepath", "")).resolve()
        if pool.get("internal_api") == "openblas" and numpy_dir.parent in path.parents:
            if "numpy" in str(path):
                return pool
    return None


def loaded_kernels() -> str:
    """The kernel set of numpy's OpenBLAS as it names it (``Haswell``, ``SkylakeX``...), or
    ``unknown`` (another BLAS). ``OPENBLAS_CORETYPE=Zen`` loads kernels named ``Haswell``."""
    pool = numpy_openblas_pool()
    return str(pool.get("architecture") or UNKNOWN) if pool else UNKNOWN


def choose_openblas_kernels(
    environ: MutableMapping[str, str] = os.environ, cpuinfo_path: str = "/proc/cpuinfo"
) -> str | None:
    """Sets ``OPENBLAS_CORETYPE`` in ``environ`` where :func:`kernel_choice` says so.

    If numpy is loaded already, its kernels are chosen; the variable is then set to them (where
    the user has not set it), so that worker processes, which load numpy afresh, run the same
    kernels as this one and produce the same bits. Returns the value set, or None. A machine
    without ``cpuinfo_path`` (not Linux) is left alone.
    """
    if VARIABLE in environ:
        return None
    if "numpy" in sys.modules:
        loaded = loaded_kernels()
        if loaded == UNKNOWN:
            return None
        environ[VARIABLE] = loaded
        return loaded
    try:
        cpuinfo = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        return None
    choice = kernel_choice(environ, cpuinfo)
    if choice is not None:
        environ[VARIABLE] = choice
    return choice
