"""The residual block: y = x + f(x), f a short stack of layers that keeps the shape.

The block is one layer of the network, so its inner layers' parameters (and state) live in one
flat dict, each key prefixed with the inner layer's index: ``{"0.W": ..., "0.b": ..., "2.gamma":
...}`` for ``res(dense(8) relu batchnorm)``; a residual inside a residual nests the prefixes
(``"1.0.W"``). Its mask, when an inner layer needs one, is a tuple with one entry per inner
layer (None for the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from research.engine.layers.base import (
    ArrayNamespace,
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

_EXTRAS = ("training", "state", "mask")


def _prefixed(index: int, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{index}.{key}": value for key, value in values.items()}


def _unprefixed(index: int, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of inner layer ``index`` (keys ``"<index>.<key>"``), without the prefix."""
    prefix = f"{index}."
    return {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class Residual:
    """x (B, *in_shape) → x + f(x), f the ``layers`` applied in order; f must keep the shape.

    ``needs`` is the union of the inner layers' needs; ``init``, ``init_state`` and
    ``draw_mask`` run the inner layers' in order (one generator), ``next_state`` delegates.
    """

    layers: tuple[Layer, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("res() holds no layer; give it one, e.g. res(dense(100) relu)")

    @property
    def needs(self) -> tuple[str, ...]:
        inner = {name for layer in self.layers for name in needs(layer)}
        return tuple(name for name in _EXTRAS if name in inner)

    def decayed(self, params: LayerParams) -> tuple[str, ...]:
        """The inner layers' decayed keys, prefixed (base.decayed calls this with ``params``)."""
        return tuple(
            f"{i}.{key}"
            for i, layer in enumerate(self.layers)
            for key in decayed(layer, _unprefixed(i, params))
        )

    def _shapes(self, in_shape: Shape) -> list[Shape]:
        """What each inner layer reads, then f's output shape (len(layers) + 1 shapes)."""
        shapes = [tuple(in_shape)]
        for layer in self.layers:
            shapes.append(out_shape(layer, shapes[-1]))
        return shapes

    def check(self, in_shape: Shape) -> str | None:
        shape = tuple(in_shape)
        for layer in self.layers:
            problem = shape_problem(layer, shape)
            if problem:
                return f"{describe(layer)}: {problem}"
            shape = out_shape(layer, shape)
        if shape != tuple(in_shape):
            return (
                f"its layers map {tuple(in_shape)} to {shape}; a residual block must keep the "
                f"shape ({_keep_shape_hint(tuple(in_shape), shape)})"
            )
        return None

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        params: LayerParams = {}
        for i, (layer, shape) in enumerate(zip(self.layers, self._shapes(in_shape))):
            params.update(_prefixed(i, layer.init(rng, shape, dtype)))
        return params

    def init_state(self, in_shape: Shape, dtype: Any) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for i, (layer, shape) in enumerate(zip(self.layers, self._shapes(in_shape))):
            if "state" in needs(layer):
                state.update(_prefixed(i, layer.init_state(shape, dtype)))  # type: ignore[attr-defined]
        return state

    def draw_mask(self, rng: np.random.Generator, shape: Shape, dtype: Any) -> tuple[Any, ...]:
        """One mask per inner layer (None for those without), drawn in order; ``shape`` is
        (B, *in_shape)."""
        rows = shape[0]
        return tuple(
            layer.draw_mask(rng, (rows, *inner), dtype) if "mask" in needs(layer) else None  # type: ignore[attr-defined]
            for layer, inner in zip(self.layers, self._shapes(tuple(shape[1:])))
        )

    def forward(
        self,
        params: LayerParams,
        x: Any,
        xp: ArrayNamespace,
        *,
        training: bool = False,
        state: dict[str, Any] | None = None,
        mask: tuple[Any, ...] | None = None,
    ) -> tuple[Any, Any]:
        """x + f(x) (B, *in_shape), and the inner layers' caches (a tuple)."""
        h, caches = x, []
        for i, layer in enumerate(self.layers):
            extras = forward_extras(
                layer,
                training,
                None if state is None else _unprefixed(i, state),
                None if mask is None else mask[i],
            )
            h, cache = layer.forward(_unprefixed(i, params), h, xp, **extras)
            caches.append(cache)
        return x + h, tuple(caches)

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        """dx = dy (the skip) + dy back through f; grads keyed like ``params``."""
        grads: LayerParams = {}
        dh = dy
        for i in range(len(self.layers) - 1, -1, -1):
            dh, inner = self.layers[i].backward(_unprefixed(i, params), cache[i], dh)
            grads.update(_prefixed(i, inner))
        return dy + dh, grads

    def next_state(self, state: dict[str, Any], cache: Any) -> dict[str, Any]:
        """The inner stateful layers' ``next_state``, each on its own entries and cache."""
        new_state: dict[str, Any] = {}
        for i, layer in enumerate(self.layers):
            if "state" in needs(layer):
                inner = layer.next_state(_unprefixed(i, state), cache[i])  # type: ignore[attr-defined]
                new_state.update(_prefixed(i, inner))
        return new_state

    def describe(self) -> str:
        return "res(" + " ".join(describe(layer) for layer in self.layers) + ")"


def _keep_shape_hint(in_shape: Shape, shape: Shape) -> str:
    """How to make f keep ``in_shape`` given that it gives ``shape``."""
    if len(in_shape) == 3 and len(shape) == 3:
        if in_shape[1:] != shape[1:]:
            return "pad the convolutions"
        return f"its last conv needs {in_shape[0]} filters"
    if len(in_shape) == 1 and len(shape) == 1:
        return f"end it with dense({in_shape[0]})"
    return f"its output must be {in_shape}"
