"""An autograd-verified research testbed: a numpy MLP with handwritten backprop."""

from research.blas_kernels import choose_openblas_kernels

# Before anything imports numpy: OpenBLAS picks its kernels once, when numpy loads it.
choose_openblas_kernels()
