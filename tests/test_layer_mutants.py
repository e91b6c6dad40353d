"""The layer verifier has teeth: ``check_layer`` fails every planted backward bug, and passes
every correct built-in layer.

1. :data:`MUTANTS`: 43 wrappers of the built-in layers (every class, every activation), each
   delegating init and forward to the real layer, its backward carrying ONE realistic mistake (a
   transposed kernel, a stride off by one, a missing term of batch norm's gradient, a write into
   dy, a float64 gradient of a float32 layer, ...). :func:`~research.verify.layer_suite.check_layer`
   fails each, against the real layer's independent JAX reference, a wrong value by autodiff and
   by finite differences alike; the same wrapper with its mistake switched off (``bug=False``,
   the same code) passes at the same shape: what is caught is the mistake, nothing else.
2. :func:`test_no_false_alarm_on_correct_layers`: 500 derandomized hypothesis draws of correct
   built-in layers (arguments, shape, batch size, seed) all pass (slow: ~80 s).
3. :data:`BLIND_SPOTS`, strict expected failures: bugs check_layer passes (max-pool's
   tie-breaking, a wrong running-statistics update), each shown to be a bug by other means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from research.engine.layers.activations import ACTIVATION_LAYERS, Activation
from research.engine.layers.base import Layer, LayerParams, Shape, describe, shape_problem
from research.engine.layers.base import needs as needs_of
from research.engine.layers.conv import Conv2D, ConvCache
from research.engine.layers.dense import Dense, Flatten
from research.engine.layers.dropout import Dropout
from research.engine.layers.norm import BatchNorm, LayerNorm
from research.engine.layers.pooling import AvgPool2D, MaxPool2D, MaxPoolCache
from research.engine.layers.residual import Residual
from research.verify.layer_refs import reference_for
from research.verify.layer_suite import LayerReport, check_layer

Grads = tuple[np.ndarray, LayerParams]

# --- the wrapper every mutant is ---------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    """The real ``layer`` in all but ``backward``, which each subclass writes with one mistake,
    planted when ``bug`` is True; ``bug=False`` runs the same code without it."""

    layer: Any  # the real built-in layer
    bug: bool = True

    @property
    def needs(self) -> tuple[str, ...]:
        return needs_of(self.layer)

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return self.layer.init(rng, in_shape, dtype)

    def forward(self, params: LayerParams, x: Any, xp: Any, **extras: Any) -> tuple[Any, Any]:
        return self.layer.forward(params, x, xp, **extras)

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        raise NotImplementedError

    def out_shape(self, in_shape: Shape) -> Shape:
        return self.layer.out_shape(in_shape)

    def check(self, in_shape: Shape) -> str | None:
        method = getattr(self.layer, "check", None)
        return method(in_shape) if callable(method) else None

    def init_state(self, in_shape: Shape, dtype: Any) -> dict[str, np.ndarray]:
        return self.layer.init_state(in_shape, dtype)

    def next_state(self, state: dict[str, Any], cache: Any) -> dict[str, Any]:
        return self.layer.next_state(state, cache)

    def draw_mask(self, rng: np.random.Generator, shape: Shape, dtype: Any) -> Any:
        return self.layer.draw_mask(rng, shape, dtype)

    def describe(self) -> str:
        return f"{type(self).__name__}[{describe(self.layer)}, bug={self.bug}]"


# --- dense and flatten -------------------------------------------------------------------------


class DenseDxViaW(Mutant):
    """dx = dy·W instead of dy·Wᵀ: only shape-safe when W is square; caught by values."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        flat, shape = cache
        W = params["W"] if self.bug else params["W"].T
        return (dy @ W).reshape(shape), {"W": flat.T @ dy, "b": dy.sum(axis=0)}


class DenseBiasMean(Mutant):
    """db is the batch mean of dy, not its sum."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        return dx, {**grads, "b": dy.mean(axis=0) if self.bug else dy.sum(axis=0)}


class DenseWeightTransposed(Mutant):
    """dW = dyᵀ·x (the product in the wrong order, transposed): square W only; caught by values."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        flat, _ = cache
        return dx, {**grads, "W": dy.T @ flat if self.bug else flat.T @ dy}


class DenseNoReshape(Mutant):
    """dx left flat (B, n_in) instead of reshaped back to the input's (B, C, H, W)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        flat, shape = cache
        dx = dy @ params["W"].T
        return (dx if self.bug else dx.reshape(shape)), {"W": flat.T @ dy, "b": dy.sum(axis=0)}


class DenseSignOfOneElement(Mutant):
    """dW[0, 0] with the wrong sign, every other element right."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        dW = grads["W"].copy()
        if self.bug:
            dW[0, 0] = -dW[0, 0]
        return dx, {**grads, "W": dW}


