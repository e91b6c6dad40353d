"""Every built-in layer through the one verifier, ``research.verify.layer_check.verify_layer``.

Each layer's numpy forward pass and handwritten backward are compared with JAX autodiff of its
independent reference (``research/verify/layer_refs``): the output, the input gradient and every
parameter gradient for a random upstream gradient, in float64 (the table's 1e-10) and float32 (the
table's float32 tolerances), in both modes where a layer has modes (dropout with and without its
mask, batch norm with batch and with running statistics). Batch norm in training couples the
examples of a batch: it is also checked as a whole-batch Jacobian (``jacobian=True``). Shapes
vary (batch, channels, kernel, stride, padding, odd image sizes such as 7×9) over fixed cases and
hypothesis grids; the larger grids are marked slow.

Kinks and ties. ReLU's derivative jumps at 0 (both sides take 0 there) and max-pooling's gradient
is not defined where a window holds two equal maxima. The verifier draws its inputs away from 0
(|x| ≥ 0.05), and continuous random inputs make a tie a probability-zero event; inside a residual
block a ReLU reads the block's continuous intermediate values, as unlikely to lie within rounding
of 0. So neither decides a comparison here. Ties are tested on their own
(:func:`test_max_pool_routes_ties_to_the_first_maximum`): the numpy max-pool gives a window's
gradient to its first maximal element in row-major order, and JAX's ``reduce_window`` max does
the same (they agree exactly, overlapping windows included).

The image layers choose their loops by the input's memory layout; they are also checked on
inputs in channels-last memory, which is what a conv hands on.

The verifier can fail: a conv whose backward reads the kernel transposed and a batch norm whose
backward drops the coupling term are caught; and a layer of a researcher's own (the Swish of
``experiments/layers/my_layers.py``, no reference registered) is verified through its own
``jax.numpy`` forward, a wrong backward of its caught the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from research.engine.layers.activations import ACTIVATION_LAYERS, Activation
from research.engine.layers.base import Layer
from research.engine.layers.conv import Conv2D
from research.engine.layers.dense import Dense, Flatten
from research.engine.layers.dropout import Dropout
from research.engine.layers.norm import BatchNorm, LayerNorm
from research.engine.layers.pooling import AvgPool2D, MaxPool2D
from research.engine.layers.residual import Residual
from research.engine.layers.user_file import load_layer
from research.verify.layer_check import LayerVerdict, away_from_kinks, verify_layer
from research.verify.layer_refs import reference_for

EXAMPLE_LAYERS = Path(__file__).resolve().parents[1] / "experiments" / "layers" / "my_layers.py"
DTYPES = [np.float64, np.float32]
MODES = {"training": True, "evaluation": False}


def assert_verified(verdict: LayerVerdict) -> None:
    """The verdict passed; else every array outside its tolerance is named."""
    assert verdict.passed, verdict.summary() + "\n  " + "\n  ".join(verdict.failures())
    assert verdict.checks, "nothing was compared"


def failed_arrays(verdict: LayerVerdict) -> set[str]:
    return {check.name for check in verdict.checks if not check.passed}


# --- every built-in layer, fixed cases -------------------------------------------------------

# Layers without modes: (layer, one example's shape). Shapes differ in every axis so that a
# transposed or misrouted array cannot go unnoticed.
STATELESS: dict[str, tuple[Layer, tuple[int, ...]]] = {
    "dense-on-features": (Dense(4), (5,)),
    "dense-on-images": (Dense(3, "he"), (2, 3, 5)),
    "flatten": (Flatten(), (2, 3, 5)),
    **{name: (Activation(name), (3, 4, 5)) for name in ACTIVATION_LAYERS},
    "conv-3x3-pad-1": (Conv2D(4, 3, 1, 1), (3, 7, 9)),
    "conv-stride-2": (Conv2D(2, 3, 2, 0), (2, 9, 7)),
    "conv-1x1": (Conv2D(3, 1), (2, 5, 6)),
    "maxpool-2": (MaxPool2D(2, 2), (2, 7, 9)),
    "maxpool-3-stride-2-overlapping": (MaxPool2D(3, 2), (2, 9, 7)),
    "avgpool-2": (AvgPool2D(2, 2), (2, 7, 9)),
    "avgpool-3-stride-1": (AvgPool2D(3, 1), (1, 5, 6)),
    "layernorm-features": (LayerNorm(), (6,)),
    "layernorm-images": (LayerNorm(), (2, 5, 3)),
}

# Layers with modes (training / evaluation): dropout, batch norm and blocks holding them.
MODED: dict[str, tuple[Layer, tuple[int, ...]]] = {
    "dropout": (Dropout(0.5), (3, 4, 5)),
    "batchnorm-images": (BatchNorm(), (3, 5, 7)),
    "batchnorm-features": (BatchNorm(0.8), (5,)),
    "res-conv-batchnorm": (
        Residual((Conv2D(3, 3, 1, 1), BatchNorm(), Activation("relu"), Conv2D(3, 3, 1, 1))),
        (3, 7, 9),
    ),
    "res-dense-dropout-nested": (
        Residual(
            (
                Dense(6),
                Activation("tanh"),
                Dropout(0.3),
                Residual((BatchNorm(), Dense(6), LayerNorm())),
            )
        ),
        (6,),
    ),
}


def test_every_built_in_layer_has_a_reference() -> None:
    """A built-in layer without a reference would be checked against its own forward only."""
    for layer, _ in [*STATELESS.values(), *MODED.values()]:
        assert reference_for(layer) is not None, type(layer).__name__


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(STATELESS))
def test_layer_verifies(name: str, dtype: type) -> None:
    layer, shape = STATELESS[name]
    assert_verified(verify_layer(layer, shape, dtype=dtype, batch=3, seed=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODED))
def test_layer_with_modes_verifies(name: str, mode: str, dtype: type) -> None:
    layer, shape = MODED[name]
    assert_verified(verify_layer(layer, shape, dtype=dtype, batch=4, training=MODES[mode]))


JACOBIAN_CASES = [
    # (one example's shape, batch, mode)
    ((2, 3, 5), 3, "training"),
    ((4,), 5, "training"),
    ((3,), 1, "training"),
    ((2, 3, 5), 3, "evaluation"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "batch", "mode"), JACOBIAN_CASES)
def test_batch_norm_whole_batch_jacobian(
    shape: tuple[int, ...], batch: int, mode: str, dtype: type
) -> None:
    """∂y/∂x over the whole batch: in training every example's output depends on every example
    of its channel (the batch statistics), which one vector-Jacobian product would not pin down
    entry by entry; in evaluation the Jacobian is diagonal per channel. A batch of one row of
    features has zero variance: then y = beta and the Jacobian is 0. (The parameters'
    gradients are checked by :func:`test_layer_with_modes_verifies`.)"""
    verdict = verify_layer(
        BatchNorm(), shape, dtype=dtype, batch=batch, training=MODES[mode], jacobian=True
    )
    assert_verified(verdict)


def test_dropout_without_a_mask_is_the_identity() -> None:
    """Rate 0 draws no mask, so training is the identity too."""
    assert_verified(verify_layer(Dropout(0.0), (4, 3), training=True))


def channels_last(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The verifier's inputs (B, C, H, W) laid out channels-last in memory, as a conv's output
    is: the layers choose their loops by the memory layout."""
    x = away_from_kinks(rng, shape, dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


CHANNELS_LAST: dict[str, tuple[Layer, tuple[int, ...]]] = {
    "conv": (Conv2D(3, 3, 2, 1), (4, 7, 9)),
    "maxpool": (MaxPool2D(3, 2), (3, 9, 7)),
    "maxpool-tiling": (MaxPool2D(2, 2), (3, 6, 8)),
    "avgpool": (AvgPool2D(2, 1), (3, 7, 5)),
    "batchnorm": (BatchNorm(), (3, 5, 7)),
    "layernorm": (LayerNorm(), (3, 5, 7)),
    "res": (Residual((Conv2D(3, 3, 1, 1), BatchNorm(), Activation("gelu"))), (3, 5, 7)),
}


# float32 where the layout changes the order of long sums (conv, the norms' statistics)
LAYOUT_CASES = [(name, np.float64) for name in CHANNELS_LAST] + [
    (name, np.float32) for name in ("conv", "batchnorm", "layernorm")
]


@pytest.mark.parametrize(("name", "dtype"), LAYOUT_CASES)
def test_layer_verifies_on_channels_last_inputs(name: str, dtype: type) -> None:
    """The image layers on inputs in channels-last memory (what a conv hands on), the upstream
    gradient in NCHW memory: the layout-dependent paths of the numpy passes."""
    layer, shape = CHANNELS_LAST[name]
    assert_verified(verify_layer(layer, shape, dtype=dtype, sample=channels_last))


# --- hypothesis grids: batch, channels, kernel, stride, padding, odd sizes --------------------


SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[Layer, tuple[int, ...], int, type, int]:
    """A conv layer and input that fit: kernel 1–3, stride 1–2, padding 0–2, images 5–9 high
    and wide (odd, even, non-square), 1–3 channels and filters, batch 1–3, either dtype."""
    kernel, stride, pad = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    shape = (draw(st.integers(1, 3)), draw(st.integers(5, 9)), draw(st.integers(5, 9)))
    layer = Conv2D(draw(st.integers(1, 3)), kernel, stride, pad)
    assume(layer.check(shape) is None)
    return layer, shape, draw(st.integers(1, 3)), draw(st.sampled_from(DTYPES)), draw(SEEDS)


@st.composite
def pool_cases(draw: st.DrawFn) -> tuple[Layer, tuple[int, ...], int, type, int]:
    """Max- or average-pooling: kernel 1–3, stride 1–3 (overlapping windows, and windows that
    leave a border unread), images 3–9 high and wide, 1–3 channels, batch 1–3, either dtype."""
    kind = draw(st.sampled_from([MaxPool2D, AvgPool2D]))
    layer = kind(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(3, 9)), draw(st.integers(3, 9)))
    assume(layer.check(shape) is None)
    return layer, shape, draw(st.integers(1, 3)), draw(st.sampled_from(DTYPES)), draw(SEEDS)


