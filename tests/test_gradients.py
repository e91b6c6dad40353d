"""The handwritten backprop (research.engine.mlp) against JAX autodiff (research.verify.reference).

Every activation × (output, loss) pairing, 1–4 hidden layers, batch 1 and more, with and without
l2, in float64 and float32: loss values, every gradient array and the forward pass must agree.

Tolerances (the ``gradients``, ``loss`` and ``forward`` rows of research/verify/compare.py's
table):

- float64: loss rtol 1e-12, gradients rtol 1e-10 / atol 1e-12. The two implementations only
  differ in summation order and in how nonlinearities are evaluated, i.e. by a few ulp (~1e-16)
  of the summands; 1e-10 leaves room for the growth of those errors through four layers and for
  entries that are sums of cancelling terms (hence the atol). The loss also gets atol 1e-14: a
  loss near 0 (a confident, correct cross-entropy) is a difference of O(|z|) numbers, so both
  implementations carry an absolute ~1e-16·|z| error that is large *relative* to the loss.
- float32: rtol 1e-4, atol 1e-5 · max(1, largest |entry| of the tree). float32 eps is 6e-8; a few
  layers of dot products of ~5 terms and the backward pass multiply that by ~10–100 (≈1e-6
  relative to the summands), and entries that come from cancellation are only accurate to that
  level *relative to the largest entries*, which is what the scaled atol expresses. Loss: rtol
  1e-5, atol 1e-6.
- The deterministic grid uses exactly these numbers. The hypothesis tests and the |z| = 1e3
  stability test may meet large pre-activations and gradients, where rounding grows with them:
  there the float64 atol is also relative to the largest gradient entry, and hypothesis cases
  multiply every tolerance by ``conditioning`` = max(1, max|z| / 10) (1 for ordinary networks).
- The forward pass alone (float64): rtol 1e-12, atol 1e-15, with no backward pass to grow the
  rounding; for hypothesis networks the atol is relative to the largest output, and both are
  multiplied by the conditioning.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from helpers import ACTIVATIONS, EXACT, OUTPUT_LOSSES, assert_close, make_targets
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from research.engine import mlp
from research.engine.mlp import MLPSpec
from research.verify import reference
from research.verify.compare import Tolerance, tolerance

Params = list[dict[str, np.ndarray]]


def largest_preactivation(params: Params, x: np.ndarray, spec: MLPSpec) -> float:
    """max |z| over every layer's pre-activations (numpy forward of the truncated networks)."""
    largest = 0.0
    for depth in range(1, len(params) + 1):
        sub = MLPSpec(spec.sizes[: depth + 1], spec.activation, "identity", "mse")
        largest = max(largest, float(np.max(np.abs(mlp.forward(params[:depth], x, sub)))))
    return largest


def conditioning(params: Params, x: np.ndarray, spec: MLPSpec) -> float:
    """How much to widen the tolerances for a network with large pre-activations: 1 up to
    |z| = 10, then |z|/10.

    Both implementations round every pre-activation to ~eps·|z| absolute, and the loss and its
    gradients depend on *differences* of those (softmax/sigmoid of z), so their relative error
    grows like eps·|z|. Hypothesis readily builds relu nets with |z| ~ 1e3–1e4, whose honest
    disagreement exceeds fixed tolerances; a real backprop mistake is off by O(1) regardless.
    """
    return max(1.0, largest_preactivation(params, x, spec) / 10.0)


def check_against_reference(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    spec: MLPSpec,
    *,
    scale_atol: bool = False,
    cond: float = 1.0,
    masks: mlp.Masks | None = None,
) -> tuple[float, Params]:
    """numpy loss/grads equal the JAX ones (tolerance by dtype); returns the numpy result.

    ``scale_atol`` scales the gradient atol by the largest |entry| in float64 too (it always is
    in float32); ``cond`` (see :func:`conditioning`) multiplies every tolerance.
    """
    dtype = params[0]["W"].dtype
    tol, loss_tol = tolerance("gradients", dtype), tolerance("loss", dtype)
    value, grads = mlp.loss_and_grads(params, x, y, spec, masks)
    ref_value, ref_grads = reference.loss_and_grads(params, x, y, spec, masks)
    assert isinstance(value, float) and math.isfinite(value), value
    loss_tol = widened(loss_tol, cond)
    assert_close(value, ref_value, loss_tol, "loss against JAX's", check_dtype=False)
    if masks is None:  # the numpy loss() must be the same objective as loss_and_grads'
        assert_close(mlp.loss(params, x, y, spec), value, loss_tol, "loss() against loss_and_grads")
    for layer in grads:
        for a in layer.values():
            assert a.dtype == dtype and np.all(np.isfinite(a))
    tol = widened(tol, cond, scale_atol=tol.scale_atol or scale_atol)
    assert_close(grads, ref_grads, tol, what=f"grads ({spec})")
    return value, grads


