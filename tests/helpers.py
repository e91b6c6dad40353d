"""Test helpers: one comparison for parameter-shaped trees (lists of {"W", "b"} dicts).

Import it as ``from helpers import assert_trees_close``: pytest puts this folder on ``sys.path``
(rootdir-based insertion for a tests folder without ``__init__.py``). The comparison itself, and
the tolerance table, are the library's (:mod:`research.verify.compare`), shared with gradcheck.
"""

from __future__ import annotations

import numpy as np

from research.verify.compare import Tree, compare_trees


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
    ``grads: layer 1 W (3, 4): max abs err 2.1e-09, max rel err 3.4e-07; worst at ...``.

    Args:
        actual, expected: lists with one ``{"W": ..., "b": ...}`` per layer; arrays may be numpy
            or anything ``np.asarray`` accepts (e.g. JAX arrays).
        rtol, atol: relative and absolute tolerance.
        what: names the tree in messages ("grads", "params after step 3", ...).
        check_dtype: also require equal dtypes.
    """
    failed = [
        check.describe()
        for check in compare_trees(actual, expected, rtol, atol, check_dtype)
        if not check.passed
    ]
    if failed:
        raise AssertionError(f"{what} differ:\n  " + "\n  ".join(failed))


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
