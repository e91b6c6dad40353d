"""``python -m research.bench.w4_epoch [--epochs N]``: engine epochs (float32) of w4's network
on the 50,000 MNIST training rows (:func:`research.bench.conv_workload.epoch_seconds`).

The OpenBLAS kernels are chosen first, before numpy loads, and glibc keeps freed memory, as
``python -m research`` does.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from research.engine.blas_kernels import choose_openblas_kernels

    choose_openblas_kernels()
    from research.engine.allocator import keep_freed_memory

    kept = keep_freed_memory()
    import numpy as np

    from research.bench.contenders import TRAIN_ROWS, WORKLOADS
    from research.bench.conv_workload import epoch_seconds
    from research.engine.blas_kernels import loaded_kernels

    parser = argparse.ArgumentParser(
        prog="python -m research.bench.w4_epoch",
        description="Times engine epochs (float32) of w4's network on the 50,000 MNIST rows.",
    )
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (default 3)")
    parser.add_argument("--source-dir", default=None, help="where MNIST is (as for train)")
    parser.add_argument("--data-dir", default=None, help="the prepared-data cache")
    args = parser.parse_args(argv)
    (workload,) = [w for w in WORKLOADS if w.layers]
    seconds = epoch_seconds(workload, args.epochs, args.source_dir, args.data_dir, TRAIN_ROWS)
    steps = TRAIN_ROWS // workload.batch_size
    print(f"{workload.key}: {workload.layers} (batch {workload.batch_size}, {steps} steps)")
    print(f"numpy {np.__version__}, BLAS kernels {loaded_kernels()}, freed memory kept: {kept}")
    print("engine-f32 epochs: " + ", ".join(f"{s:.2f} s" for s in seconds))
    median = float(np.median(seconds))
    print(f"median {median:.2f} s = {1000 * median / steps:.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