class DenseScaledByBatch(Mutant):
    """dW scaled by (B − 1)/B (an "unbiased" correction where none belongs)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        rows = len(dy)
        factor = (rows - 1) / rows if self.bug else 1.0
        return dx, {**grads, "W": grads["W"] * factor}


class DenseWrongKey(Mutant):
    """The bias's gradient under the key "bias" where the parameter is "b"."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        return dx, {"W": grads["W"], ("bias" if self.bug else "b"): grads["b"]}


class FlattenChannelsLast(Mutant):
    """dy unflattened in (H, W, C) order, then transposed to NCHW: the wrong reshape order."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        batch, channels, height, width = cache
        if self.bug:
            return dy.reshape(batch, height, width, channels).transpose(0, 3, 1, 2), {}
        return dy.reshape(cache), {}


# --- convolution -------------------------------------------------------------------------------


def conv_input_gradient(
    dy: np.ndarray, W: np.ndarray, in_shape: Shape, stride: int, pad: int, crop: int
) -> np.ndarray:
    """∂x of a convolution the textbook way: each kernel tap (i, j) sends dy·W[:, :, i, j] back
    to the padded input positions it read; the padding (``crop`` from the border) is cut off."""
    batch, channels, height, width = in_shape
    out_h, out_w = dy.shape[2:]
    grad = np.zeros((batch, channels, height + 2 * pad, width + 2 * pad), dy.dtype)
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    for i in range(W.shape[2]):
        for j in range(W.shape[3]):
            tap = np.einsum("bfhw,fc->bchw", dy, W[:, :, i, j])
            grad[:, :, i : i + span_h : stride, j : j + span_w : stride] += tap
    return grad[:, :, crop : crop + height, crop : crop + width]


class ConvKernelTransposed(Mutant):
    """dx reads the kernel transposed, W[f, c, j, i] for W[f, c, i, j] (square kernels)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        W = params["W"].transpose(0, 1, 3, 2) if self.bug else params["W"]
        return self.layer.backward({**params, "W": np.ascontiguousarray(W)}, cache, dy)


class ConvKernelRotated(Mutant):
    """dx from the kernel rotated by 180°: the flip of the full convolution done twice (or
    forgotten, by one's convention)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        W = params["W"][:, :, ::-1, ::-1] if self.bug else params["W"]
        return self.layer.backward({**params, "W": np.ascontiguousarray(W)}, cache, dy)


class ConvStrideOffByOne(Mutant):
    """dx scattered with stride s − 1 instead of s."""

    def backward(self, params: LayerParams, cache: ConvCache, dy: np.ndarray) -> Grads:
        conv = self.layer
        stride = conv.stride - 1 if self.bug else conv.stride
        dx = conv_input_gradient(dy, params["W"], cache.in_shape, stride, conv.pad, conv.pad)
        return dx, conv.backward_params(params, cache, dy)


class ConvCropOffByOne(Mutant):
    """dx cut out of the padded gradient one pixel up and left of where the input sits."""

    def backward(self, params: LayerParams, cache: ConvCache, dy: np.ndarray) -> Grads:
        conv = self.layer
        crop = conv.pad - 1 if self.bug else conv.pad
        dx = conv_input_gradient(dy, params["W"], cache.in_shape, conv.stride, conv.pad, crop)
        return dx, conv.backward_params(params, cache, dy)


class ConvBiasMean(Mutant):
    """db as the mean of dy over batch and positions, not its sum."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        db = dy.mean(axis=(0, 2, 3)) if self.bug else dy.sum(axis=(0, 2, 3))
        return dx, {**grads, "b": db}


class ConvChannelsSwapped(Mutant):
    """dW with its filter and channel axes swapped: shape-safe only when filters == channels."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        dW = grads["W"].transpose(1, 0, 2, 3) if self.bug else grads["W"]
        return dx, {**grads, "W": dW}


# --- pooling -----------------------------------------------------------------------------------


def max_offsets(cache: MaxPoolCache) -> tuple[np.ndarray, np.ndarray]:
    """Each window's first maximum as (row, column) offsets within the window, (B, C, Ho, Wo)
    each, read from the real forward's cache (see MaxPoolCache)."""
    rows = cache.first_row.astype(np.intp)
    absolute = cache.stride * np.arange(rows.shape[2])[:, None] + rows
    cols = np.take_along_axis(cache.first_col.astype(np.intp), absolute, axis=2)
    return rows, cols


