"""Layers of a researcher's own, as docs/layers.md's worked example writes them.

Each is a class with init, forward (written against ``xp``: numpy to train, jax.numpy to be
checked) and a handwritten numpy backward. Check one with

    python -m research verify-layer experiments/layers/my_layers.py:RMSNorm

and use it in a network by its path and name (relative to the working directory):

    python -m research train --layers "dense(128) experiments/layers/my_layers.py:RMSNorm"
"""

import numpy as np


class Swish:
    """swish(x) = x·σ(x), elementwise, no parameters. ``activation = True``: in a ``layers``
    value it counts as an activation, so the run's own activation is not inserted."""

    activation = True

    def init(self, rng, in_shape, dtype):
        return {}

    def forward(self, params, x, xp):
        s = 1 / (1 + xp.exp(-x))
        return x * s, (x, s)

    def backward(self, params, cache, dy):
        x, s = cache
        return dy * (s + x * s * (1 - s)), {}


class RMSNormFirstTry:
    """RMS norm over each example's features: y = g·x / rms(x), rms(x) = sqrt(mean(x²) + eps).

    The first try: its backward treats rms(x) as a constant. The verifier catches it."""

    eps = 1e-5

    def init(self, rng, in_shape, dtype):
        return {"g": np.ones(in_shape, dtype)}

    def forward(self, params, x, xp):
        axes = tuple(range(1, x.ndim))  # every axis but the batch
        inv_rms = 1 / xp.sqrt(xp.mean(x * x, axis=axes, keepdims=True) + self.eps)
        x_hat = x * inv_rms
        return params["g"] * x_hat, (x_hat, inv_rms)

    def backward(self, params, cache, dy):
        x_hat, inv_rms = cache
        dx = dy * params["g"] * inv_rms  # wrong: rms(x) depends on x too
        return dx, {"g": np.sum(dy * x_hat, axis=0)}


class RMSNorm(RMSNormFirstTry):
    """RMS norm, fixed: the gradient through rms(x) subtracts x̂·mean(dx̂·x̂) per example."""

    def backward(self, params, cache, dy):
        x_hat, inv_rms = cache
        axes = tuple(range(1, dy.ndim))
        dx_hat = dy * params["g"]
        dx = inv_rms * (dx_hat - x_hat * np.mean(dx_hat * x_hat, axis=axes, keepdims=True))
        return dx, {"g": np.sum(dy * x_hat, axis=0)}
