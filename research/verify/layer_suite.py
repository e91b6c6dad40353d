"""The whole bar a layer must pass, ours or a researcher's own: ``python -m research verify-layer``.

:func:`check_layer` runs, at each input shape and in each mode the layer has (training and
evaluation when its forward takes ``training``):

1. **autodiff, float64**: the output and the handwritten backward against ``jax.vjp`` of the
   reference (a built-in's independent one; a user layer's own forward under ``jax.numpy``), to
   the tolerance table's 1e-10 (:func:`~.layer_check.verify_layer`);
2. **finite differences, float64**: the gradient of ⟨dy, y⟩ along random directions, for x and
   each parameter, against central differences of the numpy forward pass (no JAX involved);
3. **autodiff, float32**: as 1, in float32, at the table's float32 tolerances;
4. **non-contiguous inputs**: as 1, with x, dy and the parameters in strided memory; and for
   images (C, H, W), with x in channels-last memory (what a conv hands on);
5. **per sample**: where the layer does not couple the batch (each example's output is the one it
   gets alone), each example's input gradient alone against its row of the batched one, and the
   parameter gradients summed over examples against the batched ones;
6. **inputs unchanged**: x, the parameters, dy and the state are bit for bit what they were
   after forward and backward.

Every compared array is one row (:class:`~.compare.ArrayCheck`): its worst error, where, and both
values. :func:`format_report` prints them as tables.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.engine.layers.base import Layer, Shape, describe, needs, shape_problem
from research.verify.compare import ArrayCheck, compare_arrays, tolerance
from research.verify.layer_check import (
    away_from_kinks,
    draw_extras,
    noisy_params,
    verify_layer,
)

#: Input shapes (one example, no batch axis) a layer is checked at unless told otherwise: rows of
#: features, and small odd-sized images (C, H, W).
DEFAULT_SHAPES: tuple[Shape, ...] = ((6,), (3, 6, 5))
#: Central differences: the step along a unit direction, and the directions per array.
FD_STEP = 1e-6
FD_DIRECTIONS = 3


@dataclass(frozen=True)
class Section:
    """One check at one shape and mode: its rows, or why it was not run."""

    check: str  # e.g. "autodiff float64"
    in_shape: Shape
    mode: str  # "training", "evaluation" or "" (a layer without modes)
    rows: tuple[ArrayCheck, ...] = ()
    skipped: str = ""  # why the check does not apply (the layer couples the batch)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def title(self) -> str:
        mode = f", {self.mode}" if self.mode else ""
        return f"{self.check}, input {self.in_shape}{mode}"


@dataclass(frozen=True)
class LayerReport:
    """Everything :func:`check_layer` found about one layer."""

    layer: str
    sections: tuple[Section, ...]
    #: Shapes not checked and why (the layer refused them), when the caller did not choose them.
    shapes_skipped: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return bool(self.sections) and all(section.passed for section in self.sections)

    def failures(self) -> list[str]:
        """One line per failing row: the section, then the row's own description."""
        return [
            f"{section.title}: {row.describe()}"
            for section in self.sections
            for row in section.rows
            if not row.passed
        ]


class LayerUnusable(Exception):
    """The layer cannot be checked at all (no shape it takes, a forward that raises); the
    message is one line. ``verify-layer`` exits 2 on it."""


def check_layer(
    layer: Layer,
    shapes: Sequence[Shape] | None = None,
    *,
    batch: int = 4,
    seed: int = 0,
    reference: Callable[..., Any] | None = None,
) -> LayerReport:
    """Runs every check of the module's list on ``layer``.

    Args:
        layer: an object following the layer contract (:mod:`research.engine.layers.base`).
        shapes: input shapes (one example, no batch axis); default :data:`DEFAULT_SHAPES`,
            skipping those the layer refuses (its ``check``, or an error from ``init`` or
            ``forward``). A shape given here that the layer refuses makes it unusable.
        batch: examples per batch (B).
        seed: draws of inputs, parameters, dy, masks and directions.
        reference: ``reference(params, x, **extras) -> y`` in JAX (default: as
            :func:`~.layer_check.verify_layer` chooses).
    Returns:
        A :class:`LayerReport`.
    Raises:
        LayerUnusable: no shape can be checked; the message says why, in one line.
    """
    chosen = shapes is not None
    usable, skipped = [], []
    for shape in shapes if chosen else DEFAULT_SHAPES:
        shape = tuple(int(n) for n in shape)
        problem = _refusal(layer, shape)
        if problem is None:
            usable.append(shape)
        elif chosen:
            raise LayerUnusable(f"{describe(layer)} cannot take input shape {shape}: {problem}")
        else:
            skipped.append(f"{shape}: {problem}")
    if not usable:
        raise LayerUnusable(
            f"{describe(layer)} takes none of the shapes tried ({'; '.join(skipped)}); "
            "give the shapes it takes with --shape"
        )
    modes = (True, False) if "training" in needs(layer) else (None,)
    sections: list[Section] = []
    for shape in usable:
        for training in modes:
            sections += _sections(layer, shape, training, batch, seed, reference)
    return LayerReport(describe(layer), tuple(sections), tuple(skipped))