def route(
    dy: np.ndarray, rows: np.ndarray, cols: np.ndarray, in_shape: Shape, stride: int, add: bool
) -> np.ndarray:
    """dx of a pooling that sends each window's dy to its element at offset (rows, cols);
    ``add=False`` writes, so a later window overwrites an earlier one's share."""
    grad = np.zeros(in_shape, dy.dtype)
    b, c = np.indices(dy.shape[:2])
    for ho in range(dy.shape[2]):
        for wo in range(dy.shape[3]):
            at = (b, c, ho * stride + rows[:, :, ho, wo], wo * stride + cols[:, :, ho, wo])
            if add:
                grad[at] += dy[:, :, ho, wo]
            else:
                grad[at] = dy[:, :, ho, wo]
    return grad


class MaxPoolNeighbour(Mutant):
    """Each window's gradient lands on the element right of its maximum (wrapping around in the
    window): an off-by-one in the argmax's column."""

    def backward(self, params: LayerParams, cache: MaxPoolCache, dy: np.ndarray) -> Grads:
        rows, cols = max_offsets(cache)
        if self.bug:
            cols = (cols + 1) % cache.kernel
        return route(dy, rows, cols, cache.layout.shape, cache.stride, add=True), {}


class MaxPoolWindowTransposed(Mutant):
    """The argmax's offset read as (column, row) for (row, column)."""

    def backward(self, params: LayerParams, cache: MaxPoolCache, dy: np.ndarray) -> Grads:
        rows, cols = max_offsets(cache)
        if self.bug:
            rows, cols = cols, rows
        return route(dy, rows, cols, cache.layout.shape, cache.stride, add=True), {}


class MaxPoolOverwrites(Mutant):
    """Overlapping windows write their gradient instead of adding it: where one element is the
    maximum of two windows, the later window's share replaces the earlier one's."""

    def backward(self, params: LayerParams, cache: MaxPoolCache, dy: np.ndarray) -> Grads:
        rows, cols = max_offsets(cache)
        return route(dy, rows, cols, cache.layout.shape, cache.stride, add=not self.bug), {}


class MaxPoolEveryElement(Mutant):
    """Each window's dy sent to every element of the window, not to its maximum."""

    def backward(self, params: LayerParams, cache: MaxPoolCache, dy: np.ndarray) -> Grads:
        if not self.bug:
            return route(dy, *max_offsets(cache), cache.layout.shape, cache.stride, add=True), {}
        k, s = cache.kernel, cache.stride
        grad = np.zeros(cache.layout.shape, dy.dtype)
        for ho in range(dy.shape[2]):
            for wo in range(dy.shape[3]):
                grad[:, :, ho * s : ho * s + k, wo * s : wo * s + k] += dy[:, :, ho, wo, None, None]
        return grad, {}


def avg_pool_input_gradient(
    dy: np.ndarray, in_shape: Shape, kernel: int, stride: int, divisor: int, shift: int
) -> np.ndarray:
    """dx of average pooling, window by window: each element of a window gets dy / ``divisor``;
    ``shift`` moves the windows right by that many columns (cut at the border)."""
    grad = np.zeros(in_shape, dy.dtype)
    for ho in range(dy.shape[2]):
        for wo in range(dy.shape[3]):
            top, left = ho * stride, wo * stride + shift
            window = grad[:, :, top : top + kernel, left : left + kernel]
            window += dy[:, :, ho, wo, None, None] / divisor
    return grad


