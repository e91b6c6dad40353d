"""JAX reference of the residual block: y = x + f(x), f the inner layers' references in turn.

The block's parameters (and state) are one flat dict whose keys carry the inner layer's index,
``"<index>.<key>"`` (nested blocks nest the prefixes, ``"1.0.W"``); its mask is a tuple with
one entry per inner layer. An inner layer without a registered reference (a researcher's own)
runs its own forward under ``jax.numpy``, as the verifier does for a layer on its own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research.engine.layers.base import forward_extras
from research.engine.layers.residual import Residual
from research.verify.layer_refs import reference_for, register


def _entries(index: int, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """The entries of inner layer ``index``, the ``"<index>."`` prefix removed."""
    if values is None:
        return None
    prefix = f"{index}."
    return {key.removeprefix(prefix): v for key, v in values.items() if key.startswith(prefix)}


@register(Residual)
def residual(
    layer: Residual,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: dict[str, Any] | None = None,
    mask: tuple[Any, ...] | None = None,
) -> jax.Array:
    """(B, *in_shape): x plus the inner layers applied in order."""
    h = x
    for index, inner in enumerate(layer.layers):
        inner_params = _entries(index, params) or {}
        inner_state = _entries(index, state)
        inner_mask = None if mask is None else mask[index]
        reference = reference_for(inner)
        if reference is None:  # a layer of the researcher's own: its forward under jax.numpy
            extras = forward_extras(inner, training, inner_state, inner_mask)
            h = inner.forward(inner_params, h, jnp, **extras)[0]
        else:
            h = reference(
                inner, inner_params, h, training=training, state=inner_state, mask=inner_mask
            )
    return x + h
