"""The public API of research.engine.mlp and research.engine.optim: validation, init, dtypes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers import assert_close

from research.engine.mlp import MLPSpec, forward, init_params, loss_and_grads, predict
from research.engine.optim import adam, make_optimizer, momentum, sgd
from research.experiment.config.presets import PRESETS

# The origin program's network ([784, 30, 10], sigmoid everywhere, squared error), as its
# preset has it.
ORIGIN = PRESETS["origin"].spec()


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"activation": "gelu"}, "activation", "gelu"),
        ({"output": "tanh"}, "output", "tanh"),
        ({"loss": "hinge"}, "loss", "hinge"),
        ({"loss": "cross_entropy", "output": "sigmoid"}, "loss", "cross_entropy"),
        ({"loss": "bce", "output": "softmax"}, "loss", "bce"),
        ({"l2": -0.1}, "l2", "-0.1"),
        ({"l2": float("nan")}, "l2", "nan"),
        ({"sizes": (784,)}, "sizes", "784"),
        ({"sizes": (784, 0, 10)}, "sizes", "0"),
        ({"sizes": (784, 2.5, 10)}, "sizes", "2.5"),
    ],
)
def test_spec_rejects_bad_values_naming_field_and_value(kwargs, field, value):
    base = {"sizes": (4, 3, 2), "activation": "relu", "output": "sigmoid", "loss": "mse"}
    with pytest.raises(ValueError, match=field) as error:
        MLPSpec(**{**base, **kwargs})
    assert value in str(error.value)


def test_spec_is_frozen_and_hashable():
    spec = ORIGIN
    assert spec.sizes == (784, 30, 10)
    assert hash(spec) == hash(ORIGIN)
    with pytest.raises(AttributeError):
        spec.l2 = 1.0  # type: ignore[misc]
    assert spec.n_params == 784 * 30 + 30 + 30 * 10 + 10


@pytest.mark.parametrize("scheme", ["normal", "xavier", "he"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_shapes_dtype_and_seeding(scheme, dtype):
    spec = MLPSpec((50, 40, 30, 10), "relu", "softmax", "cross_entropy")
    params = init_params(spec, seed=3, dtype=dtype, scheme=scheme)
    assert [(p["W"].shape, p["b"].shape) for p in params] == [
        ((50, 40), (40,)),
        ((40, 30), (30,)),
        ((30, 10), (10,)),
    ]
    assert all(p["W"].dtype == dtype and p["b"].dtype == dtype for p in params)
    again = init_params(spec, seed=3, dtype=dtype, scheme=scheme)
    other = init_params(spec, seed=4, dtype=dtype, scheme=scheme)
    assert all(np.array_equal(a["W"], b["W"]) for a, b in zip(params, again))
    assert not np.array_equal(params[0]["W"], other[0]["W"])


def test_init_scales():
    spec = MLPSpec((400, 300, 10), "relu", "softmax", "cross_entropy")
    normal = init_params(spec, scheme="normal")[0]["W"]
    he = init_params(spec, scheme="he")[0]["W"]
    xavier = init_params(spec, scheme="xavier")[0]["W"]
    assert abs(normal.std() - 1) < 0.01
    assert abs(he.std() - np.sqrt(2 / 400)) < 0.001
    assert np.abs(xavier).max() <= np.sqrt(6 / 700)
    with pytest.raises(ValueError, match="lecun"):
        init_params(spec, scheme="lecun")


def test_no_global_random_state_is_used():
    np.random.seed(0)  # noqa: NPY002 -- checking that nothing touches the legacy global state
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    init_params(ORIGIN, seed=1)
    assert np.array_equal(before, np.random.get_state()[1])  # noqa: NPY002


def test_functions_are_pure():
    spec = MLPSpec((6, 5, 3), "tanh", "softmax", "cross_entropy", l2=0.1)
    params = init_params(spec, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((4, 6))
    y = np.eye(3)[[0, 1, 2, 0]]
    snapshot = copy.deepcopy(params)
    _, grads = loss_and_grads(params, x, y, spec)
    for optimizer in (sgd(0.1), momentum(0.1, nesterov=True), adam(0.01)):
        state = optimizer.init(params)
        new, _ = optimizer.update(params, grads, state)
        assert not np.array_equal(new[0]["W"], params[0]["W"])
    for a, b in zip(params, snapshot):
        assert np.array_equal(a["W"], b["W"]) and np.array_equal(a["b"], b["b"])


def test_forward_shapes_and_predict():
    spec = MLPSpec((6, 5, 3), "relu", "softmax", "cross_entropy")
    params = init_params(spec, seed=0, dtype=np.float32)
    x = np.random.default_rng(1).random((7, 6))
    out = forward(params, x, spec)
    assert out.shape == (7, 3) and out.dtype == np.float32
    assert_close(out.sum(axis=1), np.ones(7, np.float32), "sums_to_one", "row sums")
    assert np.array_equal(predict(params, x, spec), out.argmax(axis=1))


def test_loss_and_grads_rejects_mismatched_shapes():
    spec = MLPSpec((6, 5, 3), "relu", "softmax", "cross_entropy")
    params = init_params(spec)
    with pytest.raises(ValueError, match="x has shape"):
        loss_and_grads(params, np.zeros((2, 5)), np.zeros((2, 3)), spec)
    with pytest.raises(ValueError, match="y has shape"):
        loss_and_grads(params, np.zeros((2, 6)), np.zeros((2, 4)), spec)


def test_optimizer_arguments_are_checked():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="learning_rate"):
            sgd(bad)
    with pytest.raises(ValueError, match="beta"):
        momentum(0.1, beta=1.0)
    with pytest.raises(ValueError, match="rmsprop"):
        make_optimizer("rmsprop", 0.1)
