"""Batch norm, layer norm and the residual block of the numpy engine: shapes, modes, running
statistics, and float64 central-difference checks of each handwritten backward pass, alone and
in a network (the JAX references and the verifier grid are tested elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from research.engine import network as net
from research.engine.layers.activations import Activation
from research.engine.layers.base import decayed, forward_extras, needs
from research.engine.layers.dense import Dense, Flatten
from research.engine.layers.dropout import Dropout
from research.engine.layers.norm import BatchNorm, LayerNorm
from research.engine.layers.residual import Residual

jax.config.update("jax_enable_x64", True)

STEP = 1e-6  # central differences: ~1e-12 truncation, ~1e-10 rounding on O(1) sums


def central_differences(f: Callable[[], float], array: np.ndarray) -> np.ndarray:
    """∂f/∂array by central differences, ``array`` perturbed in place (and restored)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        kept = array[index]
        array[index] = kept + STEP
        up = f()
        array[index] = kept - STEP
        down = f()
        array[index] = kept
        grad[index] = (up - down) / (2 * STEP)
    return grad


def check_layer_gradients(layer: Any, params: dict, x: np.ndarray, seed: int = 0, **extras) -> None:
    """The layer's backward against central differences of sum(forward · R), R random."""
    y, cache = layer.forward(params, x, np, **extras)
    weights = np.random.default_rng(seed).standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, weights)
    assert set(grads) == set(params)

    def objective() -> float:
        return float(np.sum(layer.forward(params, x, np, **extras)[0] * weights))

    assert_close(dx, central_differences(objective, x), "finite_differences", "dx")
    expected = {key: central_differences(objective, params[key]) for key in params}
    assert_close([grads], [expected], "finite_differences", "parameter gradients")


def random_params(layer: Any, in_shape: tuple, rng: np.random.Generator) -> dict:
    """The layer's parameters, every value moved off its starting value (gamma off 1...)."""
    params = layer.init(rng, in_shape, np.float64)
    return {key: value + 0.5 * rng.standard_normal(value.shape) for key, value in params.items()}


# --- batch norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(5,), (3, 4, 2)])
def test_batchnorm_shapes_and_training_normalizes_per_channel(in_shape):
    layer = BatchNorm()
    params = layer.init(np.random.default_rng(0), in_shape, np.float64)
    state = layer.init_state(in_shape, np.float64)
    channels = in_shape[0]
    assert {k: v.shape for k, v in params.items()} == {"gamma": (channels,), "beta": (channels,)}
    assert_close(params["gamma"], np.ones(channels), "exact")
    assert_close(params["beta"], np.zeros(channels), "exact")
    assert_close(state["mean"], np.zeros(channels), "exact")
    assert_close(state["var"], np.ones(channels), "exact")
    assert layer.out_shape(in_shape) == in_shape
    x = 3 + 2 * np.random.default_rng(1).standard_normal((6, *in_shape))
    y, _ = layer.forward(params, x, np, training=True, state=state)
    assert y.shape == x.shape
    axes = (0, *range(2, x.ndim))
    moved = np.moveaxis(x, 1, -1).reshape(-1, channels)  # (values per channel, C)
    expected = (moved - moved.mean(0)) / np.sqrt(moved.var(0) + layer.eps)
    assert_close(np.moveaxis(y, 1, -1).reshape(-1, channels), expected, "forward")
    assert_close(y.mean(axis=axes), np.zeros(channels), "closed_form")


def test_batchnorm_evaluation_uses_the_running_statistics_and_an_affine_map():
    layer = BatchNorm()
    rng = np.random.default_rng(2)
    params = random_params(layer, (3, 2, 2), rng)
    state = {"mean": rng.standard_normal(3), "var": 1 + rng.random(3)}
    x = rng.standard_normal((4, 3, 2, 2))
    y, cache = layer.forward(params, x, np, training=False, state=state)
    shape = (1, 3, 1, 1)
    scale = params["gamma"].reshape(shape) / np.sqrt(state["var"].reshape(shape) + layer.eps)
    expected = (x - state["mean"].reshape(shape)) * scale + params["beta"].reshape(shape)
    assert_close(y, expected, "forward")
    # one example alone gives the same output in evaluation (no batch coupling)
    alone, _ = layer.forward(params, x[:1], np, training=False, state=state)
    assert_close(alone, y[:1], "forward")
    assert_close([layer.next_state(state, cache)], [state], "exact", "state after evaluation")
    with pytest.raises(ValueError, match="running statistics"):
        layer.forward(params, x, np, training=False, state=None)


