"""A network of layers trained step by step, and evaluated in chunks.

:class:`NetworkTrainingStep` is, for a :class:`~research.engine.network.Network`, what
:class:`~research.engine.inplace.InPlaceTrainingStep` is for the MLP, with the same interface as
the training loop uses it (``params``, ``state``, ``batch_size``, ``step(x, y, rows, masks)``):
it owns a copy of the parameters and the optimizer state and overwrites them. A step gathers the
batch's rows into a reused buffer (uint8 images converted by the same exact byte → value
conversion as the MLP's step, :func:`~research.engine.inplace.byte_conversion`), reshapes them to
(B, *in_shape), runs the stack's handwritten backward pass
(:func:`research.engine.network.loss_and_grads`) and the optimizer's ``update_in_place``. It also
keeps the network's running state (batch norm's running statistics), advanced by every step.

There is no fused update and no layer-specific buffer: the layers allocate their own arrays. The
MLP keeps its fast path; a stack of dense layers trained here follows the MLP's trajectory to
``same_operations`` tolerance in float64 (``tests/test_layers_training.py``).

``max_norm`` (the dropout paper's cap on each hidden unit's incoming weights) is defined for the
MLP's hidden layers only and is refused here: a convolution's filters have no such columns.

:func:`evaluation_logits` is the evaluation-mode forward pass (running statistics, no dropout)
in chunks of :func:`evaluation_chunk` rows, which bounds the memory a convolution's unrolled
windows take; :func:`outputs` adds the output nonlinearity.
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from research.engine.inplace import ByteConversion, byte_conversion
from research.engine.mlp import _output
from research.engine.network import (
    NetMasks,
    NetParams,
    NetState,
    Network,
    forward,
    init_state,
    loss_and_grads,
)
from research.engine.optim import Optimizer

#: Bytes of layer outputs one evaluation chunk may hold (summed over the layers, per row): about
#: 3,000 rows of a small conv net's float64 activations, all 10,000 of an MLP's.
EVALUATION_BYTES = 1 << 26
#: The most rows in one evaluation chunk (the MLP's ``evaluate`` takes 10,000 at a time).
MAX_CHUNK = 10_000


class NetworkTrainingStep:
    """A network's parameters, optimizer state and running state, stepped in place.

    Args:
        network: the stack of layers.
        params: starting parameters, one dict per layer (``network.init_params``); copied, the
            caller's arrays are never written. Their dtype (float32 or float64) is the step's.
        optimizer: the update rule; its ``init`` gives the starting state.
        batch_size: the largest batch :meth:`step` will be given.
        max_norm: must be 0 (see the module's docstring).
        pixel_values: the input value of each byte 0..255, (256,) in the step's dtype, for uint8
            inputs (``research.data.pixel_values``); None refuses uint8 inputs.
        net_state: the starting running state (one dict per layer); default
            ``network.init_state``. Copied.

    Attributes:
        params: the current parameters (updated in place by every step; copy them to keep them).
        state: the current optimizer state.
        net_state: the current running state (replaced by every step).
    """

    def __init__(
        self,
        network: Network,
        params: NetParams,
        optimizer: Optimizer,
        batch_size: int,
        max_norm: float = 0.0,
        pixel_values: np.ndarray | None = None,
        net_state: NetState | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; give an integer >= 1")
        if max_norm:
            raise ValueError(
                f"max_norm={max_norm!r} applies to the MLP's hidden units only; a network of "
                "layers takes max_norm=0"
            )
        if len(params) != len(network.layers):
            raise ValueError(
                f"{len(params)} parameter dicts for a network of {len(network.layers)} layers"
            )
        self.network = network
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.params: NetParams = [{k: np.array(v) for k, v in p.items()} for p in params]
        self.dtype = params_dtype(self.params)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"parameters must be float32 or float64, got {self.dtype}")
        self.state = optimizer.init(self.params)
        start = init_state(network, self.dtype) if net_state is None else net_state
        self.net_state: NetState = [{k: np.array(v) for k, v in s.items()} for s in start]
        n_in = prod(network.in_shape)
        self._x = np.empty((batch_size, n_in), self.dtype)
        self._y = np.empty((batch_size, network.n_outputs), self.dtype)
        # uint8 inputs: the gathered bytes and how they become _x (as the MLP's step does)
        self._convert: ByteConversion | None = None
        self._bytes = np.empty((0, n_in), np.uint8)
        if pixel_values is not None:
            if np.asarray(pixel_values).dtype != self.dtype:
                raise ValueError(
                    f"pixel_values must be in the step's dtype {self.dtype}, got "
                    f"{np.asarray(pixel_values).dtype}"
                )
            self._convert = byte_conversion(pixel_values)
            self._bytes = np.empty((batch_size, n_in), np.uint8)

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        rows: np.ndarray | None = None,
        masks: NetMasks | None = None,
    ) -> float:
        """One optimizer step on a batch; returns the batch loss (before the step, with l2).

        Args:
            x: inputs (N, *in_shape) or (N, prod(in_shape)) in the step's dtype, or uint8
                images of either shape when the step was given ``pixel_values``; y: targets
                (N, k) in the step's dtype.
            rows: which rows of x and y form the batch (B ≤ batch_size indices); None for all.
            masks: one per layer (``network.draw_masks`` for B rows), or None for none.
        Raises:
            ValueError: the batch is empty or larger than ``batch_size``, or x is neither in the
                step's dtype nor uint8 (with ``pixel_values``).
        """
        xb, yb = self._gather(x, y, rows)
        inputs = xb.reshape(len(xb), *self.network.in_shape)
        value, grads, new_state = loss_and_grads(
            self.network,
            self.params,
            inputs,
            yb,
            state=self.net_state,
            masks=masks,
            training=True,
        )
        self.optimizer.update_in_place(self.params, grads, self.state)
        if new_state is not None:
            self.net_state = new_state
        return value

    def _gather(
        self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The batch's flat inputs xb (B, prod(in_shape)) and targets yb (B, k), views of the
        step's buffers, gathered from x and y at ``rows`` (all of them if None)."""
        n = len(x) if rows is None else len(rows)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a batch of {n} rows does not fit batch_size={self.batch_size}")
        flat = x.reshape(len(x), -1)  # (a view for the contiguous arrays the loop passes)
        if flat.shape[1] != self._x.shape[1]:
            raise ValueError(
                f"inputs of shape {x.shape} for a network taking {self.network.in_shape}"
            )
        xb, yb = self._x[:n], self._y[:n]
        if x.dtype == np.uint8 and self._convert is not None:
            images = flat
            if rows is not None:
                images = np.take(flat, rows, axis=0, out=self._bytes[:n], mode="clip")
            self._convert(images, xb)
        elif x.dtype != self.dtype:
            accepted = f"{self.dtype}" + (" or uint8" if self._convert is not None else "")
            raise ValueError(f"inputs must be {accepted}, got {x.dtype}")
        elif rows is None:
            np.copyto(xb, flat)
        else:
            np.take(flat, rows, axis=0, out=xb, mode="clip")
        if rows is None:
            np.copyto(yb, y)
        else:
            np.take(y, rows, axis=0, out=yb, mode="clip")
        return xb, yb


def params_dtype(params: NetParams) -> np.dtype:
    """The dtype of the first array of ``params`` (float64 for a network without any)."""
    for p in params:
        for value in p.values():
            return np.asarray(value).dtype
    return np.dtype(np.float64)


def evaluation_chunk(network: Network, dtype: Any) -> int:
    """Rows per evaluation chunk: as many as keep every layer's outputs within
    :data:`EVALUATION_BYTES`, from 1 to :data:`MAX_CHUNK`."""
    per_row = sum(prod(shape) for shape in network.shapes) * np.dtype(dtype).itemsize
    return max(1, min(MAX_CHUNK, EVALUATION_BYTES // per_row))


def evaluation_logits(
    network: Network, params: NetParams, state: NetState | None, x: np.ndarray
) -> np.ndarray:
    """The logits (B, k) of inputs x (B, *in_shape) or (B, prod(in_shape)) in evaluation mode
    (running statistics ``state``, no dropout), computed in chunks in the parameters' dtype."""
    dtype = params_dtype(params)
    chunk = evaluation_chunk(network, dtype)
    parts = []
    for start in range(0, len(x), chunk):
        xb = np.asarray(x[start : start + chunk], dtype=dtype)
        logits, _ = forward(network, params, xb.reshape(len(xb), *network.in_shape), state=state)
        parts.append(logits)
    if not parts:
        return np.zeros((0, network.n_outputs), dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def outputs(
    network: Network, params: NetParams, state: NetState | None, x: np.ndarray
) -> np.ndarray:
    """The output layer's activations (B, k) in evaluation mode: class probabilities for a
    softmax output, as ``mlp.forward`` gives the MLP's."""
    return _output(evaluation_logits(network, params, state, x), network.output)


def predict(
    network: Network, params: NetParams, state: NetState | None, x: np.ndarray
) -> np.ndarray:
    """The predicted class per row, (B,) int64: the argmax of the logits, as ``mlp.predict``."""
    return np.argmax(evaluation_logits(network, params, state, x), axis=1)
