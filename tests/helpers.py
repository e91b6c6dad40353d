"""Test helpers: the one comparison of the tests, and shared test data.

Import them as ``from helpers import assert_close``: pytest puts this folder on ``sys.path``
(rootdir-based insertion for a tests folder without ``__init__.py``). The comparison itself, and
the tolerance table, are the library's (:mod:`research.verify.compare`), shared with gradcheck:
no test writes a tolerance of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from research.verify.compare import (
    ArrayCheck,
    Tolerance,
    Tree,
    compare_arrays,
    compare_trees,
    tolerance,
)

#: the tolerance of :func:`assert_close` that asks for the same bits
EXACT = "exact"


def assert_close(
    actual: Any,
    expected: Any,
    tol: str | Tolerance,
    what: str = "values",
    *,
    check_dtype: bool = True,
) -> None:
    """Asserts two values match in structure, shape, dtype and values: the tests' one comparison.

    The values are parameter-shaped trees (lists with one ``{"W": ..., "b": ...}`` per layer), or
    arrays, or numbers; arrays may be numpy or anything ``np.asarray`` accepts (e.g. JAX arrays).
    Every mismatching array is listed in the failure message, e.g. ``grads: layer 1 W (3, 4): max
    abs err 2.1e-09, max rel err 3.4e-07; worst at ...``.

    Args:
        actual, expected: two trees, two arrays or two numbers.
        tol: how closely they must agree. ``"exact"`` (:data:`EXACT`): the same bits (NaN equals
            the same NaN, −0.0 differs from 0.0). A key of
            :data:`research.verify.compare.TOLERANCES`: its entry for the dtype of ``expected``,
            ``|actual − expected| <= atol + rtol·|expected|`` elementwise (NaN never matches). Or
            a :class:`~research.verify.compare.Tolerance` (one of the table's, e.g. widened for
            an ill-conditioned network).
        what: names the values in messages ("grads", "params after step 3", ...).
        check_dtype: also require equal dtypes (always, for ``"exact"``).
    """
    if _is_tree(expected):
        arrays = _tree_arrays(actual, expected)
        tree = expected

        def compare(rtol: float, atol: float, dtype: bool) -> list[ArrayCheck]:
            return compare_trees(actual, expected, rtol, atol, dtype)

    else:
        arrays = {what: (np.asarray(actual), np.asarray(expected))}
        tree = [{"values": expected}]

        def compare(rtol: float, atol: float, dtype: bool) -> list[ArrayCheck]:
            return [compare_arrays(what, *arrays[what], rtol, atol, dtype)]

    if tol == EXACT:
        # equal values in other bits fail (-0.0 and 0.0); a NaN against the same NaN passes
        failed = [
            check.describe() if not check.passed else f"{check.name}: equal values, other bits"
            for check in compare(0.0, 0.0, True)
            if check.problem or not _same_bits(*arrays[check.name])
        ]
    else:
        if isinstance(tol, str):
            first = next(iter(arrays.values()), (None, np.zeros(0)))[1]
            tol = tolerance(tol, first.dtype)
        failed = [c.describe() for c in compare(*tol.for_tree(tree), check_dtype) if not c.passed]
    if failed:
        raise AssertionError(f"{what} differ:\n  " + "\n  ".join(failed))


def _is_tree(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(layer, Mapping) for layer in value)


def _tree_arrays(actual: Tree, expected: Tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The arrays of two trees by the names :func:`compare_trees` gives them (``layer 0 W``)."""
    return {
        f"layer {i} {key}": (np.asarray(layer_a[key]), np.asarray(layer_e[key]))
        for i, (layer_a, layer_e) in enumerate(zip(actual, expected))
        for key in layer_e
        if key in layer_a
    }


def _same_bits(a: np.ndarray, e: np.ndarray) -> bool:
    """Equal dtypes, shapes and bits."""
    if a.dtype != e.dtype or a.shape != e.shape:
        return False
    a, e = np.ascontiguousarray(a), np.ascontiguousarray(e)
    return bool(np.array_equal(a.view(np.uint8), e.view(np.uint8)))


def copy_run(client, source, experiment_id: str, drop=(), change=None) -> str:
    """A new MLflow run with ``source``'s params (some dropped or changed) and its metric
    histories: what an older or a hand-edited run looks like (MLflow params are immutable)."""
    copy = client.create_run(experiment_id).info.run_id
    params = {k: v for k, v in source.data.params.items() if k not in drop} | (change or {})
    for name, value in params.items():
        client.log_param(copy, name, value)
    for key in ("train/loss", "val/loss", "val/accuracy"):
        for metric in client.get_metric_history(source.info.run_id, key):
            client.log_metric(copy, key, metric.value, step=metric.step)
    client.set_terminated(copy)
    return copy


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


def study_results(trials, name: str = "s"):
    """An ``analysis.store.StudyResults`` of the ``trials`` table alone (no curves, no parent
    run's params), for the report's text and refusals."""
    import pandas as pd

    from analysis.store import StudyResults
    from research.experiment.tracking.results import StudyRecord

    return StudyResults(
        record=StudyRecord(name, "1", "parent", 0),
        objective="val/accuracy",
        direction="maximize",
        search=[],
        trials=trials,
        curves=pd.DataFrame(),
        parent_params={},
        parent_metrics={},
        parent_tags={},
    )
