"""Convolution and pooling layers of the numpy engine: shapes, refusals, initialization, the fast
numpy paths against simple loops and against the xp-generic forward (numpy and JAX), float64
central-difference checks of every handwritten backward pass, and max-pooling's tie rule (the
first maximal element in row-major window order) against JAX's own gradients."""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from research.engine import network as net
from research.engine.layers.conv import Conv2D, conv_forward_generic, conv_forward_numpy
from research.engine.layers.parse import LayersError, build_network
from research.engine.layers.pooling import (
    AvgPool2D,
    MaxPool2D,
    max_pool_backward,
    max_pool_numpy,
    pool_generic,
)

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


def channels_last(x: np.ndarray) -> np.ndarray:
    """The same (B, C, H, W) values, stored channels-last in memory (what conv layers output)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def check_gradients(layer: Any, params: dict, x: np.ndarray, seed: int = 0) -> None:
    """backward (and backward_params, when the layer has it) against central differences of
    sum(forward · R), R random, in float64."""
    y, cache = layer.forward(params, x, np)
    weights = np.random.default_rng(seed).standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, weights)
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def objective() -> float:
        return float(np.sum(layer.forward(params, x, np)[0] * weights))

    assert_close(dx, central_differences(objective, x), "finite_differences", "dx")
    expected = {key: central_differences(objective, params[key]) for key in params}
    assert_close([grads], [expected], "finite_differences", "parameter gradients")
    if hasattr(layer, "backward_params"):
        alone = layer.backward_params(params, layer.forward(params, x, np)[1], weights)
        assert_close([alone], [grads], "exact", "backward_params against backward")


# --- a convolution and poolings written as loops (what the fast paths must equal) ----------------


def loop_conv(x: np.ndarray, W: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """y[b, f, h, w] = bias[f] + Σ W[f, c, i, j]·xpad[b, c, h·s + i, w·s + j], one window at a
    time."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    filters, _, k, _ = W.shape
    out_h = (xp.shape[2] - k) // stride + 1
    out_w = (xp.shape[3] - k) // stride + 1
    y = np.zeros((x.shape[0], filters, out_h, out_w))
    for n, f, h, w in product(range(x.shape[0]), range(filters), range(out_h), range(out_w)):
        window = xp[n, :, h * stride : h * stride + k, w * stride : w * stride + k]
        y[n, f, h, w] = np.sum(window * W[f]) + b[f]
    return y


def loop_pool(x: np.ndarray, k: int, s: int, kind: str, dy: np.ndarray) -> tuple[Any, Any]:
    """Pooling and its input gradient for output gradient ``dy``, one window at a time; max-
    pooling sends a window's gradient to np.argmax's element: the first maximum, row-major."""
    batch, channels, height, width = x.shape
    out_h, out_w = (height - k) // s + 1, (width - k) // s + 1
    y = np.zeros((batch, channels, out_h, out_w))
    dx = np.zeros_like(x)
    for n, c, h, w in product(range(batch), range(channels), range(out_h), range(out_w)):
        window = x[n, c, h * s : h * s + k, w * s : w * s + k]
        if kind == "max":
            first = int(np.argmax(window))
            y[n, c, h, w] = window.flat[first]
            dx[n, c, h * s + first // k, w * s + first % k] += dy[n, c, h, w]
        else:
            y[n, c, h, w] = window.mean()
            dx[n, c, h * s : h * s + k, w * s : w * s + k] += dy[n, c, h, w] / (k * k)
    return y, dx


# --- Conv2D: what it is --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "in_shape", "out_shape"),
    [
        (Conv2D(20, 5), (1, 28, 28), (20, 24, 24)),
        (Conv2D(40, 5), (20, 12, 12), (40, 8, 8)),
        (Conv2D(8, 3, 1, 1), (3, 7, 9), (8, 7, 9)),
        (Conv2D(4, 3, 2, 1), (2, 8, 7), (4, 4, 4)),
        (Conv2D(2, 4, 3), (1, 10, 11), (2, 3, 3)),
        (Conv2D(2, 3, 1, 2), (1, 1, 1), (2, 3, 3)),
    ],
)
def test_conv_out_shape_is_the_forward_pass_shape(layer, in_shape, out_shape):
    params = layer.init(np.random.default_rng(0), in_shape, np.float64)
    assert layer.check(in_shape) is None
    assert layer.out_shape(in_shape) == out_shape
    y, _ = layer.forward(params, np.zeros((2, *in_shape)), np)
    assert y.shape == (2, *out_shape)
    assert conv_forward_generic(np.zeros((2, *in_shape)), *params.values(), layer.stride,
                                layer.pad, np).shape == (2, *out_shape)  # fmt: skip


