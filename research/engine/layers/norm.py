"""Batch norm and layer norm, forward beside backward.

Both normalize with the biased variance (divide by n) and ``eps`` inside the square root, as
PyTorch's ``BatchNorm1d/2d`` and ``LayerNorm`` do, then scale by ``gamma`` and shift by ``beta``
(neither is decayed by l2).

Batch norm's running statistics (its ``state``) follow Keras' momentum convention,
``running = momentum·running + (1 − momentum)·batch`` (our 0.9 is PyTorch's ``momentum=0.1``),
and, as PyTorch does, the running variance averages in the *unbiased* batch variance
(n/(n − 1) times the one that normalized the batch; n = values per channel). With n = 1 (a batch
of one row of features) that is 0/0: the running variance is then kept as it was (the mean is
still averaged in), where PyTorch refuses the batch; a short last batch never stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from research.engine.layers.base import ArrayNamespace, LayerParams, Shape

_DEFAULT_MOMENTUM = 0.9


def _channel_axes(ndim: int) -> tuple[int, ...]:
    """The axes batch norm averages over: batch and space, every axis but the channels (1)."""
    return (0, *range(2, ndim))


def _mean(values: Any, axes: tuple[int, ...]) -> Any:
    """The mean over ``axes`` (kept), accumulated in float64 and returned in the values' dtype.

    numpy sums pairwise only along a contiguous axis; a conv's output is channels-last in
    memory, so a float32 mean over (B, H, W) would add thousands of values one after another
    (errors of ~3e-5 relative on 64 MNIST images, against ~1e-7 pairwise). float64 accumulation
    keeps float32 batch norm within the float32 gradient tolerances.
    """
    return values.mean(axis=axes, keepdims=True, dtype=np.float64).astype(values.dtype)


#: Rows a matrix-vector product adds per block in :func:`_channel_mean` (the blocks' sums are
#: then added in float64).
_BLOCK = 64


def _channel_mean(values: Any) -> Any:
    """Batch norm's per-channel mean of ``values`` (B, C, ...), kept as (1, C, 1, ...), in the
    values' dtype: :func:`_mean` over every axis but 1, computed faster for numpy arrays.

    The values as rows (N, C), channels last (a view for a conv's channels-last output, a copy
    otherwise), are added in blocks of 64 rows by a BLAS product with a vector of ones, and the
    blocks' sums in float64: 5x faster than numpy's float64 mean over strided axes, and as
    accurate within float32 (a relative error of ~4e-9 on (64, 32, 26, 26), against ~7e-6 for
    a plain float32 sum).
    """
    if not isinstance(values, np.ndarray):  # jax.numpy (the verifier's run of this forward)
        return _mean(values, _channel_axes(values.ndim))
    channels = values.shape[1]
    rows = np.moveaxis(values, 1, -1).reshape(-1, channels)
    n = len(rows)
    blocks = n // _BLOCK
    total = np.zeros(channels, dtype=np.float64)
    if blocks:
        ones = np.ones(_BLOCK, dtype=values.dtype)
        block_sums = ones @ rows[: blocks * _BLOCK].reshape(blocks, _BLOCK, channels)
        total += block_sums.sum(axis=0, dtype=np.float64)
    if n > blocks * _BLOCK:
        total += rows[blocks * _BLOCK :].sum(axis=0, dtype=np.float64)
    return _per_channel((total / n).astype(values.dtype), values.ndim)


def _per_channel(values: Any, ndim: int) -> Any:
    """(C,) → broadcastable against (B, C, ...): (1, C, 1, 1) for images, (1, F) for features."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(frozen=True)