def widened(tol: Tolerance, cond: float, scale_atol: bool = False) -> Tolerance:
    """``tol`` with rtol and atol multiplied by ``cond`` and, with ``scale_atol``, the atol made
    relative to the largest |entry| of the tree compared."""
    return Tolerance(tol.rtol * cond, tol.atol * cond, tol.scale_atol or scale_atol)


def spec_for(activation: str, output: str, loss: str, depth: int, l2: float = 0.0) -> MLPSpec:
    """Input 4, hidden widths 5, 3, 6, 4 (cut to ``depth``), 3 outputs: all layers differ in
    shape so a transposed or misrouted array cannot go unnoticed."""
    return MLPSpec((4, *(5, 3, 6, 4)[:depth], 3), activation, output, loss, l2)


def problem(spec: MLPSpec, batch: int, seed: int, dtype: type = np.float64):
    rng = np.random.default_rng(seed)
    params = mlp.init_params(spec, seed=rng, dtype=dtype)
    x = rng.standard_normal((batch, spec.sizes[0])).astype(dtype)
    y = make_targets(rng, batch, spec.sizes[-1], spec.output, spec.loss, dtype)
    return params, x, y


# --- the full grid, deterministic --------------------------------------------------------------


@pytest.mark.parametrize("l2", [0.0, 0.1])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grid_float64(activation: str, output: str, loss_name: str, depth: int, l2: float) -> None:
    spec = spec_for(activation, output, loss_name, depth, l2)
    params, x, y = problem(spec, batch=5, seed=depth)
    check_against_reference(params, x, y, spec)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dropout_grid_float64(activation: str, output: str, loss_name: str, depth: int) -> None:
    """Dropout's gradients, with the same fixed masks on both sides (the JAX reference applies
    them in its own code): input dropout 0.2 and hidden 0.5, and each alone."""
    spec = spec_for(activation, output, loss_name, depth, 0.01)
    params, x, y = problem(spec, batch=6, seed=depth)
    rng = np.random.default_rng(depth)
    for input_dropout, dropout in ((0.2, 0.5), (0.0, 0.5), (0.4, 0.0)):
        masks = mlp.dropout_masks(rng, 6, spec.sizes, input_dropout, dropout, np.float64)
        check_against_reference(params, x, y, spec, masks=masks)
    # a mask that drops nothing changes nothing; one that drops a whole layer cuts every
    # gradient below it (but the biases of the layers above)
    ones = [np.ones((6, n)) for n in spec.sizes[:-1]]
    assert_close(
        mlp.loss_and_grads(params, x, y, spec, ones)[1],
        mlp.loss_and_grads(params, x, y, spec)[1],
        EXACT,
    )
    zeros = [None] * (spec.n_layers - 1) + [np.zeros((6, spec.sizes[-2]))]
    no_l2 = spec_for(activation, output, loss_name, depth)
    grads = mlp.loss_and_grads(params, x, y, no_l2, zeros)[1]
    assert not np.any(grads[-1]["W"]) and all(not np.any(g["W"]) for g in grads[:-1])


@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_of_one(activation: str, output: str, loss_name: str) -> None:
    spec = spec_for(activation, output, loss_name, depth=2, l2=0.05)
    params, x, y = problem(spec, batch=1, seed=11)
    check_against_reference(params, x, y, spec)


