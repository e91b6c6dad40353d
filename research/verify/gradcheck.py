"""Numpy's handwritten gradients against JAX autodiff, per layer and parameter array.

Used by ``python -m research gradcheck``. The comparison and its default tolerances are those of
the tests (:mod:`research.verify.compare`): an array passes when every element satisfies
|numpy − jax| ≤ atol + rtol·|jax|, with the ``loss`` row of the tolerance table for the loss and
the ``gradients`` row for the gradients (its float32 atol scaled by the largest gradient entry,
as the tests scale it); the relative error shown is normwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.engine.layers.base import needs
from research.engine.mlp import (
    Masks,
    MLPSpec,
    Params,
    dropout_masks,
    init_params,
    loss_and_grads,
)
from research.verify.compare import ArrayCheck, compare_arrays, compare_trees, tolerance


def gradcheck(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    spec: MLPSpec,
    rtol: float | None = None,
    atol: float | None = None,
    masks: Masks | None = None,
) -> list[ArrayCheck]:
    """Compares the loss and every gradient array of numpy's backprop with JAX's.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer (float32 or float64).
        x: inputs (B, sizes[0]); y: targets (B, sizes[-1]).
        rtol, atol: the same for every array; default, the tolerance table's for the dtype.
        masks: dropout masks (``mlp.Masks``), the same fixed ones for both sides.
    Returns:
        One :class:`~research.verify.compare.ArrayCheck` for the loss, then one per layer and
        array (W, then b); each carries the tolerance it was checked at.
    """
    from research.verify import reference  # imports jax; kept out of `import gradcheck`

    dtype = params[0]["W"].dtype
    our_loss, our_grads = loss_and_grads(params, x, y, spec, masks)
    their_loss, their_grads = reference.loss_and_grads(params, x, y, spec, masks)
    loss_tol = tolerance("loss", dtype)
    grad_rtol, grad_atol = tolerance("gradients", dtype).for_tree(their_grads)
    loss_rtol, loss_atol = loss_tol.rtol, loss_tol.atol
    if rtol is not None:
        loss_rtol = grad_rtol = rtol
    if atol is not None:
        loss_atol = grad_atol = atol
    loss_row = compare_arrays(
        "loss", np.array(our_loss), np.array(their_loss), loss_rtol, loss_atol
    )
    return [loss_row, *compare_trees(our_grads, their_grads, grad_rtol, grad_atol)]


def check_network(
    spec: MLPSpec,
    init: str,
    dtype: np.dtype | type | str,
    seed: int,
    x: np.ndarray,
    labels: np.ndarray,
    rtol: float | None = None,
    atol: float | None = None,
    input_dropout: float = 0.0,
    dropout: float = 0.0,
) -> list[ArrayCheck]:
    """Initializes the network (``init`` scheme, ``seed``, ``dtype``) and runs :func:`gradcheck`
    on inputs x (B, sizes[0]) and integer labels (B,) as one-hot targets, with one fixed set of
    dropout masks at those rates (drawn from ``seed``) when either is above 0."""
    dtype = np.dtype(dtype)
    y = np.eye(spec.sizes[-1], dtype=dtype)[labels]
    params = init_params(spec, seed, dtype=dtype, scheme=init)
    masks = None
    if input_dropout or dropout:
        rng = np.random.default_rng([seed, 1])  # (not the stream init_params draws from)
        masks = dropout_masks(rng, len(x), spec.sizes, input_dropout, dropout, dtype)
    return gradcheck(params, np.asarray(x, dtype=dtype), y, spec, rtol, atol, masks)


def describe_check(config: Any, dtype: str, seed: int, source: str) -> str:
    """The first line of ``gradcheck``: the network of ``config`` (a TrainConfig), dropout, dtype,
    init and the data it checks on."""
    network = config.network()
    if network is not None:  # --layers: the layers as the network holds them
        masks = any("mask" in needs(layer) for layer in network.layers)
        dropout = ", dropout with one fixed set of masks on both sides" if masks else ""
        return (
            f"gradcheck: {network.describe()} {network.output}/{network.loss} l2={network.l2:g}"
            f"{dropout}, {dtype}, {config.init} init (seed {seed}), on {source}"
        )
    spec = config.spec()
    dropout = (
        f", dropout {config.input_dropout:g} (inputs) / {config.dropout:g} (hidden) with one "
        "fixed set of masks on both sides"
        if config.input_dropout or config.dropout
        else ""
    )
    return (
        f"gradcheck: {'x'.join(map(str, spec.sizes))} {spec.activation}/{spec.output}/{spec.loss}"
        f" l2={spec.l2:g}{dropout}, {dtype}, {config.init} init (seed {seed}), on {source}"
    )


def random_batch(spec: MLPSpec, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs uniform in [0, 1) (rows, sizes[0]) and random labels (rows,), for a check without
    data."""
    rng = np.random.default_rng(seed)
    return rng.random((rows, spec.sizes[0])), rng.integers(0, spec.sizes[-1], rows)


def format_table(rows: list[ArrayCheck]) -> str:
    """A plain-text table of the checks, and the tolerances they were checked at."""
    width = max([12, *(len(row.name) for row in rows)])
    header = f"{'array':<{width}} {'shape':>12} {'max abs err':>12} {'max rel err':>12}  result"
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "x".join(map(str, row.shape)) or "scalar"
        lines.append(
            f"{row.name:<{width}} {shape:>12} {row.max_abs_error:>12.2e} "
            f"{row.max_rel_error:>12.2e}  "
            f"{'ok' if row.passed else 'FAIL'}"
        )
    tolerances: dict[tuple[float, float], list[str]] = {}
    for row in rows:
        tolerances.setdefault((row.rtol, row.atol), []).append(row.name)
    rules = [
        f"|numpy - jax| <= {atol:.3g} + {rtol:g}*|jax|"
        + ("" if len(tolerances) == 1 else f" ({'the loss' if names == ['loss'] else 'gradients'})")
        for (rtol, atol), names in tolerances.items()
    ]
    failed = [row.name for row in rows if not row.passed]
    lines.append(
        "rel err = max|numpy - jax| / max|jax|; pass: every element has " + "; ".join(rules)
    )
    lines.append(f"FAILED: {', '.join(failed)}" if failed else f"all {len(rows)} arrays agree")
    return "\n".join(lines)