class AvgPoolNoDivision(Mutant):
    """Each window value receives dy, the 1/k² of the mean forgotten."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        k, s = self.layer.kernel, self.layer.stride
        divisor = 1 if self.bug else k * k
        return avg_pool_input_gradient(dy, cache.shape, k, s, divisor, 0), {}


class AvgPoolDividesByK(Mutant):
    """Each window value receives dy / k, not dy / k² (the window's side, not its size)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        k, s = self.layer.kernel, self.layer.stride
        divisor = k if self.bug else k * k
        return avg_pool_input_gradient(dy, cache.shape, k, s, divisor, 0), {}


class AvgPoolWindowShifted(Mutant):
    """Each window's share lands one column right of the window (its start off by one)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        k, s = self.layer.kernel, self.layer.stride
        return avg_pool_input_gradient(dy, cache.shape, k, s, k * k, int(self.bug)), {}


# --- batch norm and layer norm -----------------------------------------------------------------


def channel_mean(values: np.ndarray) -> np.ndarray:
    """Batch norm's per-channel mean over every axis but 1, kept for broadcasting."""
    return values.mean(axis=(0, *range(2, values.ndim)), keepdims=True)


def per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_dx(
    params: LayerParams, cache: Any, dy: np.ndarray, *, mean_term: bool = True,
    variance_term: bool = True, gamma: bool = True, coupled: bool | None = None,
) -> np.ndarray:  # fmt: skip
    """Batch norm's dx, γ·inv_std·(dy − mean(dy) − x̂·mean(dy·x̂)) in training and γ·inv_std·dy
    in evaluation (``coupled`` overrides which), with the terms switched off as asked."""
    x_hat, inv_std, batch = cache
    scale = inv_std * (per_channel(params["gamma"], dy.ndim) if gamma else 1.0)
    if not (batch is not None if coupled is None else coupled):
        return scale * dy
    dx = dy - (channel_mean(dy) if mean_term else 0.0)
    if variance_term:
        dx = dx - x_hat * channel_mean(dy * x_hat)
    return scale * dx


class BatchNormNoMeanTerm(Mutant):
    """Training dx drops −mean(dy): the batch mean's dependence on x."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        return batch_norm_dx(params, cache, dy, mean_term=not self.bug), grads


class BatchNormNoVarianceTerm(Mutant):
    """Training dx drops −x̂·mean(dy·x̂): the batch variance's dependence on x."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        return batch_norm_dx(params, cache, dy, variance_term=not self.bug), grads


class BatchNormNoGammaInDx(Mutant):
    """dx = inv_std·(...) without the factor γ (as if γ were 1), in both modes."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        return batch_norm_dx(params, cache, dy, gamma=not self.bug), grads


class BatchNormEvaluationCoupled(Mutant):
    """Evaluation mode's dx uses training's formula, as if the running statistics were the
    batch's (they are constants there: dx = γ·inv_std·dy)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        coupled = True if self.bug else None
        return batch_norm_dx(params, cache, dy, coupled=coupled), grads


class BatchNormGammaFromCentered(Mutant):
    """dγ = Σ dy·(x − μ), the centered x, instead of Σ dy·x̂ (the 1/σ forgotten)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        x_hat, inv_std, _ = cache
        used = x_hat / inv_std if self.bug else x_hat
        return dx, {**grads, "gamma": (dy * used).sum(axis=(0, *range(2, dy.ndim)))}


class BatchNormBetaMean(Mutant):
    """dβ as the per-channel mean of dy, not its sum."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        axes = (0, *range(2, dy.ndim))
        return dx, {**grads, "beta": dy.mean(axis=axes) if self.bug else dy.sum(axis=axes)}


def layer_norm_dx(
    params: LayerParams, cache: Any, dy: np.ndarray, *, mean_term: bool = True,
    variance_term: bool = True, axes: tuple[int, ...] | None = None,
) -> np.ndarray:  # fmt: skip
    """Layer norm's dx, inv_std·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dx̂ = γ·dy, the means over
    each example's values (or ``axes``), with the terms switched off as asked."""
    x_hat, inv_std = cache
    axes = tuple(range(1, dy.ndim)) if axes is None else axes
    dx_hat = dy * params["gamma"]
    dx = dx_hat - (dx_hat.mean(axis=axes, keepdims=True) if mean_term else 0.0)
    if variance_term:
        dx = dx - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    return inv_std * dx


class LayerNormNoVarianceTerm(Mutant):
    """dx drops −x̂·mean(dx̂·x̂): the example's variance's dependence on x."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        return layer_norm_dx(params, cache, dy, variance_term=not self.bug), grads


class LayerNormNoMeanTerm(Mutant):
    """dx drops −mean(dx̂): the example's mean's dependence on x."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        return layer_norm_dx(params, cache, dy, mean_term=not self.bug), grads


class LayerNormWrongAxis(Mutant):
    """dx's means taken over the batch (axis 0), batch norm's way, not over each example."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        _, grads = self.layer.backward(params, cache, dy)
        axes = (0,) if self.bug else None
        return layer_norm_dx(params, cache, dy, axes=axes), grads


# --- dropout and activations -------------------------------------------------------------------


class DropoutUnscaled(Mutant):
    """dx = dy·[mask ≠ 0]: the kept units' 1/(1 − rate) scale left out."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        if cache is None:
            return dy, {}
        return dy * ((cache != 0) if self.bug else cache), {}


class DropoutMaskIgnored(Mutant):
    """dx = dy in training too: the mask not applied to the gradient."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        return (dy if cache is None or self.bug else dy * cache), {}


class SigmoidOfOutput(Mutant):
    """σ′ = s·(1 − s) with s = σ(y), the sigmoid applied again to the cached output y = σ(x)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        s = 1 / (1 + np.exp(-cache)) if self.bug else cache
        return dy * s * (1 - s), {}


class TanhOneMinusY(Mutant):
    """tanh′ = 1 − y instead of 1 − y²."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        return dy * (1 - (cache if self.bug else cache * cache)), {}


class ReluLeaks(Mutant):
    """ReLU's backward passes 0.01·dy where x < 0 (leaky ReLU's derivative)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        leak = dy.dtype.type(0.01 if self.bug else 0.0)
        return dy * np.where(cache, dy.dtype.type(1), leak), {}