@st.composite
def norm_cases(draw: st.DrawFn) -> tuple[Layer, tuple[int, ...], int, type, int, bool]:
    """Batch or layer norm on features (1–6) or images (1–3 channels, 1–5 × 1–5), batch 2–4,
    either dtype, either mode."""
    layer = draw(st.sampled_from([BatchNorm(), LayerNorm()]))
    if draw(st.booleans()):
        shape: tuple[int, ...] = (draw(st.integers(1, 6)),)
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    assume(int(np.prod(shape)) > 1 or isinstance(layer, BatchNorm))
    dtype, training = draw(st.sampled_from(DTYPES)), draw(st.booleans())
    return layer, shape, draw(st.integers(2, 4)), dtype, draw(SEEDS), training


GRID = settings(deadline=None, max_examples=4, suppress_health_check=[HealthCheck.filter_too_much])
BIG_GRID = settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.filter_too_much]
)


def check_case(layer: Layer, shape: tuple[int, ...], batch: int, dtype: type, seed: int) -> None:
    assert_verified(verify_layer(layer, shape, dtype=dtype, batch=batch, seed=seed))


@GRID
@given(conv_cases())
def test_conv_grid(case) -> None:
    check_case(*case)


@GRID
@given(pool_cases())
def test_pool_grid(case) -> None:
    check_case(*case)