def _refusal(layer: Layer, shape: Shape) -> str | None:
    """Why ``layer`` cannot take ``shape`` (its own ``check``, or what its init or forward
    raised on a zero batch of two), or None."""
    try:
        problem = shape_problem(layer, shape)
        if problem:
            return problem
        rng = np.random.default_rng(0)
        params = layer.init(rng, shape, np.float64)
        x = np.zeros((2, *shape))
        extras = draw_extras(layer, rng, x, np.dtype(np.float64), training=True)
        if not isinstance(params, dict):
            return f"init returned {type(params).__name__}, not a dict of arrays ({{}} for none)"
        out = layer.forward(params, x, np, **extras)
    except Exception as error:  # the user's code: any error means it cannot run here
        return f"{type(error).__name__}: {error}".splitlines()[0]
    if not (isinstance(out, tuple) and len(out) == 2):
        return "forward must return (y, cache), a pair"
    if np.ndim(out[0]) < 1 or np.shape(out[0])[0] != 2:
        return f"forward's y has shape {np.shape(out[0])}, not (B, ...) for a batch of B = 2"
    return None


def _sections(
    layer: Layer,
    shape: Shape,
    training: bool | None,
    batch: int,
    seed: int,
    reference: Callable[..., Any] | None,
) -> list[Section]:
    mode = "" if training is None else ("training" if training else "evaluation")
    options = {
        "batch": batch,
        "seed": seed,
        "training": bool(training) if training is not None else True,
        "reference": reference,
    }

    def autodiff(**more: Any) -> tuple[ArrayCheck, ...]:
        return verify_layer(layer, shape, **options, **more).checks

    checks: list[tuple[str, Callable[[], Any]]] = [
        ("autodiff float64", autodiff),
        ("finite differences float64", lambda: _finite_differences(layer, shape, options)),
        ("autodiff float32", lambda: autodiff(dtype=np.float32)),
        ("non-contiguous inputs, float64", lambda: autodiff(contiguous=False)),
        *(
            [("channels-last inputs, float64", lambda: autodiff(sample=channels_last))]
            if len(shape) == 3
            else []
        ),
        ("per sample against batched, float64", lambda: _per_sample(layer, shape, options)),
        ("inputs unchanged", lambda: _unchanged(layer, shape, options)),
    ]
    sections = []
    for name, run in checks:
        try:
            found = run()
        except Exception as error:  # the layer's code raised in this check: it fails it
            text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            if type(error).__module__.startswith("jax") or "Tracer" in text:
                raise LayerUnusable(
                    f"{describe(layer)}: its forward does not run under jax.numpy ({text}); "
                    "write it with the xp it is given (xp.exp, xp.maximum, x.reshape), not "
                    "numpy's functions"
                ) from None
            found = (ArrayCheck("the layer's code", (), np.inf, np.inf, problem=f"raised {text}"),)
        if isinstance(found, str):  # a check that does not apply, and why
            sections.append(Section(name, shape, mode, skipped=found))
        else:
            sections.append(Section(name, shape, mode, tuple(found)))
    return sections


def channels_last(rng: np.random.Generator, shape: Shape, dtype: Any) -> np.ndarray:
    """Inputs (B, C, H, W) laid out channels-last in memory, as a conv hands them on (the image
    layers choose their loops by the memory layout)."""
    x = away_from_kinks(rng, shape, dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _draw(
    layer: Layer, shape: Shape, options: dict[str, Any], dtype: Any = np.float64
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any], np.random.Generator]:
    """Parameters, a batch and the forward's extras, drawn as the autodiff check draws them."""
    rng = np.random.default_rng([options["seed"], 7])
    dtype = np.dtype(dtype)
    params = noisy_params(layer, rng, shape, dtype)
    x = away_from_kinks(rng, (options["batch"], *shape), dtype)
    extras = draw_extras(layer, rng, x, dtype, options["training"])
    return params, x, extras, rng


