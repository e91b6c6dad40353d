"""``python -m research`` (and the ``research`` command): see :mod:`research.cli`.

The OpenBLAS kernels are chosen here, explicitly, before anything imports numpy
(:mod:`research.engine.blas_kernels`), and glibc is told to keep freed memory
(:mod:`research.engine.allocator`); importing the library itself changes nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Chooses the BLAS kernels for this CPU, then runs the command line."""
    from research.engine.blas_kernels import choose_openblas_kernels

    choose_openblas_kernels()
    from research.engine.allocator import keep_freed_memory

    keep_freed_memory()
    from research.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