class GeluNoCubicTerm(Mutant):
    """gelu′ with u′ = c instead of c·(1 + 3a·x²): the cubic's derivative left out."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        x, t = cache
        c, a = 0.7978845608028654, 0.044715
        du = c if self.bug else c * (1 + 3 * a * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du), {}


class ReluZeroesDyInPlace(Mutant):
    """ReLU's backward zeroes the upstream gradient in place (dy[x <= 0] = 0; return dy): the
    values are right, the caller's dy is not."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        if not self.bug:
            dy = dy.copy()
        dy[~cache] = 0
        return dy, {}


class SwishNoSigmaTerm(Mutant):
    """swish′ = x·σ(1 − σ) only: the product rule's σ term left out."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        x, s = cache
        return dy * ((0.0 if self.bug else s) + x * s * (1 - s)), {}


# --- residual blocks ---------------------------------------------------------------------------


class ResidualSkipDropped(Mutant):
    """dx = the gradient through f alone: the skip connection's dy dropped."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        return (dx - dy if self.bug else dx), grads


class ResidualSkipTwice(Mutant):
    """dx = 2·dy + the gradient through f: the skip connection counted twice."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        return (dx + dy if self.bug else dx), grads


class ResidualKeysSwapped(Mutant):
    """The gradients of inner layers 0 and 2 filed under each other's keys ("0.W" ↔ "2.W"):
    shape-safe when both are dense(n) on n features."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        if not self.bug:
            return dx, grads
        swap = {"0": "2", "2": "0"}
        return dx, {swap.get(k[0], k[0]) + k[1:]: v for k, v in grads.items()}


class BatchNormBetaInFloat64(Mutant):
    """dβ accumulated in float64 for accuracy and not cast back: a float32 layer hands on a
    float64 gradient (right values, wrong dtype)."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        dx, grads = self.layer.backward(params, cache, dy)
        beta = dy.sum(axis=(0, *range(2, dy.ndim)), dtype=np.float64)
        return dx, {**grads, "beta": beta if self.bug else beta.astype(dy.dtype)}


class AvgPoolChannelsLastMemory(Mutant):
    """Right on inputs in NCHW memory; on inputs in channels-last memory (what a conv hands on,
    and where the real pooling takes other loops) each window value gets dy/k, not dy/k²."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        k, s = self.layer.kernel, self.layer.stride
        divisor = k if self.bug and cache.channels_last else k * k
        return avg_pool_input_gradient(dy, cache.shape, k, s, divisor, 0), {}


# --- the mutants, each caught ------------------------------------------------------------------

FEATURES: Shape = (5,)
IMAGES: Shape = (3, 7, 9)  # C, H, W all different: a transposed or misrouted array shows

