"""JAX references of batch norm and layer norm, from their definitions.

Batch norm, x (B, C, H, W) or (B, F), per channel c (the statistics over every axis but 1)::

    training:   μ_c = mean(x[:, c]),  σ²_c = mean((x[:, c] − μ_c)²)   (the biased variance)
    evaluation: μ_c = state["mean"][c],  σ²_c = state["var"][c]
    y[:, c] = gamma_c · (x[:, c] − μ_c) / sqrt(σ²_c + eps) + beta_c

Layer norm, x (B, *in_shape), per example b over all its values, gamma and beta of ``in_shape``::

    y_b = gamma · (x_b − mean(x_b)) / sqrt(var(x_b) + eps) + beta

Autodiff through the batch statistics gives the coupling between examples that batch norm's
handwritten backward must reproduce. The running statistics' update is not a function of the
trained parameters; the CNN trajectory test (``tests/test_cnn_trajectory.py``) checks it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research.engine.layers.norm import BatchNorm, LayerNorm
from research.verify.layer_refs import register


def _channel_shape(ndim: int) -> tuple[int, ...]:
    """(C,) broadcast against (B, C, ...): (1, −1, 1, 1) for images, (1, −1) for features."""
    return (1, -1) + (1,) * (ndim - 2)


@register(BatchNorm)
def batch_norm(
    layer: BatchNorm,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: dict[str, Any] | None = None,
    mask: Any = None,
) -> jax.Array:
    """(B, C, ...): normalized per channel with the batch's statistics (training) or the
    running ones in ``state`` (evaluation), then scaled and shifted."""
    per_channel = _channel_shape(x.ndim)
    if training:
        axes = tuple(axis for axis in range(x.ndim) if axis != 1)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.var(x, axis=axes, keepdims=True)  # ddof=0: the biased variance
    else:
        if state is None:
            raise ValueError("batch norm's reference needs the running statistics in evaluation")
        mean = jnp.reshape(state["mean"], per_channel)
        var = jnp.reshape(state["var"], per_channel)
    normalized = (x - mean) * jax.lax.rsqrt(var + layer.eps)
    return jnp.reshape(params["gamma"], per_channel) * normalized + jnp.reshape(
        params["beta"], per_channel
    )


@register(LayerNorm)
def layer_norm(
    layer: LayerNorm,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, *in_shape): each example normalized over all its values, then scaled and shifted."""
    axes = tuple(range(1, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.var(x, axis=axes, keepdims=True)
    return params["gamma"] * (x - mean) * jax.lax.rsqrt(var + layer.eps) + params["beta"]