@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_keeps_dtype_and_agrees(activation: str, output: str, loss_name: str) -> None:
    spec = spec_for(activation, output, loss_name, depth=3, l2=0.1)
    params, x, y = problem(spec, batch=6, seed=5, dtype=np.float32)
    # x and y in float64 are cast to the parameters' dtype by both implementations.
    check_against_reference(params, x.astype(np.float64), y.astype(np.float64), spec)
    assert reference.forward(params, x, spec).dtype == np.float32
    assert mlp.forward(params, x, spec).dtype == np.float32


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("output", ["sigmoid", "softmax", "identity"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_agrees(activation: str, output: str, depth: int) -> None:
    spec = spec_for(activation, output, "mse", depth)
    params, x, _ = problem(spec, batch=7, seed=3)
    out = mlp.forward(params, x, spec)
    assert out.shape == (7, 3) and out.dtype == np.float64
    assert_close(out, reference.forward(params, x, spec), "forward", "forward pass")


# --- random networks, batches and parameters (hypothesis) ---------------------------------------


@st.composite
def problems(draw: st.DrawFn, dtype: type = np.float64):
    """A random (spec, params, x, y): 1–4 hidden layers of width 1–4, batch 1–6, l2 0 or not,
    every parameter, input and target drawn by hypothesis."""
    activation = draw(st.sampled_from(ACTIVATIONS))
    output, loss_name = draw(st.sampled_from(OUTPUT_LOSSES))
    depth = draw(st.integers(1, 4))
    sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=depth + 2, max_size=depth + 2)))
    batch = draw(st.integers(1, 6))
    l2 = draw(st.just(0.0) | st.floats(1e-3, 1.0))
    spec = MLPSpec(sizes, activation, output, loss_name, l2)
    width = np.dtype(dtype).itemsize * 8

    def floats(bound: float) -> st.SearchStrategy[float]:
        return st.floats(-bound, bound, width=width, allow_subnormal=False)

    params = [
        {
            "W": draw(hnp.arrays(dtype, (n_in, n_out), elements=floats(2.0))),
            "b": draw(hnp.arrays(dtype, (n_out,), elements=floats(2.0))),
        }
        for n_in, n_out in itertools.pairwise(sizes)
    ]
    x = draw(hnp.arrays(dtype, (batch, sizes[0]), elements=floats(3.0)))
    k = sizes[-1]
    if loss_name == "cross_entropy":
        labels = draw(st.lists(st.integers(0, k - 1), min_size=batch, max_size=batch))
        y = np.eye(k, dtype=dtype)[labels]
    elif loss_name == "bce":  # hard or soft labels
        y = draw(hnp.arrays(dtype, (batch, k), elements=st.floats(0, 1, width=width)))
    else:
        y = draw(hnp.arrays(dtype, (batch, k), elements=floats(2.0)))
    return spec, params, x, y


@settings(deadline=None, max_examples=30)
@given(problems(np.float64))
def test_random_networks_float64(case) -> None:
    spec, params, x, y = case
    cond = conditioning(params, x, spec)
    check_against_reference(params, x, y, spec, scale_atol=True, cond=cond)


@settings(deadline=None, max_examples=30)
@given(problems(np.float64), st.floats(0, 0.9), st.floats(0, 0.9), st.integers(0, 2**32 - 1))
def test_random_networks_with_dropout_float64(case, input_dropout, dropout, seed) -> None:
    """Any rates, any network: the same masks on both sides give the same gradients."""
    spec, params, x, y = case
    rng = np.random.default_rng(seed)
    masks = mlp.dropout_masks(rng, len(x), spec.sizes, input_dropout, dropout, np.float64)
    # masks scale what a layer reads by up to 1/(1 - rate): widen as for larger pre-activations
    cond = conditioning(params, x, spec) / (1 - max(input_dropout, dropout)) ** 2
    check_against_reference(params, x, y, spec, scale_atol=True, cond=cond, masks=masks)


@settings(deadline=None, max_examples=20)
@given(problems(np.float32))
def test_random_networks_float32(case) -> None:
    spec, params, x, y = case
    check_against_reference(params, x, y, spec, cond=conditioning(params, x, spec))


@settings(deadline=None, max_examples=15)
@given(problems(np.float64))
def test_random_forward(case) -> None:
    spec, params, x, _ = case
    out = mlp.forward(params, x, spec)
    expected = reference.forward(params, x, spec)
    cond = conditioning(params, x, spec)
    tol = widened(tolerance("forward", np.float64), cond, scale_atol=True)
    assert_close(out, expected, tol, "forward pass")


# --- numerical stability -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_huge_logits_are_finite_and_agree(
    activation: str, output: str, loss_name: str, dtype: type
) -> None:
    """Saturated hidden units (weights ×30) and output logits up to |z| = 1e3: numpy raises no
    floating-point warning, returns finite float32/64 values and still matches JAX.

    Gradient entries here reach ~1e4–1e6 (mse through identity: residuals ~1e3 times hidden
    values ~1e2), so the absolute rounding of a cancelling entry scales with them: the atol is
    relative to the largest entry (1e-12 · max|g| in float64).
    """
    spec = MLPSpec((3, 4, 4, 3), activation, output, loss_name, l2=0.01)
    params, x, y = problem(spec, batch=6, seed=7)
    for layer in params[:-1]:
        layer["W"] *= 30.0
    # Rescale the last layer so the largest logit is exactly ±1e3 (logits are linear in it).
    logits_spec = MLPSpec(spec.sizes, activation, "identity", "mse")
    z = mlp.forward(params, x, logits_spec)
    params[-1] = {key: value * (1e3 / np.max(np.abs(z))) for key, value in params[-1].items()}
    z = mlp.forward(params, x, logits_spec)
    assert np.max(np.abs(z)) == pytest.approx(1e3) and np.min(z) < -100 and np.max(z) > 100
    params = [{key: value.astype(dtype) for key, value in layer.items()} for layer in params]
    x, y = x.astype(dtype), y.astype(dtype)

    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        out = mlp.forward(params, x, spec)
        check_against_reference(params, x, y, spec, scale_atol=True)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    if output != "identity":
        assert np.all((out >= 0) & (out <= 1))


