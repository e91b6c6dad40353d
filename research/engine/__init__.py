"""The numbers: the MLP's spec, forward pass and handwritten backprop (:mod:`.mlp`), optimizers
(:mod:`.optim`), the in-place training step (:mod:`.inplace`) and the BLAS helpers (:mod:`.blas`,
:mod:`.blas_kernels`). Imports nothing of the project outside the engine.

This file imports nothing, so that :mod:`.blas_kernels` can be imported before numpy.
"""
