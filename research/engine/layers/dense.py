"""Dense (fully connected) and flatten layers, forward beside backward."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from research.engine.layers.base import ArrayNamespace, LayerParams, Shape

INIT_SCHEMES = ("normal", "xavier", "he")


@dataclass(frozen=True)
class Dense:
    """y = x·W + b over the flattened example: x (B, *in_shape) → y (B, units).

    Parameters ``W`` (n_in, units), n_in = prod(in_shape), and ``b`` (units,). ``init``: the
    origin's standard normal for both (``normal``), Glorot uniform (``xavier``) or He normal
    (``he``) with zero biases; W is drawn before b, so a stack of dense layers draws what
    ``mlp.init_params`` draws.
    """

    units: int
    init_scheme: str = "normal"

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        n_in, n_out = prod(in_shape), self.units
        if self.init_scheme == "normal":
            W = rng.standard_normal((n_in, n_out))
            b = rng.standard_normal(n_out)
        elif self.init_scheme == "xavier":
            limit = np.sqrt(6.0 / (n_in + n_out))
            W = rng.uniform(-limit, limit, size=(n_in, n_out))
            b = np.zeros(n_out)
        elif self.init_scheme == "he":
            W = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
            b = np.zeros(n_out)
        else:
            raise ValueError(
                f"init {self.init_scheme!r} is not allowed; choose one of {INIT_SCHEMES}"
            )
        return {"W": W.astype(dtype), "b": b.astype(dtype)}

    def out_shape(self, in_shape: Shape) -> Shape:
        return (self.units,)

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        flat = x.reshape(x.shape[0], -1)
        return flat @ params["W"] + params["b"], (flat, x.shape)

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        flat, shape = cache
        grads = {"W": flat.T @ dy, "b": dy.sum(axis=0)}
        return (dy @ params["W"].T).reshape(shape), grads

    def describe(self) -> str:
        return f"dense({self.units})"


@dataclass(frozen=True)
class Flatten:
    """(B, *in_shape) → (B, prod(in_shape)). Dense layers flatten by themselves; this is for
    what comes between (a layer norm over all features, say)."""

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return {}

    def out_shape(self, in_shape: Shape) -> Shape:
        return (prod(in_shape),)

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        return x.reshape(x.shape[0], -1), x.shape

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        return dy.reshape(cache), {}

    def describe(self) -> str:
        return "flatten"