class BatchNorm:
    """Batch normalization per channel: x (B, C, H, W) over (B, H, W), or x (B, F) over B.

    Parameters ``gamma`` (C,) ones and ``beta`` (C,) zeros; state ``mean`` (C,) zeros and ``var``
    (C,) ones. Training normalizes with the batch mean and biased variance, and
    :meth:`next_state` then averages the batch's statistics into the running ones (see the
    module's docstring); evaluation normalizes with the running ones (an affine map per channel).
    """

    momentum: float = _DEFAULT_MOMENTUM
    eps: float = 1e-5
    needs = ("training", "state")
    decayed = ()

    def __post_init__(self) -> None:
        if not 0 <= self.momentum < 1:
            raise ValueError(
                f"batchnorm momentum {self.momentum!r} is not allowed; give 0 <= momentum < 1 "
                "(the weight of the running average, e.g. 0.9)"
            )
        if not self.eps > 0:
            raise ValueError(f"batchnorm eps {self.eps!r} is not allowed; give eps > 0")

    def check(self, in_shape: Shape) -> str | None:
        if len(in_shape) not in (1, 3):
            return (
                f"it takes features (F,) or images (C, H, W), not {tuple(in_shape)}; "
                "put a flatten before it"
            )
        return None

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        channels = in_shape[0]
        return {"gamma": np.ones(channels, dtype=dtype), "beta": np.zeros(channels, dtype=dtype)}

    def init_state(self, in_shape: Shape, dtype: Any) -> dict[str, np.ndarray]:
        channels = in_shape[0]
        return {"mean": np.zeros(channels, dtype=dtype), "var": np.ones(channels, dtype=dtype)}

    def forward(
        self,
        params: LayerParams,
        x: Any,
        xp: ArrayNamespace,
        *,
        training: bool = False,
        state: dict[str, Any] | None = None,
    ) -> tuple[Any, Any]:
        """y (B, C, ...) and the cache ``(x_hat, inv_std, batch)``: ``batch`` is (mean (C,),
        unbiased variance (C,) or None when n = 1) in training, None in evaluation."""
        ndim = x.ndim
        if training:
            mean = _channel_mean(x)
            centered = x - mean
            var = _channel_mean(centered * centered)
            inv_std = 1 / xp.sqrt(var + self.eps)
            x_hat = centered * inv_std
            n = x.size // x.shape[1]
            unbiased = var.reshape(-1) * (n / (n - 1)) if n > 1 else None
            batch = (mean.reshape(-1), unbiased)
        else:
            if state is None:
                raise ValueError(
                    f"{self.describe()} needs its running statistics in evaluation mode: pass "
                    "state (network.init_state, advanced by training steps)"
                )
            inv_std = 1 / xp.sqrt(_per_channel(state["var"], ndim) + self.eps)
            x_hat = (x - _per_channel(state["mean"], ndim)) * inv_std
            batch = None
        y = _per_channel(params["gamma"], ndim) * x_hat + _per_channel(params["beta"], ndim)
        return y, (x_hat, inv_std, batch)

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        x_hat, inv_std, batch = cache
        ndim = dy.ndim
        # Σ dy and Σ dy·x_hat per channel, as means (n of them): they give the parameters'
        # gradients and the input's.
        n = dy.size // dy.shape[1]
        mean_dy = _channel_mean(dy)
        mean_dy_x_hat = _channel_mean(dy * x_hat)
        grads = {
            "gamma": (mean_dy_x_hat.reshape(-1) * n).astype(dy.dtype),
            "beta": (mean_dy.reshape(-1) * n).astype(dy.dtype),
        }
        gamma = _per_channel(params["gamma"], ndim)
        if batch is None:  # evaluation: x_hat = (x − running mean)·inv_std, constants
            return dy * (gamma * inv_std), grads
        # training: mean and variance depend on every x of the channel; the compact form of
        # ∂x_hat/∂x applied to dx_hat = γ·dy (cs231n's batchnorm_backward_alt), with γ taken
        # out of the per-channel means: dx = γ·inv_std·(dy − mean(dy) − x_hat·mean(dy·x_hat))
        scale = gamma * inv_std
        dx = scale * (dy - mean_dy - x_hat * mean_dy_x_hat)
        return dx, grads

    def next_state(self, state: dict[str, Any], cache: Any) -> dict[str, Any]:
        """The running statistics after a training forward pass whose cache is ``cache``."""
        _, _, batch = cache
        if batch is None:  # an evaluation pass leaves them as they are
            return dict(state)
        mean, unbiased = batch
        keep = self.momentum
        new_mean = keep * state["mean"] + (1 - keep) * mean
        new_var = state["var"] if unbiased is None else keep * state["var"] + (1 - keep) * unbiased
        return {"mean": new_mean, "var": new_var}

    def describe(self) -> str:
        if self.momentum == _DEFAULT_MOMENTUM:
            return "batchnorm"
        return f"batchnorm({self.momentum:g})"


@dataclass(frozen=True)
class LayerNorm:
    """Layer normalization: each example over all its non-batch axes, x (B, *in_shape).

    Parameters ``gamma`` (ones) and ``beta`` (zeros) of shape ``in_shape``, one per value, as
    ``torch.nn.LayerNorm(normalized_shape=in_shape)``. No state, the same in both modes.
    """

    eps: float = 1e-5
    decayed = ()

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"layernorm eps {self.eps!r} is not allowed; give eps > 0")

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return {"gamma": np.ones(in_shape, dtype=dtype), "beta": np.zeros(in_shape, dtype=dtype)}

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        """y (B, *in_shape) and the cache ``(x_hat, inv_std)``, inv_std (B, 1, ...)."""
        axes = tuple(range(1, x.ndim))
        mean = _mean(x, axes)
        centered = x - mean
        var = _mean(centered * centered, axes)
        inv_std = 1 / xp.sqrt(var + self.eps)
        x_hat = centered * inv_std
        return params["gamma"] * x_hat + params["beta"], (x_hat, inv_std)

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        x_hat, inv_std = cache
        axes = tuple(range(1, dy.ndim))
        grads = {"gamma": (dy * x_hat).sum(axis=0), "beta": dy.sum(axis=0)}
        dx_hat = dy * params["gamma"]
        # batch norm's compact form, the averages taken over each example's values instead
        dx = inv_std * (dx_hat - _mean(dx_hat, axes) - x_hat * _mean(dx_hat * x_hat, axes))
        return dx, grads

    def describe(self) -> str:
        return "layernorm"