@GRID
@given(norm_cases())
def test_norm_grid(case) -> None:
    layer, shape, batch, dtype, seed, training = case
    verdict = verify_layer(layer, shape, dtype=dtype, batch=batch, seed=seed, training=training)
    assert_verified(verdict)


@pytest.mark.slow
@BIG_GRID
@given(conv_cases())
def test_conv_big_grid(case) -> None:
    check_case(*case)


@pytest.mark.slow
@BIG_GRID
@given(pool_cases())
def test_pool_big_grid(case) -> None:
    check_case(*case)


@pytest.mark.slow
@BIG_GRID
@given(norm_cases())
def test_norm_big_grid(case) -> None:
    layer, shape, batch, dtype, seed, training = case
    verdict = verify_layer(layer, shape, dtype=dtype, batch=batch, seed=seed, training=training)
    assert_verified(verdict)
    if isinstance(layer, BatchNorm):
        jacobian = verify_layer(
            layer, shape, dtype=dtype, batch=batch, seed=seed, training=training, jacobian=True
        )
        assert_verified(jacobian)


@pytest.mark.slow
@settings(deadline=None, max_examples=15)
@given(
    channels=st.integers(1, 3),
    height=st.integers(3, 7),
    width=st.integers(3, 7),
    kernel=st.sampled_from([1, 3]),
    batch=st.integers(2, 3),
    dtype=st.sampled_from(DTYPES),
    training=st.booleans(),
)
# The first conv's bias gradient is 0 in exact arithmetic (the batch norm subtracts the bias
# again): in float32 both sides give noise, here 1.8e-5 apart, which an atol scaled by that
# array alone (1e-5) failed; gradients share their atol's scale now (layer_check._vjp_checks).
@example(channels=2, height=7, width=7, kernel=1, batch=3, dtype=np.float32, training=True)
def test_residual_conv_blocks(
    channels: int, height: int, width: int, kernel: int, batch: int, dtype: type, training: bool
) -> None:
    """res(conv batchnorm relu conv) with "same" padding, any image size, either mode."""
    pad = kernel // 2
    block = Residual(
        (
            Conv2D(channels, kernel, 1, pad),
            BatchNorm(),
            Activation("relu"),
            Conv2D(channels, kernel, 1, pad),
        )
    )
    shape = (channels, height, width)
    assert_verified(verify_layer(block, shape, dtype=dtype, batch=batch, training=training))