#: name -> (mutant, one example's shape). Square cases (a 5×5 W, filters == channels) are where
#: a transposition keeps every shape, and only the values can tell.
MUTANTS: dict[str, tuple[Mutant, Shape]] = {
    "dense-dx-via-W-square": (DenseDxViaW(Dense(5)), FEATURES),
    "dense-db-mean": (DenseBiasMean(Dense(4)), IMAGES),
    "dense-dW-transposed-square": (DenseWeightTransposed(Dense(5)), FEATURES),
    "dense-dx-not-reshaped": (DenseNoReshape(Dense(4)), IMAGES),
    "dense-dW-one-sign": (DenseSignOfOneElement(Dense(4)), FEATURES),
    "dense-dW-scaled-(B-1)/B": (DenseScaledByBatch(Dense(4)), FEATURES),
    "dense-wrong-key": (DenseWrongKey(Dense(4)), FEATURES),
    "flatten-channels-last-order": (FlattenChannelsLast(Flatten()), IMAGES),
    "conv-kernel-transposed": (ConvKernelTransposed(Conv2D(4, 3, 1, 1)), IMAGES),
    "conv-kernel-rotated": (ConvKernelRotated(Conv2D(4, 3, 1, 1)), IMAGES),
    "conv-stride-off-by-one": (ConvStrideOffByOne(Conv2D(4, 3, 2, 1)), IMAGES),
    "conv-crop-off-by-one": (ConvCropOffByOne(Conv2D(2, 3, 1, 1)), IMAGES),
    "conv-db-mean": (ConvBiasMean(Conv2D(4, 2, 2, 0)), IMAGES),
    "conv-channels-swapped-square": (ConvChannelsSwapped(Conv2D(3, 3, 1, 1)), IMAGES),
    "maxpool-neighbour": (MaxPoolNeighbour(MaxPool2D(2)), IMAGES),
    "maxpool-window-transposed": (MaxPoolWindowTransposed(MaxPool2D(3, 2)), IMAGES),
    "maxpool-overlap-overwrites": (MaxPoolOverwrites(MaxPool2D(3, 2)), IMAGES),
    "maxpool-every-element": (MaxPoolEveryElement(MaxPool2D(2, 1)), IMAGES),
    "avgpool-no-1/k2": (AvgPoolNoDivision(AvgPool2D(2)), IMAGES),
    "avgpool-1/k": (AvgPoolDividesByK(AvgPool2D(3, 2)), IMAGES),
    "avgpool-window-shifted": (AvgPoolWindowShifted(AvgPool2D(3, 2)), IMAGES),
    "batchnorm-no-mean-term": (BatchNormNoMeanTerm(BatchNorm()), IMAGES),
    "batchnorm-no-variance-term": (BatchNormNoVarianceTerm(BatchNorm()), FEATURES),
    "batchnorm-no-gamma-in-dx": (BatchNormNoGammaInDx(BatchNorm()), IMAGES),
    "batchnorm-evaluation-coupled": (BatchNormEvaluationCoupled(BatchNorm(0.8)), IMAGES),
    "batchnorm-dgamma-from-centered": (BatchNormGammaFromCentered(BatchNorm()), FEATURES),
    "batchnorm-dbeta-mean": (BatchNormBetaMean(BatchNorm()), IMAGES),
    "layernorm-no-variance-term": (LayerNormNoVarianceTerm(LayerNorm()), IMAGES),
    "layernorm-no-mean-term": (LayerNormNoMeanTerm(LayerNorm()), FEATURES),
    "layernorm-wrong-axis": (LayerNormWrongAxis(LayerNorm()), IMAGES),
    "dropout-unscaled": (DropoutUnscaled(Dropout(0.3)), IMAGES),
    "dropout-mask-ignored": (DropoutMaskIgnored(Dropout(0.5)), FEATURES),
    "sigmoid-of-output": (SigmoidOfOutput(Activation("sigmoid")), IMAGES),
    "tanh-1-y": (TanhOneMinusY(Activation("tanh")), FEATURES),
    "relu-leaks": (ReluLeaks(Activation("relu")), IMAGES),
    "relu-zeroes-dy-in-place": (ReluZeroesDyInPlace(Activation("relu")), IMAGES),
    "gelu-no-cubic-term": (GeluNoCubicTerm(Activation("gelu")), IMAGES),
    "swish-no-sigma-term": (SwishNoSigmaTerm(Activation("swish")), FEATURES),
    "residual-skip-dropped": (
        ResidualSkipDropped(Residual((Conv2D(3, 3, 1, 1), BatchNorm(), Activation("relu")))),
        IMAGES,
    ),
    "residual-skip-twice": (
        ResidualSkipTwice(Residual((Dense(5), Activation("tanh"), Dropout(0.3)))),
        FEATURES,
    ),
    "residual-keys-swapped": (
        ResidualKeysSwapped(Residual((Dense(5), Activation("tanh"), Dense(5)))),
        FEATURES,
    ),
    "batchnorm-dbeta-float64": (BatchNormBetaInFloat64(BatchNorm()), IMAGES),
    "avgpool-channels-last-memory": (AvgPoolChannelsLastMemory(AvgPool2D(2)), IMAGES),
}

BUILT_IN_LAYERS = (
    Dense, Flatten, Conv2D, MaxPool2D, AvgPool2D, BatchNorm, LayerNorm, Dropout, Activation,
    Residual,
)  # fmt: skip


@functools.cache
def builtin_reference(layer: Layer) -> Callable[..., Any]:
    """The real layer's independent JAX reference (research/verify/layer_refs), one object per
    layer so that the verifier's compiled functions are reused."""
    reference = reference_for(layer)
    assert reference is not None, f"{describe(layer)} has no registered reference"
    return functools.partial(reference, layer)


def check_mutant(mutant: Mutant, shape: Shape) -> LayerReport:
    return check_layer(mutant, [shape], reference=builtin_reference(mutant.layer))


def failing_rows(report: LayerReport) -> str:
    return "\n  ".join(report.failures()) or "(none)"


def test_the_mutants_cover_every_built_in_layer() -> None:
    assert len(MUTANTS) >= 30
    wrapped = [mutant.layer for mutant, _ in MUTANTS.values()]
    assert {type(layer) for layer in wrapped} == set(BUILT_IN_LAYERS)
    activations = {layer.name for layer in wrapped if isinstance(layer, Activation)}
    assert activations == set(ACTIVATION_LAYERS)
    assert len({type(mutant) for mutant, _ in MUTANTS.values()}) == len(MUTANTS)  # one bug each


#: Mutants wrong in one respect that only one check looks at: a write into dy (the values are
#: right), a float64 gradient of a float32 layer, a mistake on channels-last memory alone.
ONLY_ONE_CHECK = {
    "relu-zeroes-dy-in-place": "inputs unchanged",
    "batchnorm-dbeta-float64": "autodiff float32",
    "avgpool-channels-last-memory": "channels-last inputs, float64",
}