def test_conv_describes_itself_as_written_in_layers():
    assert Conv2D(20, 5).describe() == "conv(20,5)"
    assert Conv2D(20, 5, 2).describe() == "conv(20,5,2)"
    assert Conv2D(20, 5, 2, 1).describe() == "conv(20,5,2,1)"
    assert Conv2D(20, 5, 1, 1).describe() == "conv(20,5,1,1)"
    assert Conv2D(20, 5).decayed == ("W",)


def test_conv_check_names_what_cannot_be_convolved():
    assert Conv2D(4, 5).check((1, 3, 3)) == (
        "kernel 5 is larger than its 3x3 input (padded by 0); use a smaller kernel, more "
        "padding, or fewer pooling layers before it"
    )
    assert "kernel 5 is larger than its 2x9 input (padded by 1)" in Conv2D(4, 5, 1, 1).check(
        (1, 2, 9)
    )
    assert Conv2D(4, 5, 1, 1).check((1, 3, 3)) is None
    message = Conv2D(4, 3).check((784,))
    assert "takes images (channels, height, width), got inputs of shape (784,)" in message
    assert "\n" not in message


def test_a_kernel_larger_than_its_input_is_refused_in_one_line_naming_the_layer():
    with pytest.raises(LayersError) as error:
        build_network("conv(8,5) maxpool(2) conv(8,5) maxpool(2) conv(8,5)",
                      n_classes=10, output="softmax", loss="cross_entropy")  # fmt: skip
    assert str(error.value).startswith("conv(8,5): kernel 5 is larger than its 4x4 input")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, 3), "conv's filters=0 is not allowed; give a whole number >= 1"),
        ((2, 0), "conv's kernel=0 is not allowed"),
        ((2, 3, 0), "conv's stride=0 is not allowed"),
        ((2, 3, 1, -1), "conv's pad=-1 is not allowed; give a whole number >= 0"),
        ((2, 3.5), "conv's kernel=3.5 is not allowed"),
        ((2, 3, 1, 0, "lecun"), "init 'lecun' is not allowed; choose one of normal, xavier, he"),
    ],
)
def test_conv_refuses_bad_arguments_in_one_line(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Conv2D(*arguments)


def test_conv_init_draws_each_scheme_from_the_generator():
    in_shape, shape = (3, 8, 8), (4, 3, 5, 5)
    he = Conv2D(4, 5).init(np.random.default_rng(7), in_shape, np.float32)
    expected = np.random.default_rng(7).standard_normal(shape) * np.sqrt(2 / 75)
    assert_close(he["W"], expected.astype(np.float32), "exact", "he W")
    assert_close(he["b"], np.zeros(4, np.float32), "exact", "he b")
    xavier = Conv2D(4, 5, init_scheme="xavier").init(np.random.default_rng(7), in_shape, np.float64)
    limit = np.sqrt(6 / (75 + 100))
    expected = np.random.default_rng(7).uniform(-limit, limit, shape)
    assert_close(xavier["W"], expected, "exact", "xavier W")
    assert not xavier["b"].any()
    rng = np.random.default_rng(7)
    normal = Conv2D(4, 5, init_scheme="normal").init(np.random.default_rng(7), in_shape, np.float64)
    assert_close([normal], [{"W": rng.standard_normal(shape), "b": rng.standard_normal(4)}],
                 "exact", "normal")  # fmt: skip


# --- Conv2D: the forward passes agree ------------------------------------------------------------

CONV_CASES = [
    # (B, C, H, W, filters, kernel, stride, pad)
    (2, 1, 7, 6, 3, 3, 1, 0),
    (2, 3, 7, 8, 4, 3, 2, 1),
    (3, 4, 9, 9, 2, 2, 2, 0),
    (2, 5, 6, 6, 3, 3, 1, 2),
    (2, 1, 5, 5, 2, 5, 1, 0),
    (1, 2, 6, 7, 2, 3, 3, 1),
    (2, 6, 5, 4, 3, 1, 1, 0),
]


def conv_case(case: tuple, seed: int = 0) -> tuple[np.ndarray, dict, int, int]:
    batch, channels, height, width, filters, k, stride, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, height, width))
    params = {
        "W": rng.standard_normal((filters, channels, k, k)),
        "b": rng.standard_normal(filters),
    }
    return x, params, stride, pad


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
@pytest.mark.parametrize("order", [False, True, None])
def test_conv_numpy_paths_equal_the_loop(case, memory, order):
    """Both im2col orders (and the default choice), on inputs stored either way."""
    x, params, stride, pad = conv_case(case)
    if memory == "channels_last":
        x = channels_last(x)
    y, cache = conv_forward_numpy(x, params["W"], params["b"], stride, pad, order)
    assert order is None or cache.channels_last == order
    assert_close(y, loop_conv(x, params["W"], params["b"], stride, pad), "forward", "y")
    generic = conv_forward_generic(x, params["W"], params["b"], stride, pad, np)
    assert_close(generic, loop_conv(x, params["W"], params["b"], stride, pad), "forward", "y")


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_under_jax_numpy_equals_numpy(case):
    x, params, stride, pad = conv_case(case)
    ours, _ = Conv2D(params["W"].shape[0], params["W"].shape[2], stride, pad).forward(params, x, np)
    theirs, _ = Conv2D(params["W"].shape[0], params["W"].shape[2], stride, pad).forward(
        {key: jnp.asarray(v) for key, v in params.items()}, jnp.asarray(x), jnp
    )
    assert_close(np.asarray(theirs), ours, "forward", "jax.numpy forward")