# --- ties -------------------------------------------------------------------------------------


def tie_input() -> np.ndarray:
    """One 4×6 image whose windows hold ties of two, three and four equal maxima, in several
    positions (top row, left column, diagonal), beside windows with a single maximum."""
    image = np.array(
        [
            [5.0, 5.0, 1.0, 7.0, 0.0, 0.0],
            [5.0, 5.0, 7.0, 7.0, 0.0, 3.0],
            [0.0, 1.0, 2.0, 1.0, -1.0, -1.0],
            [2.0, 2.0, 0.0, 1.0, -1.0, -1.0],
        ]
    )
    return image.reshape(1, 1, 4, 6)


def routing(image: np.ndarray, kernel: int, stride: int, last: bool = False) -> np.ndarray:
    """Where each window's gradient (1) goes when it picks the first maximal element of the
    window in row-major order (the last with ``last``); overlapping windows add up."""
    routed = np.zeros_like(image)
    rows = (image.shape[0] - kernel) // stride + 1
    cols = (image.shape[1] - kernel) // stride + 1
    for i in range(rows):
        for j in range(cols):
            window = image[i * stride : i * stride + kernel, j * stride : j * stride + kernel]
            flat = window.reshape(-1)
            pick = flat.size - 1 - np.argmax(flat[::-1]) if last else np.argmax(flat)
            u, v = np.unravel_index(pick, window.shape)
            routed[i * stride + u, j * stride + v] += 1
    return routed


@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (2, 1), (3, 1), (3, 2)])
def test_max_pool_routes_ties_to_the_first_maximum(kernel: int, stride: int) -> None:
    """On a hand-built image full of ties, the numpy max-pool's gradient of sum(y) (dy = 1)
    puts each window's 1 on its first maximal element in row-major order, and so does JAX's
    autodiff of ``reduce_window`` max (its select-and-scatter keeps the first of equal values):
    the two agree exactly, also with overlapping windows, where the routed ones add up."""
    layer = MaxPool2D(kernel, stride)
    x = tie_input()
    y, cache = layer.forward({}, x, np)
    dx, grads = layer.backward({}, cache, np.ones_like(y))
    expected = routing(x[0, 0], kernel, stride)
    assert grads == {}
    np.testing.assert_array_equal(dx[0, 0], expected)
    reference = reference_for(layer)
    assert reference is not None
    jax_dx = jax.grad(lambda xx: jnp.sum(reference(layer, {}, xx)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax_dx)[0, 0], expected)
    # not vacuous: the ties decide (taking the last maximum would route elsewhere)
    assert not np.array_equal(expected, routing(x[0, 0], kernel, stride, last=True))


# --- the verifier can fail --------------------------------------------------------------------


@dataclass(frozen=True)
class TransposedKernelConv:
    """A conv whose backward reads the kernel transposed (W[f, c, v, u] for W[f, c, u, v]): a
    mistake that square kernels let through every shape check."""

    conv: Conv2D

    def init(self, rng: np.random.Generator, in_shape: tuple[int, ...], dtype: Any) -> dict:
        return self.conv.init(rng, in_shape, dtype)

    def forward(self, params: dict, x: Any, xp: Any) -> tuple[Any, Any]:
        return self.conv.forward(params, x, xp)

    def backward(self, params: dict, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, dict]:
        transposed = {**params, "W": np.ascontiguousarray(params["W"].transpose(0, 1, 3, 2))}
        return self.conv.backward(transposed, cache, dy)


