"""A network as a stack of layers: shapes, forward, handwritten backward, loss and masks.

Pure functions over a parameter list with one dict per layer (``{}`` for a layer without
parameters) and a state list of the same length (batch norm's running statistics; ``{}``
elsewhere). The loss and the output nonlinearity are the MLP's (:mod:`research.engine.mlp`): the
stack ends in logits (B, k), and the same ``output_delta`` starts the backward pass.

The multilayer perceptron is one such stack (:func:`mlp_network`): dense, activation and dropout
layers, drawing what ``mlp.init_params`` and ``mlp.dropout_masks`` draw, and computing what
``mlp.loss_and_grads`` computes (``tests/test_network.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.engine.layers.activations import Activation
from research.engine.layers.base import (
    Layer,
    LayerParams,
    Shape,
    decayed,
    describe,
    forward_extras,
    needs,
    out_shape,
    shape_problem,
)
from research.engine.layers.dense import Dense
from research.engine.layers.dropout import Dropout
from research.engine.mlp import LOSS_NEEDS_OUTPUT, LOSSES, OUTPUTS, MLPSpec, data_loss, output_delta

NetParams = list[LayerParams]
NetState = list[dict[str, np.ndarray]]
#: One entry per layer: that layer's dropout mask, or None.
NetMasks = Sequence[Any]


@dataclass(frozen=True)
class Network:
    """What the network is: its layers, the shape of one input example, output, loss and l2.

    Attributes:
        layers: the stack, first to last; the last layer gives the logits (k,).
        in_shape: one example's shape, e.g. ``(784,)`` or ``(1, 28, 28)``.
        output, loss, l2: as in :class:`~research.engine.mlp.MLPSpec`.
        shapes: computed: ``shapes[i]`` is what layer i reads, ``shapes[-1]`` the logits' shape.
    Raises:
        ValueError: naming the layer (as written) whose input shape it cannot take.
    """

    layers: tuple[Layer, ...]
    in_shape: Shape
    output: str = "softmax"
    loss: str = "cross_entropy"
    l2: float = 0.0
    shapes: tuple[Shape, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "in_shape", tuple(int(n) for n in self.in_shape))
        if not self.layers:
            raise ValueError("a network needs at least one layer")
        if self.output not in OUTPUTS or self.loss not in LOSSES:
            raise ValueError(f"output={self.output!r} / loss={self.loss!r} are not allowed")
        needed = LOSS_NEEDS_OUTPUT.get(self.loss)
        if needed is not None and self.output != needed:
            raise ValueError(f"loss={self.loss!r} needs output={needed!r}, got {self.output!r}")
        shapes = [self.in_shape]
        for layer in self.layers:
            problem = shape_problem(layer, shapes[-1])
            if problem:
                raise ValueError(f"{describe(layer)}: {problem}")
            shapes.append(out_shape(layer, shapes[-1]))
        if len(shapes[-1]) != 1:
            raise ValueError(
                f"the last layer {describe(self.layers[-1])} gives {shapes[-1]}, not logits (k,)"
            )
        object.__setattr__(self, "shapes", tuple(shapes))

    @property
    def n_outputs(self) -> int:
        return self.shapes[-1][0]

    def describe(self) -> str:
        """The layers as written, e.g. ``conv(20,5) relu maxpool(2) dense(10)``."""
        return " ".join(describe(layer) for layer in self.layers)


def init_params(
    network: Network, seed: int | np.random.Generator = 0, dtype: Any = np.float64
) -> NetParams:
    """Each layer's ``init`` in order, from one generator: one dict per layer."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return [
        dict(layer.init(rng, shape, dtype)) for layer, shape in zip(network.layers, network.shapes)
    ]


def init_state(network: Network, dtype: Any = np.float64) -> NetState:
    """The starting non-trained state (running statistics) of every layer; {} for most."""
    return [
        dict(layer.init_state(shape, dtype)) if "state" in needs(layer) else {}  # type: ignore[attr-defined]
        for layer, shape in zip(network.layers, network.shapes)
    ]


def count_params(params: NetParams) -> int:
    """The number of trained values."""
    return sum(int(np.size(v)) for layer in params for v in layer.values())


def draw_masks(network: Network, rng: np.random.Generator, rows: int, dtype: Any) -> list[Any]:
    """A batch's dropout masks, drawn in layer order from the run's generator: one per layer
    (``draw_mask(rng, (rows, *in_shape), dtype)`` of each layer that needs one), else None."""
    return [
        layer.draw_mask(rng, (rows, *shape), dtype) if "mask" in needs(layer) else None  # type: ignore[attr-defined]
        for layer, shape in zip(network.layers, network.shapes)
    ]


def forward(
    network: Network,
    params: NetParams,
    x: Any,
    *,
    xp: Any = np,
    training: bool = False,
    state: NetState | None = None,
    masks: NetMasks | None = None,
) -> tuple[Any, list[Any]]:
    """The logits (B, k) of inputs x (B, *in_shape), and every layer's cache.

    ``training`` selects batch statistics (and the given dropout ``masks``); evaluation uses the
    running statistics in ``state`` and no masks. ``xp`` is numpy or jax.numpy.
    """
    caches = []
    for i, layer in enumerate(network.layers):
        extras = forward_extras(
            layer,
            training,
            None if state is None else state[i],
            None if masks is None or not training else masks[i],
        )
        x, cache = layer.forward(params[i], x, xp, **extras)
        caches.append(cache)
    return x, caches