def test_conv_keeps_float32_and_writes_channels_last():
    layer = Conv2D(20, 5)
    params = layer.init(np.random.default_rng(0), (1, 28, 28), np.float32)
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    y, cache = layer.forward(params, x, np)
    assert y.dtype == np.float32 and cache.cols.dtype == np.float32
    assert y.strides[1] == 4  # channels adjacent: the next layers read it without a copy
    dx, grads = layer.backward(params, cache, np.ones_like(y))
    assert dx.dtype == grads["W"].dtype == grads["b"].dtype == np.float32
    assert grads["W"].flags.c_contiguous and grads["W"].shape == params["W"].shape


# --- Conv2D: the backward pass -------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
def test_conv_backward_matches_central_differences(case, memory):
    x, params, stride, pad = conv_case(case, seed=3)
    if memory == "channels_last":
        x = channels_last(x)
    check_gradients(Conv2D(params["W"].shape[0], params["W"].shape[2], stride, pad), params, x)


def jax_vjp(forward: Callable, x: np.ndarray, params: dict, dy: np.ndarray) -> tuple[Any, Any]:
    """JAX's ∂(sum(forward(params, x)·dy)) with respect to x and params."""
    _, pullback = jax.vjp(forward, jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()})
    dx, grads = pullback(jnp.asarray(dy))
    return np.asarray(dx), {key: np.asarray(value) for key, value in grads.items()}


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 5),
    height=st.integers(3, 10),
    width=st.integers(3, 10),
    filters=st.integers(1, 4),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    pad=st.integers(0, 2),
    stored_channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_backward_equals_jax_autodiff_of_the_generic_forward(
    batch, channels, height, width, filters, kernel, stride, pad, stored_channels_last, seed
):
    layer = Conv2D(filters, kernel, stride, pad)
    if layer.check((channels, height, width)) is not None:
        return
    x, params, _, _ = conv_case((batch, channels, height, width, filters, kernel, 1, 0), seed)
    if stored_channels_last:
        x = channels_last(x)
    y, cache = layer.forward(params, x, np)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape)
    dx, grads = layer.backward(params, cache, dy)

    def forward(x: Any, params: dict) -> Any:
        return conv_forward_generic(x, params["W"], params["b"], stride, pad, jnp)

    their_dx, their_grads = jax_vjp(forward, x, params, dy)
    assert_close(dx, their_dx, "gradients", "dx")
    assert_close([grads], [their_grads], "gradients", "parameter gradients")


# --- pooling -------------------------------------------------------------------------------------

