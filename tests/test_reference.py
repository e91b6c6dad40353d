"""Values that autodiff cannot vouch for, and the JAX reference checked on its own.

Agreement of two implementations proves little if both share a mistake in the *forward* value, so
here the losses are compared with hand-computed numbers, and the reference's gradients with
central finite differences of its own loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import ACTIVATIONS, OUTPUT_LOSSES, assert_close, make_targets

from research.engine import mlp
from research.engine.mlp import MLPSpec
from research.verify import reference

IMPLEMENTATIONS = {"numpy": mlp, "jax": reference}
impl_names = pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))


def zeros_like(params):
    return [{key: np.zeros_like(value) for key, value in layer.items()} for layer in params]


# --- hand-computed values ------------------------------------------------------------------------


@impl_names
@pytest.mark.parametrize(("activation", "k"), [("sigmoid", 2), ("tanh", 3), ("relu", 10)])
def test_zero_network_cross_entropy_is_log_k(impl: str, activation: str, k: int) -> None:
    """All-zero weights and biases give uniform outputs: cross-entropy log(k), exactly."""
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((3, 4, k), activation, "softmax", "cross_entropy")
    params = zeros_like(mlp.init_params(spec))
    rng = np.random.default_rng(k)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3))
        labels = rng.integers(0, k, size=batch)
        y = np.eye(k)[labels]
        value, grads = module.loss_and_grads(params, x, y, spec)
        if batch == 1:
            assert value == math.log(k)
            assert module.loss(params, x, y, spec) == math.log(k)
        else:  # one rounding in the batch sum
            assert_close(value, math.log(k), "few_roundings", "log k")
        assert_close(
            module.forward(params, x, spec), np.full((batch, k), 1 / k), "few_roundings", "1/k"
        )
        # ∂/∂b of the last layer is the batch mean of softmax − y = 1/k − y.
        # (atol: 1/k is not a float; exp(−log k) is off by an ulp, and Σ over the batch keeps it)
        assert_close(grads[-1]["b"], 1 / k - y.mean(axis=0), "few_roundings", "∂b")


@impl_names
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_rows_sum_to_one(impl: str, dtype: type) -> None:
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((5, 6, 4), "tanh", "softmax", "cross_entropy")
    params = mlp.init_params(spec, seed=2, dtype=dtype)
    params[-1] = {key: value * dtype(100) for key, value in params[-1].items()}  # logits ~1e2
    x = np.random.default_rng(2).standard_normal((9, 5)).astype(dtype)
    out = module.forward(params, x, spec)
    assert out.dtype == dtype and out.shape == (9, 4)
    assert np.all((out >= 0) & (out <= 1))
    assert_close(out.sum(axis=1), np.ones(9, dtype), "sums_to_one", "row sums")
    assert np.max(out) > 0.99  # the scale really made the rows peaked


# A 1-layer identity network: z = x W + b with W = [[1, 2], [3, 4]], b = [0.5, −1],
# x = [[1, 1], [0, 2]], y = [[0, 0], [1, 1]].
#   z = [[4.5, 5], [6.5, 7]], residual z − y = [[4.5, 5], [5.5, 6]]
#   loss = (1/2)·½·(4.5² + 5² + 5.5² + 6²) = ¼·111.5 = 27.875
#   ∂loss/∂z = residual / 2 = [[2.25, 2.5], [2.75, 3]]
#   ∂W = xᵀ ∂z = [[2.25, 2.5], [7.75, 8.5]],  ∂b = [5, 5.5]
# l2 = 0.1 adds 0.05·(1 + 4 + 9 + 16) = 1.5 to the loss and 0.1·W to ∂W.
HAND_MSE = {
    "params": [{"W": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([0.5, -1.0])}],
    "x": np.array([[1.0, 1.0], [0.0, 2.0]]),
    "y": np.array([[0.0, 0.0], [1.0, 1.0]]),
    "loss": 27.875,
    "grads": [{"W": np.array([[2.25, 2.5], [7.75, 8.5]]), "b": np.array([5.0, 5.5])}],
}


@impl_names
@pytest.mark.parametrize("l2", [0.0, 0.1])
def test_mse_hand_computed(impl: str, l2: float) -> None:
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((2, 2), "sigmoid", "identity", "mse", l2=l2)
    case = HAND_MSE
    W = case["params"][0]["W"]
    expected_grads = [{"W": case["grads"][0]["W"] + l2 * W, "b": case["grads"][0]["b"]}]
    expected_loss = case["loss"] + 0.5 * l2 * 30.0
    value, grads = module.loss_and_grads(case["params"], case["x"], case["y"], spec)
    assert_close(value, expected_loss, "few_roundings", "hand mse loss")
    loss = module.loss(case["params"], case["x"], case["y"], spec)
    assert_close(loss, expected_loss, "few_roundings", "hand mse loss()")
    assert_close(grads, expected_grads, "few_roundings", what="hand mse grads")
    np.testing.assert_array_equal(
        module.forward(case["params"], case["x"], spec), [[4.5, 5.0], [6.5, 7.0]]
    )


@impl_names
def test_bce_hand_computed(impl: str) -> None:
    """One sigmoid unit with z = ln 3, so σ(z) = 3/4, on targets 1 and 0:
    loss = ½(−ln ¾ − ln ¼) = ½ ln(16/3); ∂z = (σ − y)/2 = [−1/8, 3/8]; ∂W = ∂b = 1/4."""
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((1, 1), "sigmoid", "sigmoid", "bce")
    params = [{"W": np.array([[math.log(3.0)]]), "b": np.array([0.0])}]
    x, y = np.array([[1.0], [1.0]]), np.array([[1.0], [0.0]])
    value, grads = module.loss_and_grads(params, x, y, spec)
    assert_close(value, 0.5 * math.log(16 / 3), "few_roundings", "hand bce loss")
    assert_close(
        module.forward(params, x, spec), np.array([[0.75], [0.75]]), "few_roundings", "σ(z)"
    )
    expected = [{"W": np.array([[0.25]]), "b": np.array([0.25])}]
    assert_close(grads, expected, "few_roundings", what="hand bce grads")


@impl_names
def test_bce_and_cross_entropy_from_logits_at_extremes(impl: str) -> None:
    """Confidently wrong at |z| = 800: the losses are the logit gaps (800), not inf or NaN,
    and the gradients are the bounded σ(z) − y and softmax − y."""
    module = IMPLEMENTATIONS[impl]
    x = np.array([[1.0]])
    bce = MLPSpec((1, 1), "relu", "sigmoid", "bce")
    value, grads = module.loss_and_grads(
        [{"W": np.array([[-800.0]]), "b": np.zeros(1)}], x, [[1.0]], bce
    )
    assert value == 800.0
    assert grads[0]["b"][0] == -1.0
    ce = MLPSpec((1, 2), "relu", "softmax", "cross_entropy")
    params = [{"W": np.array([[800.0, 0.0]]), "b": np.zeros(2)}]
    value, grads = module.loss_and_grads(params, x, np.array([[0.0, 1.0]]), ce)
    assert value == 800.0
    np.testing.assert_array_equal(grads[0]["b"], [1.0, -1.0])


@impl_names
def test_cross_entropy_hand_computed(impl: str) -> None:
    """Logits (0, ln 2, ln 5) give softmax (1, 2, 5)/8; with label 2 the loss is ln(8/5) and
    ∂b = softmax − y = (1/8, 2/8, −3/8)."""
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((1, 3), "tanh", "softmax", "cross_entropy")
    params = [{"W": np.zeros((1, 3)), "b": np.log([1.0, 2.0, 5.0])}]
    x, y = np.array([[0.0]]), np.array([[0.0, 0.0, 1.0]])
    value, grads = module.loss_and_grads(params, x, y, spec)
    assert_close(value, math.log(8 / 5), "few_roundings", "hand cross-entropy")
    assert_close(grads[0]["b"], np.array([0.125, 0.25, -0.375]), "few_roundings", "∂b")
    softmax = np.array([[0.125, 0.25, 0.625]])
    assert_close(module.forward(params, x, spec), softmax, "few_roundings", "softmax")


@impl_names
def test_relu_derivative_at_zero_is_zero(impl: str) -> None:
    """Both implementations use relu'(0) = 0 (jnp.maximum would give ½ in the reference)."""
    module = IMPLEMENTATIONS[impl]
    spec = MLPSpec((2, 3, 2), "relu", "identity", "mse")
    params = [
        {"W": np.ones((2, 3)), "b": np.zeros(3)},
        {"W": np.arange(6.0).reshape(3, 2), "b": np.zeros(2)},
    ]
    x, y = np.zeros((1, 2)), np.ones((1, 2))  # every hidden pre-activation is exactly 0
    _, grads = module.loss_and_grads(params, x, y, spec)
    np.testing.assert_array_equal(grads[0]["b"], np.zeros(3))
    np.testing.assert_array_equal(grads[1]["b"], [-1.0, -1.0])