# --- the comparison itself -----------------------------------------------------------------------


def test_assert_close_names_layer_array_and_error() -> None:
    """The helper fails on values, shapes, dtypes, keys and NaN, naming the layer and array."""
    tree = [{"W": np.ones((2, 3)), "b": np.zeros(3)}, {"W": np.ones((3, 1)), "b": np.zeros(1)}]
    assert_close(tree, [dict(layer) for layer in tree], EXACT)

    def fails(actual, match: str, tol: str = "gradients") -> None:
        with pytest.raises(AssertionError, match=match):
            assert_close(actual, tree, tol, what="grads")

    off = [dict(layer) for layer in tree]
    off[1] = {"W": np.array([[1.0], [1.0 + 1e-6], [1.0]]), "b": np.zeros(1)}
    fails(
        off,
        r"grads differ:\n  layer 1 W \(3, 1\): max abs err 1\.000e-06, max rel err 1\.000e-06; "
        r"worst at index \(1, 0\): actual 1\.000001, expected 1\.0; 1 of 3 outside",
    )
    nan = [dict(layer) for layer in tree]
    nan[0] = {"W": np.ones((2, 3)), "b": np.array([0.0, np.nan, 0.0])}
    fails(nan, r"layer 0 b \(3,\): max abs err inf.*worst at index \(1,\)")
    fails([tree[0], {"W": np.ones((1, 3)), "b": np.zeros(1)}], r"layer 1 W: shape \(1, 3\)")
    fails([tree[0], {"W": np.ones((3, 1), np.float32), "b": np.zeros(1)}], r"layer 1 W: dtype")
    fails([tree[0], {"W": np.ones((3, 1))}], r"layer 1: keys \['W'\], expected \['W', 'b'\]")
    fails(tree[:1], "1 layers, expected 2")
    # "exact": the same bits, not merely equal values; a NaN equals the same NaN
    one_ulp = [dict(layer) for layer in tree]
    one_ulp[0] = {"W": np.ones((2, 3)), "b": np.array([0.0, 0.0, 5e-324])}
    assert_close(one_ulp, tree, "gradients")
    fails(one_ulp, r"layer 0 b \(3,\): max abs err 4\.941e-324", EXACT)
    negative_zero = [dict(layer) for layer in tree]
    negative_zero[0] = {"W": np.ones((2, 3)), "b": np.array([0.0, -0.0, 0.0])}
    fails(negative_zero, r"grads differ:\n  layer 0 b: equal values, other bits$", EXACT)
    fails(
        [tree[0], {"W": np.ones((3, 1), np.float32), "b": np.zeros(1)}], r"layer 1 W: dtype", EXACT
    )
    assert_close(nan, [dict(layer) for layer in nan], EXACT)


def test_assert_close_compares_arrays_and_numbers_as_it_compares_trees() -> None:
    assert_close(np.float64(0.1) + 0.2, 0.3, "same_operations", "a sum")
    with pytest.raises(
        AssertionError, match=r"a sum differ:\n  a sum \(\): max abs err 5\.551e-17"
    ):
        assert_close(0.1 + 0.2, 0.3, EXACT, "a sum")
    x = np.linspace(0.0, 1.0, 5)
    assert_close(x, x.copy(), EXACT, "x")
    with pytest.raises(AssertionError, match=r"x: shape \(4,\), expected \(5,\)"):
        assert_close(x[:4], x, "forward", "x")
    with pytest.raises(AssertionError, match=r"x: dtype float32, expected float64"):
        assert_close(x.astype(np.float32), x, "forward", "x")
    assert_close(x.astype(np.float32), x, "loss", "x", check_dtype=False)  # the float64 row
    # the row of the table is the expected value's dtype's; a kind without it is refused
    with pytest.raises(ValueError, match="no trajectory tolerance for float32"):
        assert_close(x.astype(np.float32), x.astype(np.float32), "trajectory", "x")