POOL_CASES = [
    # (B, C, H, W, kernel, stride)
    (2, 3, 6, 6, 2, 2),  # the fast, tiling case
    (2, 3, 7, 5, 2, 2),  # a row and a column past the last window
    (2, 2, 7, 7, 3, 2),  # overlapping
    (2, 2, 6, 7, 3, 1),  # overlapping more
    (1, 2, 5, 5, 1, 2),  # a 1x1 window
    (2, 2, 9, 8, 2, 3),  # gaps between windows
    (2, 3, 8, 8, 4, 4),
    (1, 1, 3, 3, 3, 1),  # one window
]


def pool_input(case: tuple, ties: bool, memory: str, seed: int = 0) -> np.ndarray:
    batch, channels, height, width = case[:4]
    x = np.random.default_rng(seed).standard_normal((batch, channels, height, width))
    if ties:  # few distinct values: many windows hold their maximum twice or more
        x = np.round(x) + 0.0  # (+ 0.0: no -0.0, whose maximum with 0.0 may be either zero)
    return channels_last(x) if memory == "channels_last" else x


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_equals_the_loop_forward_and_backward(case, ties, memory, kind):
    """Max-pooling's gradient goes to the first maximal element of each window (np.argmax's);
    sums of overlapping windows' gradients are the only roundings apart."""
    kernel, stride = case[4:]
    x = pool_input(case, ties, memory)
    layer = MaxPool2D(kernel, stride) if kind == "max" else AvgPool2D(kernel, stride)
    y, cache = layer.forward({}, x, np)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    expected_y, expected_dx = loop_pool(x, kernel, stride, kind, dy)
    dx, grads = layer.backward({}, cache, dy)
    assert grads == {} and dx.shape == x.shape
    assert_close(y, expected_y, "exact" if kind == "max" else "forward", "y")
    # (+ 0.0: the products with a 0 mask give -0.0 where dy < 0)
    assert_close(dx + 0.0, expected_dx, "exact" if stride >= kernel else "same_operations", "dx")
    assert_close(pool_generic(x, kernel, stride, kind, np), expected_y,
                 "exact" if kind == "max" else "forward", "generic y")  # fmt: skip
    assert (dx.strides[1] == dx.itemsize) == (memory == "channels_last" and x.shape[1] > 1)


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_under_jax_numpy_equals_numpy_and_its_autodiff_our_backward(case, kind):
    """With ties: the generic forward's JAX gradient routes them as the numpy backward does."""
    kernel, stride = case[4:]
    x = pool_input(case, ties=True, memory="nchw")
    layer = MaxPool2D(kernel, stride) if kind == "max" else AvgPool2D(kernel, stride)
    y, cache = layer.forward({}, x, np)
    theirs, _ = layer.forward({}, jnp.asarray(x), jnp)
    assert_close(np.asarray(theirs), y, "exact" if kind == "max" else "forward", "forward")
    dy = np.random.default_rng(2).standard_normal(y.shape)
    dx, _ = layer.backward({}, cache, dy)
    their_dx, _ = jax_vjp(lambda x, _: layer.forward({}, x, jnp)[0], x, {}, dy)
    assert_close(dx, their_dx, "gradients", "dx against JAX autodiff")


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_backward_equals_jax_reduce_window_gradient_with_ties(case):
    """What the module's docstring states: JAX's reduce_window max also sends a tied window's
    gradient to its first maximal element in row-major order."""
    kernel, stride = case[4:]
    x = pool_input(case, ties=True, memory="nchw", seed=5)
    layer = MaxPool2D(kernel, stride)
    y, cache = layer.forward({}, x, np)
    dy = np.random.default_rng(3).standard_normal(y.shape)
    dx, _ = layer.backward({}, cache, dy)

    def reduce_window(x: Any, _: Any) -> Any:
        window, strides = (1, 1, kernel, kernel), (1, 1, stride, stride)
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")

    their_dx, _ = jax_vjp(reduce_window, x, {}, dy)
    assert_close(dx, their_dx, "gradients", "dx against lax.reduce_window's gradient")


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_backward_matches_central_differences(case, kind):
    kernel, stride = case[4:]
    x = pool_input(case, ties=False, memory="nchw", seed=4)  # no ties: max is differentiable
    check_gradients(
        MaxPool2D(kernel, stride) if kind == "max" else AvgPool2D(kernel, stride), {}, x
    )