@pytest.mark.parametrize("in_shape", [(4,), (2, 3, 3)])
def test_batchnorm_next_state_averages_in_the_unbiased_batch_variance(in_shape):
    layer = BatchNorm(momentum=0.8)
    rng = np.random.default_rng(3)
    params = layer.init(rng, in_shape, np.float64)
    state = {"mean": rng.standard_normal(in_shape[0]), "var": 1 + rng.random(in_shape[0])}
    x = rng.standard_normal((5, *in_shape)) * 2 + 1
    _, cache = layer.forward(params, x, np, training=True, state=state)
    new = layer.next_state(state, cache)
    moved = np.moveaxis(x, 1, -1).reshape(-1, in_shape[0])
    assert_close(new["mean"], 0.8 * state["mean"] + 0.2 * moved.mean(0), "closed_form", "mean")
    assert_close(new["var"], 0.8 * state["var"] + 0.2 * moved.var(0, ddof=1), "closed_form", "var")
    assert set(new) == {"mean", "var"}


def test_batchnorm_with_one_value_per_channel_keeps_the_running_variance():
    layer = BatchNorm()
    params = layer.init(np.random.default_rng(0), (3,), np.float64)
    state = {"mean": np.zeros(3), "var": np.full(3, 2.0)}
    x = np.array([[1.0, -2.0, 4.0]])
    y, cache = layer.forward(params, x, np, training=True, state=state)
    assert_close(y, np.zeros((1, 3)), "exact")
    new = layer.next_state(state, cache)
    assert_close(new["var"], state["var"], "exact", "var")
    assert_close(new["mean"], 0.1 * x[0], "closed_form", "mean")
    assert np.all(np.isfinite(layer.backward(params, cache, np.ones((1, 3)))[0]))


@settings(max_examples=12, deadline=None, derandomize=True)  # central differences: noisy
@given(
    image=st.booleans(),
    rows=st.integers(2, 5),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_backward_matches_central_differences(image, rows, training, seed):
    rng = np.random.default_rng(seed)
    in_shape = (2, 3, 2) if image else (3,)
    layer = BatchNorm()
    params = random_params(layer, in_shape, rng)
    state = {"mean": rng.standard_normal(in_shape[0]), "var": 0.5 + rng.random(in_shape[0])}
    x = 2 * rng.standard_normal((rows, *in_shape)) + 1
    check_layer_gradients(layer, params, x, seed, training=training, state=state)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_shape", [(4,), (2, 3, 3)])
def test_norm_forward_runs_under_jax_numpy_and_jit(training, in_shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, *in_shape))
    for layer in (BatchNorm(), LayerNorm()):
        params = random_params(layer, in_shape, rng)
        extras = {}
        if "state" in needs(layer):
            extras = {"training": training, "state": layer.init_state(in_shape, np.float64)}
        y, cache = layer.forward(params, x, np, **extras)
        y_jax, _ = layer.forward(params, jnp.asarray(x), jnp, **extras)
        assert_close(y_jax, y, "forward", f"{layer.describe()} under jax.numpy")
        jitted = jax.jit(
            lambda p, v, layer=layer, extras=extras: layer.forward(p, v, jnp, **extras)
        )
        y_jit, cache_jit = jitted(params, jnp.asarray(x))
        assert_close(y_jit, y, "forward", f"{layer.describe()} jitted")
        if training and "state" in extras:
            assert_close(
                [layer.next_state(extras["state"], jax.device_get(cache_jit))],
                [layer.next_state(extras["state"], cache)],
                "forward",
                "next state from the jitted cache",
            )


def test_batchnorm_float32_stays_float32():
    layer = BatchNorm()
    params = layer.init(np.random.default_rng(0), (2, 2, 2), np.float32)
    state = layer.init_state((2, 2, 2), np.float32)
    x = np.random.default_rng(1).standard_normal((3, 2, 2, 2)).astype(np.float32)
    for training in (True, False):
        y, cache = layer.forward(params, x, np, training=training, state=state)
        dx, grads = layer.backward(params, cache, np.ones_like(y))
        assert y.dtype == dx.dtype == np.float32
        assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
        new = layer.next_state(state, cache)
        assert {v.dtype for v in new.values()} == {np.dtype(np.float32)}


