"""One comparison for parameter-shaped trees, and one table of tolerances.

``gradcheck`` and the tests compare arrays the same way, here: an array passes when every element
satisfies numpy's ``allclose`` rule, |actual − expected| ≤ atol + rtol·|expected| (NaN never
passes). The relative error reported is normwise, max |actual − expected| / max |expected| over
the array: an elementwise ratio would blow up on the many near-zero gradients of saturated
sigmoid units, whose absolute errors (~1e-18) are what the atol term covers.

:data:`TOLERANCES` says how closely each pair of implementations must agree, per dtype. Why these
values: the handwritten backprop and JAX evaluate the same sums in different orders, so float64
results differ by a few ulp of the largest terms (rtol 1e-10, with atol 1e-12 for entries that are
sums of cancelling terms); float32 eps is 6e-8 and a few hundred roundings accumulate, so its
atol is relative to the largest entry of the tree (``scale_atol``). Training trajectories compound
those differences over 20 steps (1e-8); the in-place fast path does the pure functions' operations
in another order (1e-12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Tree = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Tolerance:
    """``|actual − expected| ≤ atol + rtol·|expected|``; with ``scale_atol`` the atol is
    multiplied by max(1, the largest |expected| entry of the tree)."""

    rtol: float
    atol: float
    scale_atol: bool = False

    def for_tree(self, expected: Tree) -> tuple[float, float]:
        """(rtol, atol) for comparing a tree against ``expected``."""
        if not self.scale_atol:
            return self.rtol, self.atol
        largest = max(
            (
                float(np.max(np.abs(np.asarray(v)), initial=0.0))
                for t in expected
                for v in t.values()
            ),
            default=0.0,
        )
        return self.rtol, self.atol * max(1.0, largest)


#: what is compared with what -> dtype name -> how closely they must agree
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # handwritten gradients against JAX autodiff (gradcheck, tests/test_gradients.py)
    "gradients": {
        "float64": Tolerance(rtol=1e-10, atol=1e-12),
        "float32": Tolerance(rtol=1e-4, atol=1e-5, scale_atol=True),
    },
    # the loss value against JAX's
    "loss": {
        "float64": Tolerance(rtol=1e-12, atol=1e-14),
        "float32": Tolerance(rtol=1e-5, atol=1e-6),
    },
    # 20 training steps of numpy against JAX + optax (tests/test_trajectory.py)
    "trajectory": {"float64": Tolerance(rtol=1e-8, atol=1e-10)},
    # the in-place fast path and the origin's per-sample loop against the pure functions
    "same_operations": {"float64": Tolerance(rtol=1e-12, atol=1e-14)},
    # --- what only the tests compare (tests/) ---
    # a layer's output against its JAX reference (research.verify.layer_check): sums of a few
    # hundred products (a convolution's window) in another order, relative to the largest output
    "layer_forward": {
        "float64": Tolerance(rtol=1e-12, atol=1e-14, scale_atol=True),
        "float32": Tolerance(rtol=1e-5, atol=1e-6, scale_atol=True),
    },
    # the forward pass against JAX's: no backward pass to grow the rounding
    "forward": {"float64": Tolerance(rtol=1e-12, atol=1e-15)},
    # a few roundings apart: values worked out by hand (log k, 27.875, ...) against both
    # implementations, one JAX function compiled twice
    "few_roundings": {"float64": Tolerance(rtol=5e-16, atol=1e-16)},
    # JAX's gradients against central differences (step 1e-6) of its own loss: the differences
    # carry ~1e-12 truncation and ~1e-10 rounding error
    "finite_differences": {"float64": Tolerance(rtol=1e-6, atol=1e-8)},
    # learning-rate schedules and ramps against optax's and their formulas
    "schedules": {"float64": Tolerance(rtol=1e-12, atol=1e-15)},
    # softmax rows against 1: the roundings of a sum of a few probabilities (8 eps)
    "sums_to_one": {
        "float64": Tolerance(rtol=0.0, atol=8 * 2.0**-52),
        "float32": Tolerance(rtol=0.0, atol=8 * 2.0**-23),
    },
    # a JAX epoch on uint8 images against the same epoch on float inputs, which differ in the
    # last bit (XLA multiplies by 1/255): float32 steps amplify that over an epoch
    "inputs_last_bit": {"float32": Tolerance(rtol=1e-5, atol=1e-6)},
    # a BLAS ?gemm accumulating into its output against the float64 product: one rounding per
    # term in the output's dtype
    "gemm": {
        "float64": Tolerance(rtol=1e-13, atol=1e-13),
        "float32": Tolerance(rtol=1e-5, atol=1e-5),
    },
    # statistics (the Wilson interval, a weighted accuracy) against their closed forms
    "closed_form": {"float64": Tolerance(rtol=0.0, atol=1e-12)},
}


def tolerance(kind: str, dtype: Any) -> Tolerance:
    """The tolerance of ``kind`` (a key of :data:`TOLERANCES`) for ``dtype``."""
    name = np.dtype(dtype).name
    by_dtype = TOLERANCES[kind]
    if name not in by_dtype:
        raise ValueError(f"no {kind} tolerance for {name}; there is one for {', '.join(by_dtype)}")
    return by_dtype[name]


@dataclass(frozen=True)
class ArrayCheck:
    """One compared array (a row of the gradcheck table).

    ``problem`` names a mismatch of structure, shape or dtype (then nothing else was compared);
    ``n_outside`` counts the elements outside the tolerance; ``worst`` says where the largest
    absolute error is, with both values.
    """

    name: str  # e.g. "loss", "layer 0 W"
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    n_outside: int = 0
    size: int = 0
    worst: str = ""
    problem: str = ""
    rtol: float = 0.0  # the tolerance it was checked at
    atol: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problem and self.n_outside == 0

    def describe(self) -> str:
        """One line for a failure message."""
        if self.problem:
            return f"{self.name}: {self.problem}"
        return (
            f"{self.name} {self.shape}: max abs err {self.max_abs_error:.3e}, max rel err "
            f"{self.max_rel_error:.3e}; {self.worst}; {self.n_outside} of {self.size} outside "
            f"rtol={self.rtol:g}, atol={self.atol:g}"
        )


def compare_arrays(
    name: str, actual: Any, expected: Any, rtol: float, atol: float, check_dtype: bool = False
) -> ArrayCheck:
    """Compares two arrays (numpy, JAX or anything ``np.asarray`` takes) elementwise."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        return ArrayCheck(
            name, e.shape, np.inf, np.inf, problem=f"shape {a.shape}, expected {e.shape}"
        )
    if check_dtype and a.dtype != e.dtype:
        return ArrayCheck(
            name, e.shape, np.inf, np.inf, problem=f"dtype {a.dtype}, expected {e.dtype}"
        )
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf is NaN: a mismatch
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        diff = np.abs(a64 - e64)
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN counts as the worst error
        scale = np.abs(e64)
        outside = ~(diff <= atol + rtol * scale)
    max_abs = float(diff.max()) if diff.size else 0.0
    largest = float(scale.max()) if scale.size else 0.0
    worst = ""
    if diff.size:
        index = np.unravel_index(np.argmax(diff), diff.shape)
        worst = (
            f"worst at index {tuple(int(i) for i in index)}: actual {float(a64[index])!r}, "
            f"expected {float(e64[index])!r}"
        )
    return ArrayCheck(
        name=name,
        shape=tuple(e.shape),
        max_abs_error=max_abs,
        max_rel_error=max_abs / largest if largest > 0 else max_abs,
        n_outside=int(np.count_nonzero(outside)),
        size=int(diff.size),
        worst=worst,
        rtol=rtol,
        atol=atol,
    )


def compare_trees(
    actual: Tree, expected: Tree, rtol: float, atol: float, check_dtype: bool = False
) -> list[ArrayCheck]:
    """One :class:`ArrayCheck` per layer and array (``layer 0 W``, ``layer 0 b``, ...) of two
    parameter-shaped trees (lists of ``{"W": (n_in, n_out), "b": (n_out,)}``); a missing layer
    or key is a check with a ``problem``."""
    if len(actual) != len(expected):
        problem = f"{len(actual)} layers, expected {len(expected)}"
        return [ArrayCheck("tree", (), np.inf, np.inf, problem=problem)]
    checks = []
    for i, (layer_a, layer_e) in enumerate(zip(actual, expected)):
        if set(layer_a) != set(layer_e):
            problem = f"keys {sorted(layer_a)}, expected {sorted(layer_e)}"
            checks.append(ArrayCheck(f"layer {i}", (), np.inf, np.inf, problem=problem))
            continue
        for key in sorted(layer_e, key=lambda k: (k != "W", k)):
            checks.append(
                compare_arrays(
                    f"layer {i} {key}", layer_a[key], layer_e[key], rtol, atol, check_dtype
                )
            )
    return checks