def _finite_differences(layer: Layer, shape: Shape, options: dict[str, Any]) -> tuple:
    """⟨∂L/∂a, u⟩ from the backward pass against (L(a + h·u) − L(a − h·u)) / 2h for a few unit
    directions u per array a (x, each parameter), L = ⟨dy, forward(params, x)⟩ in float64.

    Central differences carry ~h²·L''' truncation and ~eps·|L|/h rounding error: rtol 1e-6 as
    the table's ``finite_differences``, its atol scaled by max(1, Σ|dy·y|)."""
    params, x, extras, rng = _draw(layer, shape, options)
    y, cache = layer.forward(params, x, np, **extras)
    dy = rng.standard_normal(np.shape(y))
    dx, grads = layer.backward(params, cache, dy.copy())  # (mutating dy is another check's)
    arrays = {"x": (x, dx), **{key: (params[key], grads.get(key)) for key in sorted(params)}}
    tol = tolerance("finite_differences", np.float64)
    atol = tol.atol * max(1.0, float(np.sum(np.abs(dy * y))))

    def objective(name: str, value: np.ndarray) -> float:
        p = {**params, name: value} if name != "x" else params
        out, _ = layer.forward(p, value if name == "x" else x, np, **extras)
        return float(np.sum(dy * out))

    rows = []
    for name, (value, gradient) in arrays.items():
        label = "input gradient dx" if name == "x" else f"gradient {name}"
        if gradient is None or np.shape(gradient) != np.shape(value):
            got = "none" if gradient is None else f"shape {np.shape(gradient)}"
            problem = f"{got}, expected shape {np.shape(value)}"
            rows.append(ArrayCheck(label, np.shape(value), np.inf, np.inf, problem=problem))
            continue
        ours, theirs = [], []
        for _ in range(FD_DIRECTIONS):
            u = rng.standard_normal(np.shape(value))
            u /= np.linalg.norm(u)
            ours.append(float(np.sum(np.asarray(gradient) * u)))
            step = FD_STEP * u
            theirs.append(
                (objective(name, value + step) - objective(name, value - step)) / (2 * FD_STEP)
            )
        rows.append(
            compare_arrays(
                f"{label} along {FD_DIRECTIONS} directions", ours, theirs, tol.rtol, atol
            )
        )
    return tuple(rows)


def _per_sample(
    layer: Layer, shape: Shape, options: dict[str, Any]
) -> tuple[ArrayCheck, ...] | str:
    """Each example alone against its row of the batch, when the layer does not couple them
    (else why not, as text)."""
    params, x, extras, rng = _draw(layer, shape, options)
    y, cache = layer.forward(params, x, np, **extras)
    dy = rng.standard_normal(np.shape(y))
    dx, grads = layer.backward(params, cache, dy.copy())
    tol = tolerance("gradients", np.float64)
    alone_y, alone_dx, alone_grads = [], [], []
    for i in range(len(x)):
        one = _example(extras, i, len(x))
        yi, cache_i = layer.forward(params, x[i : i + 1], np, **one)
        alone_y.append(np.asarray(yi))
        dxi, gi = layer.backward(params, cache_i, dy[i : i + 1].copy())
        alone_dx.append(np.asarray(dxi))
        alone_grads.append(gi)
    output = compare_arrays("output y", np.concatenate(alone_y), y, *tol.for_tree([{"y": y}]))
    if not output.passed:
        return (
            "skipped: the layer couples the batch (an example's output alone differs from its row)"
        )
    rows = [
        compare_arrays(
            "input gradient dx", np.concatenate(alone_dx), dx, *tol.for_tree([{"dx": dx}])
        )
    ]
    for key in sorted(params):
        if key not in grads or any(key not in g for g in alone_grads):
            rows.append(
                ArrayCheck(
                    f"gradient {key}", np.shape(params[key]), np.inf, np.inf, problem="no gradient"
                )
            )
            continue
        summed = np.sum([np.asarray(g[key]) for g in alone_grads], axis=0)
        rows.append(
            compare_arrays(
                f"gradient {key} (sum over examples)",
                summed,
                grads[key],
                *tol.for_tree([{"g": grads[key]}]),
            )
        )
    return tuple(rows)


def _example(extras: dict[str, Any], i: int, batch: int) -> dict[str, Any]:
    """The forward's extras for example ``i`` alone: arrays with a batch axis (a dropout mask)
    sliced to it, the rest (mode, running statistics) as they are."""

    def one(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray) and leaf.ndim and leaf.shape[0] == batch:
            return leaf[i : i + 1]
        return leaf

    return {
        key: (value if key in ("training", "state") else _map(one, value))
        for key, value in extras.items()
    }