def test_batchnorm_describe_check_and_refusals():
    assert BatchNorm().describe() == "batchnorm"
    assert BatchNorm(0.99).describe() == "batchnorm(0.99)"
    assert BatchNorm().needs == ("training", "state")
    assert decayed(BatchNorm(), {"gamma": np.ones(2), "beta": np.zeros(2)}) == ()
    assert BatchNorm().check((5,)) is None and BatchNorm().check((1, 28, 28)) is None
    assert "(3, 4)" in BatchNorm().check((3, 4))
    for momentum in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            BatchNorm(momentum)
    with pytest.raises(ValueError, match=r"^batchnorm: it takes"):
        net.Network((BatchNorm(), Dense(2)), (3, 4))
    assert net.Network((Flatten(), BatchNorm(), Dense(2)), (3, 4)).shapes[2] == (12,)


# --- layer norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(6,), (2, 3, 2)])
def test_layernorm_normalizes_each_example_over_all_its_values(in_shape):
    layer = LayerNorm()
    params = layer.init(np.random.default_rng(0), in_shape, np.float64)
    assert {k: v.shape for k, v in params.items()} == {"gamma": in_shape, "beta": in_shape}
    assert layer.describe() == "layernorm" and needs(layer) == () and decayed(layer, params) == ()
    assert layer.out_shape(in_shape) == in_shape
    x = 5 + 3 * np.random.default_rng(1).standard_normal((4, *in_shape))
    y, _ = layer.forward(params, x, np)
    flat = x.reshape(4, -1)
    expected = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
    assert_close(y.reshape(4, -1), expected, "forward")
    # each example alone: no coupling across the batch
    assert_close(layer.forward(params, x[2:3], np)[0], y[2:3], "forward")