def failed_checks(report: LayerReport) -> set[str]:
    return {section.check for section in report.sections if not section.passed}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_check_layer_catches_the_mutant(name: str) -> None:
    """The mutant fails, on its gradients (its output is the real layer's): a wrong value is
    seen twice over, by JAX autodiff and by finite differences of the numpy forward alone; a
    write into dy by the "inputs unchanged" check. The same wrapper with the mistake switched
    off passes at the same shape."""
    mutant, shape = MUTANTS[name]
    report = check_mutant(mutant, shape)
    assert not report.passed, f"{name} was not caught"
    bad_outputs = [
        row.name
        for section in report.sections
        for row in section.rows
        if row.name == "output y" and not row.passed
    ]
    assert not bad_outputs, f"the output failed, not the gradients:\n  {failing_rows(report)}"
    if name in ONLY_ONE_CHECK:
        assert failed_checks(report) == {ONLY_ONE_CHECK[name]}, failing_rows(report)
    else:
        assert {"autodiff float64", "finite differences float64"} <= failed_checks(report)
    fixed = check_mutant(replace(mutant, bug=False), shape)
    assert fixed.passed, f"{name} without its bug fails:\n  {failing_rows(fixed)}"


# --- what check_layer cannot see -----------------------------------------------------------------


class MaxPoolLastMaximum(Mutant):
    """Each window's gradient goes to its LAST maximal element in row-major order, where the
    layer's contract (and JAX's reduce_window) says the first: a difference on ties only. The
    cache keeps x, to find the last maximum."""

    def forward(self, params: LayerParams, x: Any, xp: Any, **extras: Any) -> tuple[Any, Any]:
        y, cache = self.layer.forward(params, x, xp)
        return y, (x, cache)

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        x, inner = cache
        if not self.bug:
            return self.layer.backward(params, inner, dy)
        k, s = self.layer.kernel, self.layer.stride
        rows, cols = np.empty(dy.shape, np.intp), np.empty(dy.shape, np.intp)
        for ho in range(dy.shape[2]):
            for wo in range(dy.shape[3]):
                window = x[:, :, ho * s : ho * s + k, wo * s : wo * s + k]
                window = window.reshape(*dy.shape[:2], k * k)
                last = k * k - 1 - np.argmax(window[..., ::-1], axis=-1)
                rows[:, :, ho, wo], cols[:, :, ho, wo] = np.divmod(last, k)
        return route(dy, rows, cols, x.shape, s, add=True), {}


class BatchNormMomentumFlipped(Mutant):
    """The running statistics updated with PyTorch's momentum in Keras' formula,
    running = (1 − m)·running + m·batch; the backward is the real one."""

    def backward(self, params: LayerParams, cache: Any, dy: np.ndarray) -> Grads:
        return self.layer.backward(params, cache, dy)

    def next_state(self, state: dict[str, Any], cache: Any) -> dict[str, Any]:
        momentum = 1 - self.layer.momentum if self.bug else self.layer.momentum
        return replace(self.layer, momentum=momentum).next_state(state, cache)


#: name -> (mutant, shape, why check_layer passes it). Each is a real bug (see the tests below).
BLIND_SPOTS: dict[str, tuple[Mutant, Shape, str]] = {
    "maxpool-last-maximum": (
        MaxPoolLastMaximum(MaxPool2D(2)),
        IMAGES,
        "tie-breaking: check_layer's continuous inputs hold no ties (by design; "
        "tests/test_layers_verify.py's tie test pins the first maximum down)",
    ),
    "batchnorm-momentum-flipped": (
        BatchNormMomentumFlipped(BatchNorm()),
        IMAGES,
        "next_state: check_layer never calls it (the running statistics' update)",
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=why))
        for name, (_, _, why) in BLIND_SPOTS.items()
    ],
)
def test_blind_spot(name: str) -> None:
    """Bugs check_layer passes, kept as strict expected failures: a verifier that learns to see
    one turns its test into an unexpected pass (then move the mutant into MUTANTS)."""
    mutant, shape, _ = BLIND_SPOTS[name]
    assert not check_mutant(mutant, shape).passed


@pytest.mark.parametrize("name", list(BLIND_SPOTS))
def test_blind_spot_switched_off_passes(name: str) -> None:
    """The blind spots' wrappers without their bug pass (so an expected failure above is the
    verifier missing the bug, not a broken wrapper)."""
    mutant, shape, _ = BLIND_SPOTS[name]
    report = check_mutant(replace(mutant, bug=False), shape)
    assert report.passed, failing_rows(report)


