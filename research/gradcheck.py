"""Numpy's handwritten gradients against JAX autodiff, per layer and parameter array.

Used by ``python -m research gradcheck`` and by the tests. The comparison rule is numpy's
``allclose``: an array passes when every element satisfies |numpy − jax| ≤ atol + rtol·|jax|.
The relative error reported is normwise, max |numpy − jax| / max |jax| over the array: an
elementwise ratio would blow up on the many near-zero gradients of saturated sigmoid units,
whose absolute errors (~1e-18) are what the atol term covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from research.mlp import MLPSpec, Params, loss_and_grads

TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-5)}


@dataclass(frozen=True)
class ArrayCheck:
    """One row of the gradcheck table."""

    name: str  # e.g. "loss", "layer 0 W"
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    passed: bool


def _compare(
    name: str, ours: np.ndarray, theirs: np.ndarray, rtol: float, atol: float
) -> ArrayCheck:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    diff = np.abs(ours - theirs)
    scale = np.abs(theirs)
    max_abs = float(diff.max()) if diff.size else 0.0
    largest = float(scale.max()) if scale.size else 0.0
    return ArrayCheck(
        name=name,
        shape=tuple(ours.shape),
        max_abs_error=max_abs,
        max_rel_error=max_abs / largest if largest > 0 else max_abs,
        passed=bool(np.all(diff <= atol + rtol * scale)),
    )


def gradcheck(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    spec: MLPSpec,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[ArrayCheck]:
    """Compares the loss and every gradient array of numpy's backprop with JAX's.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer (float32 or float64).
        x: inputs (B, sizes[0]); y: targets (B, sizes[-1]).
        rtol, atol: default per dtype from :data:`TOLERANCES`.
    Returns:
        One :class:`ArrayCheck` for the loss, then one per layer and array (W, then b).
    """
    from research import reference  # imports jax; kept out of `import research.gradcheck`

    dtype_name = np.dtype(params[0]["W"].dtype).name
    default_rtol, default_atol = TOLERANCES.get(dtype_name, TOLERANCES["float32"])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol

    our_loss, our_grads = loss_and_grads(params, x, y, spec)
    their_loss, their_grads = reference.loss_and_grads(params, x, y, spec)
    rows = [_compare("loss", np.array(our_loss), np.array(their_loss), rtol, atol)]
    for i, (ours, theirs) in enumerate(zip(our_grads, their_grads)):
        for key in ("W", "b"):
            rows.append(_compare(f"layer {i} {key}", ours[key], theirs[key], rtol, atol))
    return rows


def format_table(rows: list[ArrayCheck], rtol: float, atol: float) -> str:
    """A plain-text table of the checks."""
    header = f"{'array':<12} {'shape':>12} {'max abs err':>12} {'max rel err':>12}  result"
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "x".join(map(str, row.shape)) or "scalar"
        lines.append(
            f"{row.name:<12} {shape:>12} {row.max_abs_error:>12.2e} {row.max_rel_error:>12.2e}  "
            f"{'ok' if row.passed else 'FAIL'}"
        )
    failed = [row.name for row in rows if not row.passed]
    lines.append(
        f"rel err = max|numpy - jax| / max|jax|; pass: every element has "
        f"|numpy - jax| <= {atol:g} + {rtol:g}*|jax|\n"
        + (f"FAILED: {', '.join(failed)}" if failed else f"all {len(rows)} arrays agree")
    )
    return "\n".join(lines)
