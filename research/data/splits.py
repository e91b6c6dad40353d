"""How a dataset is held once loaded: uint8 images and labels per split, and how a byte becomes
a network input. Imports nothing of the project but the dataset descriptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from research.data.datasets import MNIST_INFO, DatasetInfo

N_CLASSES = 10


def pixel_values(raw: bool = False, dtype: Any = np.float32) -> np.ndarray:
    """The input value of each byte 0..255, (256,) of ``dtype``: k/255 rounded to float32 (then
    widened to ``dtype``), or k itself when ``raw`` (the origin's inputs). Every float input of
    the project comes from this table, so a uint8 batch turned into floats on the fly equals the
    float32 arrays of earlier versions, bit for bit."""
    values = np.arange(256, dtype=np.float32)
    if not raw:
        # Divide (not multiply by 1/255) so each value is the correctly rounded k/255.
        values = np.divide(values, np.float32(255), dtype=np.float32)
    return values.astype(dtype)


def to_inputs(images: np.ndarray, raw: bool = False, dtype: Any = np.float32) -> np.ndarray:
    """uint8 ``images`` (N, 784) as network inputs (N, 784) of ``dtype`` (:func:`pixel_values`)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if not raw and np.dtype(dtype) == np.float32:
        return np.divide(images, np.float32(255), dtype=np.float32)  # (the same values, faster)
    return pixel_values(raw, dtype)[images]


@dataclass(frozen=True)
class Split:
    """One split: uint8 ``images`` (N, 784) and integer class ``labels`` (N,) int64.

    ``raw`` says how a byte becomes an input: k/255 (default) or k (the origin's 0..255).
    """

    images: np.ndarray
    labels: np.ndarray
    raw: bool = False

    def __post_init__(self) -> None:
        if self.images.ndim != 2 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"Split needs images (N, d) and labels (N,), got {self.images.shape} and "
                f"{self.labels.shape}"
            )
        if self.images.dtype != np.uint8:
            raise ValueError(f"Split images must be uint8, got {self.images.dtype}")

    @property
    def x(self) -> np.ndarray:
        """The inputs (N, 784) float32, made on each access (4 bytes a pixel: hold on to it)."""
        return to_inputs(self.images, self.raw)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, rows: slice) -> Split:
        """The rows ``rows`` (a slice) as a Split of views: ``split[:100].x`` converts 100 rows."""
        if not isinstance(rows, slice):
            raise TypeError(f"a Split is cut with a slice, not {type(rows).__name__}")
        return Split(self.images[rows], self.labels[rows], self.raw)


@dataclass(frozen=True)
class Dataset:
    """The three fixed splits of one dataset: train (50,000), validation (10,000), test (10,000),
    and its description (``info``: name, class names, digests)."""

    train: Split
    validation: Split
    test: Split
    info: DatasetInfo = MNIST_INFO


#: The name of earlier versions, when MNIST was the only dataset.
MNIST = Dataset


def one_hot(labels: np.ndarray, n_classes: int = N_CLASSES, dtype: Any = np.float64) -> np.ndarray:
    """One-hot encode integer class labels (N,) into an (N, n_classes) array of ``dtype``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    out = np.zeros((labels.shape[0], n_classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out
