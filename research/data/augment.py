"""Expanded training rows: each image and its shifted copies (the ``augment`` field).

``shift1`` is the expansion of Nielsen's ``expand_mnist.py`` (*Neural Networks and Deep
Learning*, chapter 6): every training image, then the same image moved one pixel down, up, right
and left, the row or column that enters filled with zeros (the background: 0 in raw pixels and
in pixels scaled to [0, 1]). 50,000 images become 250,000. Unlike the book's script, which
shuffles the copies once with Python's unseeded ``random``, the rows here are in a fixed order
(the originals, then each shift's block), so a run is deterministic; training shuffles them
every epoch with its own seeded generator anyway.

Applied by the training loop to the training rows only, never to validation or test rows.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Augment = Literal["none", "shift1"]
AUGMENTS: tuple[str, ...] = get_args(Augment)
#: Rows each training row becomes, per augmentation.
FACTORS = {"none": 1, "shift1": 5}
#: MNIST's and Fashion-MNIST's image side: a flat row of 784 pixels is 28 x 28.
SIDE = 28


def augment_factor(augment: str) -> int:
    """How many rows each training row becomes under ``augment``."""
    return FACTORS[augment]


def shifted_by_one(images: np.ndarray) -> np.ndarray:
    """Each image and its four one-pixel shifts.

    Args:
        images: (N, 784) rows of 28 x 28 images, any dtype (uint8 images or floats).
    Returns:
        (5N, 784) of the same dtype: the N images, then the N shifted down (row r is the old
        row r - 1, row 0 zero), up, right (column c is the old column c - 1) and left.
    """
    n = len(images)
    if images.ndim != 2 or images.shape[1] != SIDE * SIDE:
        raise ValueError(f"images must be (N, {SIDE * SIDE}) rows, not {images.shape}")
    square = images.reshape(n, SIDE, SIDE)
    out = np.zeros((5, n, SIDE, SIDE), dtype=images.dtype)
    out[0] = square
    out[1, :, 1:, :] = square[:, :-1, :]  # down
    out[2, :, :-1, :] = square[:, 1:, :]  # up
    out[3, :, :, 1:] = square[:, :, :-1]  # right
    out[4, :, :, :-1] = square[:, :, 1:]  # left
    return out.reshape(5 * n, SIDE * SIDE)


def augment_rows(augment: str, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training rows ``x`` (N, 784) and their ``labels`` (N,) expanded by ``augment``:
    (factor·N, 784) and (factor·N,), the originals first. ``"none"`` returns them as they are."""
    if augment == "none":
        return x, labels
    if augment == "shift1":
        return shifted_by_one(x), np.tile(labels, 5)
    raise ValueError(f"unknown augment {augment!r}; one of {', '.join(AUGMENTS)}")
