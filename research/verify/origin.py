"""A faithful port of the origin program's per-sample update, kept as the baseline.

The origin (a numpy MLP for MNIST from a blog post; see ``../shared/origin``) loops in Python over
the rows of each mini-batch, runs a backward pass on one row at a time as a (1, n) matrix, sums the
per-row gradients and divides by the batch size. Its output delta is a(1−a)(a−y), so it descends
½‖a − y‖² averaged over the batch, while the loss it prints is the plain sum of squares. Nothing is
vectorized over the batch here on purpose: this is the reference point for the speed-ups and the
thing the vectorized gradient is checked against (``tests/test_origin.py``).

Quirks kept: sigmoid on every layer, computed as 1/(1+exp(−z)) (which overflows, harmlessly, on
raw 0..255 pixels; the warning is silenced here rather than changing the arithmetic). Quirk not
kept: the origin's biases silently become (1, n) arrays after the first update through
broadcasting; here they stay (n,) with the same values.
"""

from __future__ import annotations

import numpy as np

from research.engine.mlp import Params


def _origin_sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def origin_backward(params: Params, x_row: np.ndarray, y_row: np.ndarray) -> tuple[Params, float]:
    """The origin's ``MLP.backward`` for one sample.

    Args:
        params: one ``{"W": (n_in, n_out), "b": (n_out,)}`` per layer.
        x_row: one input as a (1, n_in) row.
        y_row: its one-hot target as a (1, n_out) row.
    Returns:
        The gradient of ½‖a − y‖² for this sample (biases as (n_out,)), and the origin's printed
        loss for it, Σ (a − y)².
    """
    activations = [x_row]
    activation = x_row
    for layer in params:
        activation = _origin_sigmoid(np.dot(activation, layer["W"]) + layer["b"])
        activations.append(activation)
    printed_loss = float(np.sum(np.power(activations[-1] - y_row, 2)))

    grads: Params = [{} for _ in params]
    out = activations[-1]
    delta = out * (1 - out) * (out - y_row)
    grads[-1] = {"W": np.dot(activations[-2].T, delta), "b": delta[0]}
    for layer_index in range(len(params) - 2, -1, -1):
        a = activations[layer_index + 1]
        delta = np.dot(delta, params[layer_index + 1]["W"].T) * a * (1 - a)
        grads[layer_index] = {"W": np.dot(activations[layer_index].T, delta), "b": delta[0]}
    return grads, printed_loss


def origin_batch_gradient(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[Params, float]:
    """The origin's per-sample loop over a batch: mean of per-row gradients.

    Args:
        x: inputs (B, n_in); y: one-hot targets (B, n_out).
    Returns:
        (mean gradient in the params structure, the origin's printed loss Σ_b Σ_k (a−y)² / B).
    """
    batch = x.shape[0]
    totals: Params = [
        {key: np.zeros_like(value) for key, value in layer.items()} for layer in params
    ]
    printed = 0.0
    for i in range(batch):
        grads, row_loss = origin_backward(params, x[i : i + 1], y[i : i + 1])
        totals = [{key: acc[key] + cur[key] for key in acc} for acc, cur in zip(totals, grads)]
        printed += row_loss / batch
    mean = [{key: value / batch for key, value in layer.items()} for layer in totals]
    return mean, printed


def origin_update_mini_batch(
    params: Params, x: np.ndarray, y: np.ndarray, learning_rate: float
) -> tuple[Params, float]:
    """The origin's ``update_mini_batch``: one SGD step from the per-sample loop.

    Returns the new parameters and the origin's printed loss for the batch.
    """
    grads, printed = origin_batch_gradient(params, x, y)
    new = [
        {key: layer[key] - learning_rate * g[key] for key in layer}
        for layer, g in zip(params, grads)
    ]
    return new, printed
