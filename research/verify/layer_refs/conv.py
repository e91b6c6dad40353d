"""JAX reference of the 2-D convolution, from its definition, by ``lax.conv_general_dilated``.

x (B, C, H, W), weights W (F, C, k, k), biases b (F,), zero padding p on each side, stride s::

    y[b, f, i, j] = b_f + Σ_{c, u, v} W[f, c, u, v] · x_pad[b, c, s·i + u, s·j + v]

y (B, F, (H + 2p − k)//s + 1, (W + 2p − k)//s + 1): a cross-correlation (the kernel is not
flipped), as in cs231n, PyTorch and ``conv_general_dilated`` with NCHW/OIHW dimension numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from research.engine.layers.conv import Conv2D
from research.verify.layer_refs import register


@register(Conv2D)
def conv2d(
    layer: Conv2D,
    params: dict[str, Any],
    x: jax.Array,
    *,
    training: bool = False,
    state: Any = None,
    mask: Any = None,
) -> jax.Array:
    """(B, F, H_out, W_out): every filter slid over the zero-padded input, plus its bias."""
    pad = layer.pad
    y = jax.lax.conv_general_dilated(
        x,
        params["W"],
        window_strides=(layer.stride, layer.stride),
        padding=[(pad, pad), (pad, pad)],
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + jnp.reshape(params["b"], (1, -1, 1, 1))