def _map(function: Callable[[Any], Any], tree: Any) -> Any:
    """``function`` on every leaf of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        return {key: _map(function, value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(function, value) for value in tree)
    return function(tree)


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) of nested dicts, lists and tuples: ``['0.mean']``, ``[1]``."""
    if isinstance(tree, dict):
        return [pair for key, value in tree.items() for pair in _leaves(value, f"{path}[{key!r}]")]
    if isinstance(tree, (list, tuple)):
        return [pair for i, value in enumerate(tree) for pair in _leaves(value, f"{path}[{i}]")]
    return [(path, tree)]


def _unchanged(layer: Layer, shape: Shape, options: dict[str, Any]) -> tuple[ArrayCheck, ...]:
    """x, the parameters, dy and the forward's extras, after forward and backward, against
    copies taken before: any difference in any bit is a mutated input."""
    params, x, extras, rng = _draw(layer, shape, options)
    before = copy.deepcopy((params, x, extras))
    y, cache = layer.forward(params, x, np, **extras)
    dy = rng.standard_normal(np.shape(y))
    dy_before = dy.copy()
    layer.backward(params, cache, dy)
    rows = [_same("x", x, before[1]), _same("dy", dy, dy_before)]
    rows += [_same(f"parameter {key}", params[key], before[0][key]) for key in sorted(params)]
    rows += _same_tree("state", extras.get("state"), before[2].get("state"))
    rows += _same_tree("mask", extras.get("mask"), before[2].get("mask"))
    return tuple(rows)


def _same(name: str, after: Any, before: Any) -> ArrayCheck:
    row = compare_arrays(name, after, before, 0.0, 0.0)
    if row.passed:
        return row
    return ArrayCheck(
        name,
        row.shape,
        row.max_abs_error,
        row.max_rel_error,
        row.n_outside,
        row.size,
        row.worst,
        problem=(
            f"changed by the layer ({row.n_outside} of {row.size} elements; "
            f"{row.worst.replace('expected', 'before')})"
        ),
    )


def _same_tree(name: str, after: Any, before: Any) -> list[ArrayCheck]:
    return [
        _same(f"{name}{path}", leaf, previous)
        for (path, leaf), (_, previous) in zip(_leaves(after), _leaves(before))
        if isinstance(leaf, np.ndarray)
    ]


# --- the printed report ----------------------------------------------------------------------


def format_report(report: LayerReport, brief: bool = False) -> str:
    """The report as text: one line per check (``ok`` or ``FAILED``, its worst relative error and
    tolerance), and below it the table of its arrays (with ``brief``, only a failing check's),
    then the verdict."""
    lines = [f"verify-layer {report.layer}"]
    lines += [f"  shape {skipped} (not checked)" for skipped in report.shapes_skipped]
    for section in report.sections:
        if section.skipped:
            lines.append(f"  -       {section.title}: {section.skipped}")
            continue
        worst = max((row.max_rel_error for row in section.rows), default=0.0)
        rtol = max((row.rtol for row in section.rows), default=0.0)
        verdict = "ok     " if section.passed else "FAILED "
        lines.append(
            f"  {verdict} {section.title}: {len(section.rows)} arrays, worst relative error "
            f"{worst:.1e} (rtol {rtol:g})"
        )
        if not brief or not section.passed:
            lines.append(_table(section.rows))
    n_failed = sum(not row.passed for s in report.sections for row in s.rows)
    n_rows = sum(len(s.rows) for s in report.sections)
    if report.passed:
        lines.append(f"PASSED: {n_rows} arrays in {len(report.sections)} checks agree")
    else:
        lines.append(f"FAILED: {n_failed} of {n_rows} arrays disagree")
    return "\n".join(lines)


def _table(rows: Sequence[ArrayCheck]) -> str:
    header = ("array", "shape", "max abs err", "max rel err", "worst at: ours vs reference", "")
    body = []
    for row in rows:
        if row.problem:
            body.append((row.name, str(row.shape), "-", "-", row.problem, "FAIL"))
            continue
        where = (
            row.worst.replace("worst at index ", "")
            .replace(": actual ", ": ")
            .replace(", expected ", " vs ")
        )
        body.append(
            (
                row.name,
                str(row.shape),
                f"{row.max_abs_error:.2e}",
                f"{row.max_rel_error:.2e}",
                where,
                "ok" if row.passed else "FAIL",
            )
        )
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return "\n".join(
        "      " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
        for r in (header, *body)
    )
