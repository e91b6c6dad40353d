"""JAX references of max- and average-pooling, from their definitions, by ``lax.reduce_window``.

x (B, C, H, W), a k×k window moved by stride s over each channel, no padding (windows that
would cross the border are dropped, "VALID")::

    max: y[b, c, i, j] = max_{u, v < k} x[b, c, s·i + u, s·j + v]
    avg: y[b, c, i, j] = (1/k²) Σ_{u, v < k} x[b, c, s·i + u, s·j + v]

y (B, C, (H − k)//s + 1, (W − k)//s + 1). Max-pooling's gradient goes to the window's maximal
element; where a window holds several equal maxima, autodiff of ``reduce_window`` routes it to
one of them (``tests/test_layers_verify.py`` pins down which), and the verifier's continuous
random inputs make such ties a probability-zero event.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research.engine.layers.pooling import AvgPool2D, MaxPool2D
from research.verify.layer_refs import register


def _window(layer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """reduce_window's window and strides over (B, C, H, W): k×k moved by s, per channel."""
    return (1, 1, layer.kernel, layer.kernel), (1, 1, layer.stride, layer.stride)


@register(MaxPool2D)
def max_pool(
    layer: MaxPool2D,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, C, H_out, W_out): each window's largest value."""
    window, strides = _window(layer)
    lowest = x.dtype.type(-jnp.inf)  # a constant: reduce_window then knows the max monoid
    return jax.lax.reduce_window(x, lowest, jax.lax.max, window, strides, "VALID")


@register(AvgPool2D)
def avg_pool(
    layer: AvgPool2D,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, C, H_out, W_out): each window's mean."""
    window, strides = _window(layer)
    zero = x.dtype.type(0)
    total = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, "VALID")
    return total / (layer.kernel * layer.kernel)