def next_state(network: Network, state: NetState, caches: list[Any]) -> NetState:
    """The state after a training forward pass (each stateful layer's ``next_state``)."""
    return [
        dict(layer.next_state(s, cache)) if "state" in needs(layer) else s  # type: ignore[attr-defined]
        for layer, s, cache in zip(network.layers, state, caches)
    ]


def backward(
    network: Network, params: NetParams, caches: list[Any], dlogits: np.ndarray
) -> NetParams:
    """Every layer's parameter gradients from ∂loss/∂logits (B, k), last layer first.

    The first layer's input gradient is never needed: a layer with ``backward_params`` (the
    gradients without ∂loss/∂x) is asked for that instead there.
    """
    grads: NetParams = [{} for _ in network.layers]
    dy = dlogits
    for i in range(len(network.layers) - 1, -1, -1):
        layer = network.layers[i]
        if i == 0 and hasattr(layer, "backward_params"):
            grads[0] = dict(layer.backward_params(params[0], caches[0], dy))
            break
        dy, grads[i] = layer.backward(params[i], caches[i], dy)
        grads[i] = dict(grads[i])
    return grads


def l2_penalty(network: Network, params: NetParams) -> float:
    """(l2/2) Σ ‖W‖² over every layer's decayed arrays (dense and conv weights)."""
    if network.l2 == 0:
        return 0.0
    total = sum(
        float(np.sum(p[key] * p[key]))
        for layer, p in zip(network.layers, params)
        for key in decayed(layer, p)
    )
    return 0.5 * network.l2 * total


def loss_and_grads(
    network: Network,
    params: NetParams,
    x: np.ndarray,
    y: np.ndarray,
    *,
    state: NetState | None = None,
    masks: NetMasks | None = None,
    training: bool = True,
) -> tuple[float, NetParams, NetState | None]:
    """The handwritten backward pass through the stack.

    Args:
        x: inputs (B, *in_shape), cast to the parameters' dtype; y: targets (B, k).
        state: running statistics (:func:`init_state`); needed when a layer keeps some.
        masks: one per layer (:func:`draw_masks`), held fixed; None for none.
        training: batch statistics (True) or the running ones (False).
    Returns:
        ``(loss, grads, new_state)``: the scalar loss with the l2 term, gradients shaped like
        ``params``, and the state after this forward pass (``state`` itself when not training).
    """
    dtype = _dtype(params)
    x = np.asarray(x, dtype=dtype).reshape(len(x), *network.in_shape)
    y = np.asarray(y, dtype=dtype)
    logits, caches = forward(network, params, x, training=training, state=state, masks=masks)
    value, delta = output_delta(logits, y, network)  # type: ignore[arg-type]
    grads = backward(network, params, caches, delta)
    if network.l2:
        for layer, p, g in zip(network.layers, params, grads):
            for key in decayed(layer, p):
                g[key] = g[key] + dtype.type(network.l2) * p[key]
    new_state = state
    if training and state is not None:
        new_state = next_state(network, state, caches)
    return float(value) + l2_penalty(network, params), grads, new_state


def loss(
    network: Network,
    params: NetParams,
    x: np.ndarray,
    y: np.ndarray,
    *,
    state: NetState | None = None,
) -> float:
    """The objective in evaluation mode (running statistics, no dropout) with the l2 term."""
    dtype = _dtype(params)
    x = np.asarray(x, dtype=dtype).reshape(len(x), *network.in_shape)
    logits, _ = forward(network, params, x, state=state)
    value = data_loss(logits, np.asarray(y, dtype=dtype), network)  # type: ignore[arg-type]
    return float(value) + l2_penalty(network, params)


def _dtype(params: NetParams) -> np.dtype:
    for p in params:
        for value in p.values():
            return np.asarray(value).dtype
    return np.dtype(np.float64)


# --- the MLP as a stack ------------------------------------------------------------------------


def mlp_network(
    spec: MLPSpec, input_dropout: float = 0.0, dropout: float = 0.0, init: str = "normal"
) -> Network:
    """The multilayer perceptron of ``spec`` as layers: [dropout(input_dropout)] then, per hidden
    layer, dense → activation → [dropout(dropout)], then the output dense layer (logits)."""
    layers: list[Layer] = []
    if input_dropout:
        layers.append(Dropout(input_dropout))
    for width in spec.sizes[1:-1]:
        layers += [Dense(width, init), Activation(spec.activation)]
        if dropout:
            layers.append(Dropout(dropout))
    layers.append(Dense(spec.sizes[-1], init))
    return Network(tuple(layers), (spec.sizes[0],), spec.output, spec.loss, spec.l2)


def from_mlp_params(network: Network, mlp_params: Sequence[LayerParams]) -> NetParams:
    """``mlp`` parameters (one dict per dense layer) placed in the stack's list (one per layer)."""
    dense = iter(mlp_params)
    return [dict(next(dense)) if isinstance(layer, Dense) else {} for layer in network.layers]


def to_mlp_params(network: Network, params: NetParams) -> list[LayerParams]:
    """The dense layers' parameters alone, as ``mlp`` holds them."""
    return [p for layer, p in zip(network.layers, params) if isinstance(layer, Dense)]