@settings(max_examples=8, deadline=None, derandomize=True)  # central differences: noisy
@given(image=st.booleans(), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_layernorm_backward_matches_central_differences(image, rows, seed):
    rng = np.random.default_rng(seed)
    in_shape = (2, 2, 3) if image else (5,)
    layer = LayerNorm()
    params = random_params(layer, in_shape, rng)
    x = 2 * rng.standard_normal((rows, *in_shape)) - 1
    check_layer_gradients(layer, params, x, seed)


# --- the residual block -----------------------------------------------------------------------


def test_residual_params_are_the_inner_ones_prefixed_and_drawn_in_order():
    block = Residual((Dense(4, "he"), Activation("tanh"), LayerNorm(), Dense(3, "xavier")))
    params = block.init(np.random.default_rng(7), (3,), np.float64)
    assert sorted(params) == ["0.W", "0.b", "2.beta", "2.gamma", "3.W", "3.b"]
    rng = np.random.default_rng(7)
    first = Dense(4, "he").init(rng, (3,), np.float64)
    LayerNorm().init(rng, (4,), np.float64)
    last = Dense(3, "xavier").init(rng, (4,), np.float64)
    drawn = {"0.W": first["W"], "0.b": first["b"], "3.W": last["W"], "3.b": last["b"]}
    assert_close([{k: params[k] for k in drawn}], [drawn], "exact")
    assert block.describe() == "res(dense(4) tanh layernorm dense(3))"
    assert block.out_shape((3,)) == (3,)
    assert needs(block) == ()
    assert decayed(block, params) == ("0.W", "3.W")


def test_residual_forward_is_x_plus_f_of_x():
    inner = (Dense(5), Activation("relu"), Dense(4))
    block = Residual(inner)
    rng = np.random.default_rng(8)
    params = block.init(rng, (4,), np.float64)
    x = rng.standard_normal((3, 4))
    h = x
    for i, layer in enumerate(inner):
        h, _ = layer.forward({k[2:]: v for k, v in params.items() if k[0] == str(i)}, h, np)
    y, _ = block.forward(params, x, np)
    assert_close(y, x + h, "exact")
    assert_close(block.forward(params, jnp.asarray(x), jnp)[0], y, "forward", "under jax")


@settings(max_examples=6, deadline=None, derandomize=True)  # central differences: noisy
@given(training=st.booleans(), seed=st.integers(0, 2**16))
def test_residual_backward_matches_central_differences(training, seed):
    rng = np.random.default_rng(seed)
    block = Residual(
        (Dense(5), Activation("tanh"), BatchNorm(), Dropout(0.3), Dense(4), LayerNorm())
    )
    assert needs(block) == ("training", "state", "mask")
    params = random_params(block, (4,), rng)
    state = block.init_state((4,), np.float64)
    assert sorted(state) == ["2.mean", "2.var"]
    state = {"2.mean": rng.standard_normal(5), "2.var": 0.5 + rng.random(5)}
    mask = block.draw_mask(rng, (3, 4), np.float64) if training else None
    x = rng.standard_normal((3, 4))
    extras = forward_extras(block, training, state, mask)
    check_layer_gradients(block, params, x, seed, **extras)


def test_residual_masks_state_and_nesting():
    inner_block = Residual((Dense(6), BatchNorm(0.5), Dropout(0.5), Dense(6)))
    block = Residual((Dropout(0.25), inner_block, Activation("relu")))
    assert needs(block) == ("training", "state", "mask")
    assert (
        block.describe()
        == "res(dropout(0.25) res(dense(6) batchnorm(0.5) dropout(0.5) dense(6)) relu)"
    )
    params = block.init(np.random.default_rng(0), (6,), np.float64)
    assert sorted(params) == ["1.0.W", "1.0.b", "1.1.beta", "1.1.gamma", "1.3.W", "1.3.b"]
    assert decayed(block, params) == ("1.0.W", "1.3.W")
    state = block.init_state((6,), np.float64)
    assert sorted(state) == ["1.1.mean", "1.1.var"]
    masks = block.draw_mask(np.random.default_rng(5), (4, 6), np.float64)
    assert masks[0].shape == (4, 6) and masks[2] is None
    assert masks[1][0] is None and masks[1][2].shape == (4, 6)
    # the masks are drawn in inner order from the one generator
    rng = np.random.default_rng(5)
    assert_close(masks[0], Dropout(0.25).draw_mask(rng, (4, 6), np.float64), "exact")
    assert_close(masks[1][2], Dropout(0.5).draw_mask(rng, (4, 6), np.float64), "exact")
    x = np.random.default_rng(6).standard_normal((4, 6))
    _, cache = block.forward(params, x, np, training=True, state=state, mask=masks)
    new = block.next_state(state, cache)
    assert sorted(new) == ["1.1.mean", "1.1.var"]
    expected = BatchNorm(0.5).next_state(
        {"mean": state["1.1.mean"], "var": state["1.1.var"]}, cache[1][1]
    )
    assert_close(new["1.1.mean"], expected["mean"], "exact")
    assert not np.allclose(new["1.1.mean"], state["1.1.mean"])
    evaluated, _ = block.forward(params, x, np, training=False, state=new, mask=None)
    assert evaluated.shape == x.shape


def test_residual_check_names_the_shape_it_cannot_keep():
    assert Residual((Dense(8), Activation("relu"), Dense(8))).check((8,)) is None
    problem = Residual((Dense(8), Activation("relu"), Dense(5))).check((8,))
    assert problem == (
        "its layers map (8,) to (5,); a residual block must keep the shape (end it with dense(8))"
    )
    assert "batchnorm: it takes" in Residual((BatchNorm(),)).check((2, 3))
    with pytest.raises(ValueError, match=r"^res\(dense\(5\)\): its layers map \(4,\) to \(5,\)"):
        net.Network((Residual((Dense(5),)), Dense(2)), (4,))
    with pytest.raises(ValueError, match="holds no layer"):
        Residual(())


def test_residual_with_a_convolution_keeps_the_image_shape():
    from research.engine.layers import conv

    padded = Residual((conv.Conv2D(2, 3, 1, 1, "he"), Activation("relu"), BatchNorm()))
    assert padded.check((2, 5, 5)) is None
    problem = Residual((conv.Conv2D(2, 3, 1, 0, "he"),)).check((2, 5, 5))
    assert "(2, 5, 5) to (2, 3, 3)" in problem and "pad the convolutions" in problem
    rng = np.random.default_rng(9)
    params = random_params(padded, (2, 5, 5), rng)
    state = {"2.mean": rng.standard_normal(2), "2.var": 0.5 + rng.random(2)}
    x = rng.standard_normal((2, 2, 5, 5))
    for training in (True, False):
        check_layer_gradients(padded, params, x, 9, training=training, state=state)


# --- in a network -----------------------------------------------------------------------------


def norm_network(l2: float) -> net.Network:
    block = Residual((Dense(6), LayerNorm(), Activation("tanh"), Dropout(0.2), Dense(6)))
    layers = (Dense(6), BatchNorm(), Activation("tanh"), block, BatchNorm(0.5), Dense(3))
    return net.Network(layers, (4,), "softmax", "cross_entropy", l2)


@pytest.mark.parametrize("training", [True, False])
def test_network_of_norms_and_a_residual_matches_central_differences(training):
    network = norm_network(l2=0.03)
    assert network.describe() == (
        "dense(6) batchnorm tanh res(dense(6) layernorm tanh dropout(0.2) dense(6)) "
        "batchnorm(0.5) dense(3)"
    )
    rng = np.random.default_rng(10)
    params = net.init_params(network, rng)
    params = [{k: v + 0.3 * rng.standard_normal(v.shape) for k, v in p.items()} for p in params]
    state = net.init_state(network)
    assert [sorted(s) for s in state] == [[], ["mean", "var"], [], [], ["mean", "var"], []]
    state[4] = {"mean": rng.standard_normal(6), "var": 0.5 + rng.random(6)}
    masks = net.draw_masks(network, rng, 5, np.float64)
    assert masks[3][3].shape == (5, 6)
    x = rng.standard_normal((5, 4))
    y = np.eye(3)[rng.integers(0, 3, size=5)]
    value, grads, new_state = net.loss_and_grads(
        network, params, x, y, state=state, masks=masks, training=training
    )

    def objective() -> float:
        return net.loss_and_grads(
            network, params, x, y, state=state, masks=masks, training=training
        )[0]

    expected = [{k: central_differences(objective, v) for k, v in p.items()} for p in params]
    assert_close(grads, expected, "finite_differences", "network gradients")
    # the l2 term reaches the residual's inner weights and no norm parameter
    weights = [params[0]["W"], params[3]["0.W"], params[3]["4.W"], params[5]["W"]]
    penalty = 0.5 * 0.03 * sum(float(np.sum(w * w)) for w in weights)
    plain = net.loss_and_grads(
        norm_network(0.0), params, x, y, state=state, masks=masks, training=training
    )[0]
    assert_close(value, plain + penalty, "closed_form", "loss with l2")
    if training:
        assert new_state is not state
        assert not np.allclose(new_state[1]["mean"], state[1]["mean"])
        _, caches = net.forward(network, params, x, training=True, state=state, masks=masks)
        assert_close(new_state, net.next_state(network, state, caches), "exact", "next state")
        assert_close([new_state[4]], [BatchNorm(0.5).next_state(state[4], caches[4])], "exact")
    else:
        assert new_state is state


def test_network_training_steps_advance_the_state_that_evaluation_uses():
    network = norm_network(l2=0.0)
    rng = np.random.default_rng(11)
    params = net.init_params(network, rng)
    state = net.init_state(network)
    x = rng.standard_normal((8, 4)) * 3 + 2
    y = np.eye(3)[rng.integers(0, 3, size=8)]
    before = net.loss(network, params, x, y, state=state)
    for _ in range(3):
        masks = net.draw_masks(network, rng, 8, np.float64)
        _, _, state = net.loss_and_grads(network, params, x, y, state=state, masks=masks)
    # the first batch norm sees the same batch three times: 1 − 0.9³ of its mean by now
    hidden = x @ params[0]["W"] + params[0]["b"]
    assert_close(state[1]["mean"], (1 - 0.9**3) * hidden.mean(0), "closed_form", "running mean")
    assert_close(
        state[1]["var"], 0.9**3 + (1 - 0.9**3) * hidden.var(0, ddof=1), "closed_form", "running var"
    )
    after = net.loss(network, params, x, y, state=state)
    assert np.isfinite(after) and after != before
    logits, _ = net.forward(network, params, x, state=state)  # evaluation: running statistics
    one, _ = net.forward(network, params, x[:1], state=state)
    assert_close(one, logits[:1], "forward", "one example in evaluation mode")