# --- finite differences of the reference itself --------------------------------------------------


def central_differences(params, x, y, spec: MLPSpec, step: float) -> list[dict[str, np.ndarray]]:
    """∂loss/∂θ for every parameter entry by (L(θ + h) − L(θ − h)) / 2h on reference.loss."""
    grads = []
    for i, layer in enumerate(params):
        layer_grads = {}
        for key, value in layer.items():
            g = np.zeros_like(value)
            for index in np.ndindex(value.shape):
                values = []
                for sign in (1.0, -1.0):
                    shifted = [dict(layer_) for layer_ in params]
                    shifted[i][key] = value.copy()
                    shifted[i][key][index] += sign * step
                    values.append(reference.loss(shifted, x, y, spec))
                g[index] = (values[0] - values[1]) / (2 * step)
            layer_grads[key] = g
        grads.append(layer_grads)
    return grads


@pytest.mark.parametrize(("output", "loss_name"), OUTPUT_LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_gradients_match_finite_differences(
    activation: str, output: str, loss_name: str
) -> None:
    """Central differences, step 1e-6, in float64 on a tiny 2-hidden-layer net with l2.

    Truncation error is ~h²·L''' ≈ 1e-12 and rounding ~eps·|L|/h ≈ 1e-10, so rtol 1e-6 with
    atol 1e-8 is loose for a correct gradient but far below the size of any real mistake.
    """
    spec = MLPSpec((3, 4, 3, 3), activation, output, loss_name, l2=0.2)
    rng = np.random.default_rng(17)
    params = mlp.init_params(spec, seed=rng, scheme="xavier")
    for layer in params:  # non-zero biases, so they matter
        layer["b"] = rng.standard_normal(layer["b"].shape)
    x = rng.standard_normal((4, 3))
    y = make_targets(rng, 4, 3, output, loss_name)
    value, grads = reference.loss_and_grads(params, x, y, spec)
    assert_close(value, reference.loss(params, x, y, spec), "few_roundings", "loss")
    numeric = central_differences(params, x, y, spec, step=1e-6)
    assert_close(grads, numeric, "finite_differences", what="reference vs finite differences")


# --- the API -------------------------------------------------------------------------------------


def test_outputs_are_writable_numpy_in_the_params_dtype() -> None:
    spec = MLPSpec((3, 4, 2), "tanh", "sigmoid", "bce", l2=0.1)
    for dtype in (np.float32, np.float64):
        params = mlp.init_params(spec, seed=0, dtype=dtype)
        x = np.ones((2, 3))  # float64 inputs are cast to the parameters' dtype
        y = np.array([[0.0, 1.0], [1.0, 1.0]])
        value, grads = reference.loss_and_grads(params, x, y, spec)
        assert type(value) is float and type(reference.loss(params, x, y, spec)) is float
        assert len(grads) == 2 and all(set(g) == {"W", "b"} for g in grads)
        for g, p in zip(grads, params, strict=True):
            for key in ("W", "b"):
                assert type(g[key]) is np.ndarray and g[key].dtype == dtype
                assert g[key].shape == p[key].shape and g[key].flags.writeable
        out = reference.forward(params, x, spec)
        assert type(out) is np.ndarray and out.dtype == dtype and out.shape == (2, 2)


def test_bad_shapes_are_rejected() -> None:
    spec = MLPSpec((3, 4, 2), "tanh", "identity", "mse")
    params = mlp.init_params(spec)
    with pytest.raises(ValueError, match="layers"):
        reference.loss(params[:1], np.ones((2, 3)), np.ones((2, 2)), spec)
    with pytest.raises(ValueError, match=r"layer 1"):
        bad = [params[0], {"W": params[1]["W"].T, "b": params[1]["b"]}]
        reference.loss_and_grads(bad, np.ones((2, 3)), np.ones((2, 2)), spec)
    with pytest.raises(ValueError, match="x has shape"):
        reference.forward(params, np.ones((2, 4)), spec)
    with pytest.raises(ValueError, match="y has shape"):
        reference.loss_and_grads(params, np.ones((2, 3)), np.ones((2,)), spec)


@pytest.fixture
def fresh_compile_cache():
    """Empties the reference's compiled-function cache and its bookkeeping, before and after."""
    reference._compiled.cache_clear()
    reference._compiled_keys.clear()
    yield
    reference._compiled.cache_clear()
    reference._compiled_keys.clear()


@pytest.mark.usefixtures("fresh_compile_cache")
def test_specs_differing_only_in_l2_share_the_compiled_function() -> None:
    base = MLPSpec((3, 2), "relu", "identity", "mse")
    params, x, y = mlp.init_params(base), np.ones((7, 3)), np.zeros((7, 2))
    for l2 in (0.0, 0.5, 2.0):
        spec = MLPSpec(base.sizes, base.activation, base.output, base.loss, l2=l2)
        value, _ = reference.loss_and_grads(params, x, y, spec)
        assert_close(value, mlp.loss(params, x, y, spec), "loss", f"loss at l2 {l2}")
    compiled = reference._compiled(base.activation, base.output, base.loss)
    assert compiled.value_and_grad._cache_size() == 1
    assert len(reference._compiled_keys) == 1


@pytest.mark.usefixtures("fresh_compile_cache")
def test_compiled_functions_are_dropped_past_the_limit(monkeypatch) -> None:
    """XLA:CPU holds ~70 memory mappings per executable; without a bound, ~900 compilations in
    one process exhaust vm.max_map_count (65530) and the compiler segfaults."""
    monkeypatch.setattr(reference, "_MAX_COMPILED", 2)
    spec = MLPSpec((2, 2), "tanh", "identity", "mse")
    params = mlp.init_params(spec)
    first = reference._compiled(spec.activation, spec.output, spec.loss)
    for batch in (1, 2, 3):
        x, y = np.ones((batch, 2)), np.zeros((batch, 2))
        value, _ = reference.loss_and_grads(params, x, y, spec)
        assert_close(value, mlp.loss(params, x, y, spec), "loss", f"loss at batch {batch}")
    assert len(reference._compiled_keys) == 1  # cleared at the third shape, then re-added
    assert reference._compiled(spec.activation, spec.output, spec.loss) is not first
