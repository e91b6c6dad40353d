"""JAX references of the dense, flatten, activation and dropout layers, from their definitions.

- Dense:      y = flatten(x)·W + b, x (B, *in_shape), W (n_in, units), b (units,)
- Flatten:    (B, *in_shape) → (B, prod(in_shape))
- Activation: ``jax.nn.sigmoid``, ``jnp.tanh``, ``jax.nn.relu`` (gradient 0 at 0),
  ``jax.nn.gelu`` (``approximate=True``: the tanh form), ``jax.nn.swish`` (x·σ(x))
- Dropout:    y = x·mask in training (mask of 0 and 1/(1 − rate)), y = x without a mask
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research.engine.layers.activations import Activation
from research.engine.layers.dense import Dense, Flatten
from research.engine.layers.dropout import Dropout
from research.verify.layer_refs import register

_ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=True),
    "swish": jax.nn.swish,
}


def _rows(x: jax.Array) -> jax.Array:
    """(B, *shape) → (B, prod(shape)), row-major as numpy's reshape."""
    return jnp.reshape(x, (x.shape[0], -1))


@register(Dense)
def dense(
    layer: Dense,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, units): the flattened example times W, plus b."""
    return jnp.matmul(_rows(x), params["W"], precision=jax.lax.Precision.HIGHEST) + params["b"]


@register(Flatten)
def flatten(
    layer: Flatten,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, prod(in_shape))."""
    return _rows(x)


@register(Activation)
def activation(
    layer: Activation,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """The nonlinearity ``layer.name`` elementwise, from ``jax.nn``."""
    return _ACTIVATIONS[layer.name](x)


@register(Dropout)
def dropout(
    layer: Dropout,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """x·mask with a mask (training), else x: the kept units were scaled at training time."""
    return x if mask is None else x * mask