@dataclass(frozen=True)
class UncoupledBatchNorm:
    """A batch norm whose training backward drops the coupling term −x̂·mean(dx̂·x̂) (the
    variance's dependence on x), keeping the mean's."""

    norm: BatchNorm
    needs = ("training", "state")

    def init(self, rng: np.random.Generator, in_shape: tuple[int, ...], dtype: Any) -> dict:
        return self.norm.init(rng, in_shape, dtype)

    def init_state(self, in_shape: tuple[int, ...], dtype: Any) -> dict:
        return self.norm.init_state(in_shape, dtype)

    def forward(self, params: dict, x: Any, xp: Any, **extras: Any) -> tuple[Any, Any]:
        return self.norm.forward(params, x, xp, **extras)

    def backward(self, params: dict, cache: Any, dy: np.ndarray) -> tuple[np.ndarray, dict]:
        dx, grads = self.norm.backward(params, cache, dy)
        _, inv_std, batch_statistics = cache
        if batch_statistics is None:  # evaluation: no coupling to drop
            return dx, grads
        axes = (0, *range(2, dy.ndim))
        dx_hat = dy * params["gamma"].reshape((1, -1) + (1,) * (dy.ndim - 2))
        return inv_std * (dx_hat - dx_hat.mean(axis=axes, keepdims=True)), grads


def test_conv_with_a_transposed_kernel_fails() -> None:
    conv = Conv2D(3, 3, 1, 1)
    reference = reference_for(conv)
    assert reference is not None
    verdict = verify_layer(
        TransposedKernelConv(conv),
        (2, 6, 7),
        reference=lambda params, x, **extras: reference(conv, params, x, **extras),
    )
    assert not verdict.passed
    assert "input gradient dx" in failed_arrays(verdict)
    assert_verified(verify_layer(conv, (2, 6, 7)))  # the same check of the real layer passes


@pytest.mark.parametrize("jacobian", [False, True])
def test_batch_norm_without_its_coupling_term_fails(jacobian: bool) -> None:
    norm = BatchNorm()
    reference = reference_for(norm)
    assert reference is not None
    verdict = verify_layer(
        UncoupledBatchNorm(norm),
        (2, 3, 4),
        jacobian=jacobian,
        reference=lambda params, x, **extras: reference(norm, params, x, **extras),
    )
    assert not verdict.passed
    assert failed_arrays(verdict) == {"Jacobian dy/dx" if jacobian else "input gradient dx"}
    # evaluation mode has no coupling: the mutant is right there
    assert_verified(
        verify_layer(
            UncoupledBatchNorm(norm),
            (2, 3, 4),
            training=False,
            reference=lambda params, x, **extras: reference(norm, params, x, **extras),
        )
    )


# --- a layer of a researcher's own ------------------------------------------------------------


#: The Swish of experiments/layers/my_layers.py (docs/layers.md's example), as a researcher
#: writes it: its class, loaded from the file as ``my_layers.py:Swish`` is.
Swish = type(load_layer(str(EXAMPLE_LAYERS), "Swish").layer)


class WrongSwish(Swish):
    """Swish whose backward forgets the factor x: σ + σ(1 − σ) for σ + x·σ(1 − σ)."""

    def backward(self, params, cache, dy):
        _, s = cache
        return dy * (s + s * (1 - s)), {}


class ScaledWhenPositive:
    """A user's layer that branches on values in its forward (tracing under jit cannot; the
    verifier then runs it op by op): y = 2x when the batch's sum is positive, else x."""

    def init(self, rng, in_shape, dtype):
        return {"a": np.ones(in_shape, dtype=dtype)}

    def forward(self, params, x, xp):
        factor = 2.0 if x.sum() > 0 else 1.0
        return factor * params["a"] * x, (x, factor)

    def backward(self, params, cache, dy):
        x, factor = cache
        return factor * params["a"] * dy, {"a": factor * (dy * x).sum(axis=0)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_user_layer_verifies_through_its_own_jax_forward(dtype: type) -> None:
    assert reference_for(Swish()) is None
    assert_verified(verify_layer(Swish(), (3, 4), dtype=dtype))
    inside = Residual((Dense(4), Swish()))  # inside a residual block, the same
    assert_verified(verify_layer(inside, (4,), dtype=dtype))


def test_a_user_layer_with_a_wrong_backward_fails() -> None:
    verdict = verify_layer(WrongSwish(), (3, 4))
    assert not verdict.passed and failed_arrays(verdict) == {"input gradient dx"}


def test_a_user_layer_that_branches_on_values_verifies() -> None:
    assert_verified(verify_layer(ScaledWhenPositive(), (2, 3)))
