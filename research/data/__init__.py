"""Datasets through tensorflow-datasets, without TensorFlow: MNIST (:mod:`.mnist`), its digests,
the fixed train / validation / test splits and the cache. Imports nothing else of the project."""

from research.data.mnist import (
    MNIST,
    MNIST_DIGESTS,
    N_CLASSES,
    N_PIXELS,
    N_TEST,
    N_TRAIN,
    N_VALIDATION,
    DataError,
    Split,
    load_mnist,
    one_hot,
)

__all__ = [
    "MNIST",
    "MNIST_DIGESTS",
    "N_CLASSES",
    "N_PIXELS",
    "N_TEST",
    "N_TRAIN",
    "N_VALIDATION",
    "DataError",
    "Split",
    "load_mnist",
    "one_hot",
]
