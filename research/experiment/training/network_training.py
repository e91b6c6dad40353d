"""The training loop's side of a network of layers (``layers`` set; ``config.network()``).

The loop itself (:mod:`.train`) is the same for the MLP and for a network of layers: seeded
shuffles, the same generators (init, shuffles, dropout masks), the same divergence checks and
per-epoch metrics. What differs is here: the step
(:class:`~research.engine.stack_step.NetworkTrainingStep`), the dropout masks (one per layer,
``network.draw_masks``), evaluation (evaluation mode: batch norm's running statistics, no
dropout, in chunks that bound a convolution's memory) and the fields a network refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from research.data import to_inputs
from research.engine.layers.base import needs
from research.engine.mlp import data_loss
from research.engine.network import NetParams, NetState, Network, draw_masks, l2_penalty
from research.engine.stack_step import evaluation_chunk, evaluation_logits, params_dtype
from research.experiment.config.fields import ConfigError, TrainConfig


def check_network_fields(config: TrainConfig) -> None:
    """Refuses the fields a network of layers cannot honour: ``max_norm`` caps the MLP's hidden
    units' incoming weights (the columns of a dense W), which a convolution's filters do not have.

    Raises:
        ConfigError: naming both fields and how to fix it.
    """
    if config.layers and config.max_norm:  # TrainConfig refuses it too; a guard for any other
        raise ConfigError(
            "max_norm",
            f"applies to the MLP's hidden units only, not to a network of layers "
            f"(layers = {config.layers!r})",
            value=config.max_norm,
            allowed="max_norm = 0 with layers, or layers = '' (the MLP of hidden_sizes)",
        )


def network_mask_drawer(
    network: Network, rng: np.random.Generator, dtype: Any
) -> Callable[[int], list[Any]] | None:
    """Draws a batch's dropout masks from ``rng``, one per layer (``network.draw_masks``: None
    for a layer without dropout); None if no layer takes a mask."""
    if not any("mask" in needs(layer) for layer in network.layers):
        return None

    def draw(rows: int) -> list[Any]:
        return draw_masks(network, rng, rows, dtype)

    return draw


def network_metrics(
    network: Network,
    params: NetParams,
    state: NetState | None,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    raw: bool | None,
    chunk: int | None = None,
) -> tuple[float, float]:
    """Loss (with the l2 term) and accuracy in evaluation mode (running statistics ``state``,
    no dropout) of inputs x (N, 784) (or (N, *in_shape)), labels (N,).

    x: float inputs, or uint8 images converted chunk by chunk (``research.data.to_inputs``, by
    ``raw``); chunks of ``chunk`` rows (default :func:`~research.engine.stack_step.
    evaluation_chunk`: a convolution's unrolled windows of 10,000 rows would take gigabytes).
    """
    dtype = params_dtype(params)
    chunk = chunk or evaluation_chunk(network, dtype)
    eye = np.eye(network.n_outputs, dtype=dtype)
    total_loss = 0.0
    correct = 0
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        if part.dtype == np.uint8:
            part = to_inputs(part.reshape(len(part), -1), bool(raw), dtype)
        lb = labels[start : start + chunk]
        logits = evaluation_logits(network, params, state, part)
        total_loss += float(data_loss(logits, eye[lb], network)) * len(part)  # type: ignore[arg-type]
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == lb))
    return total_loss / len(x) + l2_penalty(network, params), correct / len(x)