def test_blind_spot_last_maximum_is_a_bug() -> None:
    """On a window holding two equal maxima the mutant routes the gradient elsewhere."""
    mutant = BLIND_SPOTS["maxpool-last-maximum"][0]
    x = np.array([[[[1.0, 1.0], [0.0, 0.0]]]])
    dxs = []
    for layer in (mutant, mutant.layer):
        y, cache = layer.forward({}, x, np)
        dxs.append(layer.backward({}, cache, np.ones_like(y))[0])
    np.testing.assert_array_equal(dxs[1], [[[[1.0, 0.0], [0.0, 0.0]]]])
    np.testing.assert_array_equal(dxs[0], [[[[0.0, 1.0], [0.0, 0.0]]]])


def test_blind_spot_momentum_is_a_bug() -> None:
    mutant = BLIND_SPOTS["batchnorm-momentum-flipped"][0]
    rng = np.random.default_rng(0)
    params = mutant.init(rng, (3,), np.float64)
    state = mutant.init_state((3,), np.float64)
    _, cache = mutant.forward(params, rng.standard_normal((4, 3)), np, training=True, state=state)
    wrong, right = mutant.next_state(state, cache), mutant.layer.next_state(state, cache)
    assert not np.allclose(wrong["mean"], right["mean"])


# --- no false alarm ------------------------------------------------------------------------------

FEATURE_SHAPES: list[Shape] = [(1,), (5,)]
#: (3, 2, 7) is 2 high: kernels of 3 (unpadded) are refused there, and rejected by assume.
IMAGE_SHAPES: list[Shape] = [(1, 5, 6), (3, 2, 7)]
RESIDUAL_BLOCKS: list[tuple[Layer, Shape]] = [
    (Residual((Dense(5), Activation("tanh"))), (5,)),
    (Residual((LayerNorm(), Dropout(0.4), Dense(5))), (5,)),
    (Residual((Conv2D(3, 3, 1, 1), BatchNorm(), Activation("relu"))), (3, 2, 7)),
    (Residual((Conv2D(1, 1), Activation("gelu"))), (1, 5, 6)),
]
KINDS = [
    "dense", "flatten", "activation", "conv", "maxpool", "avgpool", "batchnorm", "layernorm",
    "dropout", "residual",
]  # fmt: skip


@st.composite
def correct_layers(draw: st.DrawFn) -> tuple[Layer, Shape]:
    """A built-in layer, its arguments drawn from small menus, and an input shape it takes.
    The menus allow 140 (layer, shape) pairs (420 with the batch size), of which the 500 draws
    meet ~110 (~210): the verifier compiles its JAX functions once per (layer, shape, batch)."""
    kind = draw(st.sampled_from(KINDS))
    images = st.sampled_from(IMAGE_SHAPES)
    anything = st.sampled_from(FEATURE_SHAPES + IMAGE_SHAPES)
    one_of = st.sampled_from
    if kind == "residual":
        layer, shape = draw(one_of(RESIDUAL_BLOCKS))
    elif kind == "dense":
        layer, shape = Dense(draw(one_of([1, 4])), draw(one_of(["normal", "he"]))), draw(anything)
    elif kind == "flatten":
        layer, shape = Flatten(), draw(images)
    elif kind == "activation":
        layer, shape = Activation(draw(one_of(ACTIVATION_LAYERS))), draw(anything)
    elif kind == "conv":
        filters, kernel = draw(one_of([1, 2])), draw(one_of([1, 2, 3]))
        stride, pad = draw(one_of([1, 2])), draw(one_of([0, 1]))
        layer, shape = Conv2D(filters, kernel, stride, pad), draw(images)
    elif kind in ("maxpool", "avgpool"):
        pooling = MaxPool2D if kind == "maxpool" else AvgPool2D
        layer, shape = pooling(draw(one_of([1, 2, 3])), draw(one_of([1, 2, 3]))), draw(images)
    elif kind == "batchnorm":
        layer, shape = BatchNorm(draw(one_of([0.9, 0.5]))), draw(anything)
    elif kind == "layernorm":
        layer, shape = LayerNorm(), draw(anything)
    else:
        layer, shape = Dropout(draw(one_of([0.0, 0.3, 0.8]))), draw(anything)
    assume(shape_problem(layer, shape) is None)
    return layer, shape


@pytest.mark.slow
@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=correct_layers(), batch=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_no_false_alarm_on_correct_layers(case: tuple[Layer, Shape], batch: int, seed: int) -> None:
    """Every correct built-in layer passes check_layer: no false alarm over 500 draws of layer,
    arguments, shape, batch size and seed (derandomized: the same draws every run)."""
    layer, shape = case
    report = check_layer(layer, [shape], batch=batch, seed=seed)
    assert report.passed, (
        f"{describe(layer)} on {shape}, batch {batch}, seed {seed}:\n  {failing_rows(report)}"
    )