def test_max_pool_kernel_of_two_and_general_kernels_route_alike():
    """A kernel of 2 keeps booleans, others int8 positions: the same routing for the same
    windows (a 2x2 window is a 3x3 one with its last row and column at -inf)."""
    x = np.round(np.random.default_rng(6).standard_normal((2, 3, 6, 6)))
    padded = np.full((2, 3, 9, 9), -np.inf)
    rows = np.array([0, 1, 3, 4, 6, 7])
    padded[:, :, rows[:, None], rows[None, :]] = x
    y2, cache2 = max_pool_numpy(x, 2, 2)
    y3, cache3 = max_pool_numpy(padded, 3, 3)
    assert cache2.first_col.dtype == bool and cache3.first_col.dtype == np.int8
    assert_close(y3, y2, "exact", "y")
    dy = np.random.default_rng(7).standard_normal(y2.shape)
    dx3 = max_pool_backward(cache3, dy)
    assert_close(dx3[:, :, rows[:, None], rows[None, :]], max_pool_backward(cache2, dy),
                 "exact", "dx")  # fmt: skip


def test_pooling_describe_check_and_defaults():
    assert MaxPool2D(2).stride == 2 and MaxPool2D(2) == MaxPool2D(2, 2)
    assert MaxPool2D(2).describe() == "maxpool(2)"
    assert MaxPool2D(3, 2).describe() == "maxpool(3,2)"
    assert AvgPool2D(2).describe() == "avgpool(2)"
    assert AvgPool2D(3, 1).describe() == "avgpool(3,1)"
    assert MaxPool2D(3, 2).out_shape((4, 7, 8)) == (4, 3, 3)
    assert MaxPool2D(2).check((4, 2, 2)) is None
    assert MaxPool2D(3).check((4, 2, 5)) == (
        "kernel 3 is larger than its 2x5 input; use a smaller kernel or fewer layers that "
        "shrink the image before it"
    )
    assert "got inputs of shape (10,)" in AvgPool2D(2).check((10,))
    with pytest.raises(ValueError, match=r"maxpool's kernel=0 is not allowed"):
        MaxPool2D(0)
    with pytest.raises(ValueError, match=r"avgpool's stride=0 is not allowed"):
        AvgPool2D(2, 0)


def test_pooling_keeps_float32():
    x = channels_last(np.random.default_rng(0).random((2, 4, 6, 6)).astype(np.float32))
    for layer in (MaxPool2D(2), AvgPool2D(3, 1)):
        y, cache = layer.forward({}, x, np)
        dx, _ = layer.backward({}, cache, np.ones_like(y))
        assert y.dtype == dx.dtype == np.float32


# --- in a network --------------------------------------------------------------------------------


def test_w4_network_shapes_and_its_gradients_against_central_differences():
    """The bench's w4 network as ``layers`` builds it; in float64, on 3 small images, the stack's
    handwritten gradients of the first conv's W and b and of a few entries elsewhere against
    central differences of network.loss (mixed layouts and the first layer's
    backward_params included)."""
    network = build_network("conv(3,3) maxpool(2) conv(4,3,1,1) avgpool(2,1) maxpool(3,2) "
                            "dense(5)", n_classes=3, output="softmax", loss="cross_entropy",
                            l2=0.01, image_shape=(2, 12, 12))  # fmt: skip
    assert network.shapes[1:6] == ((3, 10, 10), (3, 10, 10), (3, 5, 5), (4, 5, 5), (4, 5, 5))
    params = net.init_params(network, 0, np.float64)
    rng = np.random.default_rng(1)
    x = rng.random((3, 2 * 12 * 12))
    y = np.eye(3)[[0, 2, 1]]
    _, grads, _ = net.loss_and_grads(network, params, x, y)

    def objective() -> float:
        return net.loss(network, params, x, y)

    for i in (0, 3):  # both convolutions, every entry
        expected = {key: central_differences(objective, params[i][key]) for key in params[i]}
        assert_close([grads[i]], [expected], "finite_differences", f"layer {i}")

    lead = build_network("conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100)", n_classes=10,
                         output="softmax", loss="cross_entropy")  # fmt: skip
    assert lead.describe() == (
        "conv(20,5) relu maxpool(2) conv(40,5) relu maxpool(2) dense(100) relu dense(10)"
    )
    assert lead.shapes[-4:] == ((40, 4, 4), (100,), (100,), (10,))
