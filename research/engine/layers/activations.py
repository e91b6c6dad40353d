"""Elementwise nonlinearities as layers, forward beside backward.

Each backward pass is expressed through what the forward pass kept (the output for sigmoid and
tanh, a boolean mask for relu). ReLU's kink: the derivative at exactly 0 is taken as 0 (as JAX
does: its relu's gradient at 0 is 0); the verifier draws inputs away from 0.
gelu is the tanh approximation (``jax.nn.gelu``'s default); swish is x·σ(x) (``jax.nn.swish``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from research.engine.layers.base import ArrayNamespace, LayerParams, Shape

ACTIVATION_LAYERS = ("sigmoid", "tanh", "relu", "gelu", "swish")
_GELU_C = 0.7978845608028654  # sqrt(2/π)
_GELU_A = 0.044715


def _sigmoid(z: Any, xp: ArrayNamespace) -> Any:
    """Logistic function without overflow: exp is only taken of −|z|."""
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


@dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity: ``sigmoid``, ``tanh``, ``relu``, ``gelu`` or ``swish``."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ACTIVATION_LAYERS:
            raise ValueError(
                f"activation {self.name!r} is not allowed; choose one of "
                f"{', '.join(ACTIVATION_LAYERS)}"
            )

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return {}

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]:
        name = self.name
        if name == "sigmoid":
            y = _sigmoid(x, xp)
            return y, y
        if name == "tanh":
            y = xp.tanh(x)
            return y, y
        if name == "relu":
            positive = x > 0
            return x * positive, positive
        if name == "swish":
            s = _sigmoid(x, xp)
            return x * s, (x, s)
        inner = _GELU_C * (x + _GELU_A * x * x * x)
        t = xp.tanh(inner)
        return 0.5 * x * (1 + t), (x, t)

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        name = self.name
        if name == "sigmoid":
            return dy * (cache * (1 - cache)), {}
        if name == "tanh":
            return dy * (1 - cache * cache), {}
        if name == "relu":
            return dy * cache, {}
        x, s = cache
        if name == "swish":
            return dy * (s + x * s * (1 - s)), {}
        t = s  # gelu: d/dx ½x(1 + tanh u) = ½(1 + t) + ½x(1 − t²)·u', u' = c(1 + 3a x²)
        du = _GELU_C * (1 + 3 * _GELU_A * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du), {}

    def describe(self) -> str:
        return self.name
