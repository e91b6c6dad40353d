"""Test helpers: one comparison for parameter-shaped trees (lists of {"W", "b"} dicts).

Import it as ``from helpers import assert_trees_close``: pytest puts this folder on ``sys.path``
(rootdir-based insertion for a tests folder without ``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Tree = Sequence[Mapping[str, Any]]


def _describe(actual: np.ndarray, expected: np.ndarray) -> str:
    """Max abs / rel error of two same-shape float arrays and where the worst abs error is."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN counts as the worst error
        rel = np.where(diff == 0, 0.0, diff / np.abs(expected.astype(np.float64)))
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    return (
        f"max abs err {np.max(diff):.3e}, max rel err {np.max(rel):.3e}; "
        f"worst at index {tuple(int(i) for i in worst)}: "
        f"actual {float(actual[worst])!r}, expected {float(expected[worst])!r}"
    )


def assert_trees_close(
    actual: Tree,
    expected: Tree,
    rtol: float,
    atol: float,
    what: str = "grads",
    *,
    check_dtype: bool = True,
) -> None:
    """Asserts two parameter-shaped trees match in structure, shape, dtype and values.

    Values must satisfy ``|actual − expected| <= atol + rtol·|expected|`` elementwise (NaN never
    matches). Every mismatching array is listed in the failure message as e.g.
    ``grads: layer 1 'W' (3, 4): max abs err 2.1e-09, max rel err 3.4e-07; worst at ...``.

    Args:
        actual, expected: lists with one ``{"W": ..., "b": ...}`` per layer; arrays may be numpy
            or anything ``np.asarray`` accepts (e.g. JAX arrays).
        rtol, atol: relative and absolute tolerance.
        what: names the tree in messages ("grads", "params after step 3", ...).
        check_dtype: also require equal dtypes.
    """
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} layers, expected {len(expected)}")
    problems: list[str] = []
    for i, (layer_a, layer_e) in enumerate(zip(actual, expected, strict=True)):
        if set(layer_a) != set(layer_e):
            problems.append(f"layer {i}: keys {sorted(layer_a)}, expected {sorted(layer_e)}")
            continue
        for key in sorted(layer_e):
            a, e = np.asarray(layer_a[key]), np.asarray(layer_e[key])
            name = f"layer {i} {key!r}"
            if a.shape != e.shape:
                problems.append(f"{name}: shape {a.shape}, expected {e.shape}")
                continue
            if check_dtype and a.dtype != e.dtype:
                problems.append(f"{name}: dtype {a.dtype}, expected {e.dtype}")
                continue
            with np.errstate(invalid="ignore", over="ignore"):  # inf − inf is NaN: a mismatch
                a64, e64 = a.astype(np.float64), e.astype(np.float64)
                ok = np.abs(a64 - e64) <= atol + rtol * np.abs(e64)
            if not np.all(ok):
                problems.append(
                    f"{name} {e.shape}: {_describe(a, e)}; "
                    f"{int(np.size(ok) - np.count_nonzero(ok))} of {ok.size} outside "
                    f"rtol={rtol:g}, atol={atol:g}"
                )
    if problems:
        raise AssertionError(f"{what} differ:\n  " + "\n  ".join(problems))


# --- shared test data -------------------------------------------------------------------------

ACTIVATIONS = ("sigmoid", "tanh", "relu")
# Every valid (output, loss) pairing: cross_entropy needs softmax, bce needs sigmoid, mse takes all.
OUTPUT_LOSSES = (
    ("sigmoid", "mse"),
    ("softmax", "cross_entropy"),
    ("sigmoid", "bce"),
    ("identity", "mse"),
    ("softmax", "mse"),
)


def make_targets(
    rng: np.random.Generator, batch: int, k: int, output: str, loss: str, dtype: type = np.float64
) -> np.ndarray:
    """Targets (batch, k) that suit the loss: one-hot rows for cross_entropy, 0/1 for bce,
    values in [0, 1] for mse through sigmoid/softmax, standard normal for mse through identity."""
    if loss == "cross_entropy":
        y = np.eye(k)[rng.integers(0, k, size=batch)]
    elif loss == "bce":
        y = rng.integers(0, 2, size=(batch, k)).astype(np.float64)
    elif output == "identity":
        y = rng.standard_normal((batch, k))
    else:
        y = rng.uniform(0.0, 1.0, size=(batch, k))
    return y.astype(dtype)
