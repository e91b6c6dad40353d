"""The layer contract: what a layer of the engine is, built-in or a researcher's own.

A layer is any object with three methods, in the style of cs231n's ``layers.py``::

    class Swish:
        def init(self, rng, in_shape, dtype):      # -> params: dict of arrays ({} for none)
            return {}
        def forward(self, params, x, xp):          # -> (y, cache); xp is numpy or jax.numpy
            s = 1 / (1 + xp.exp(-x))
            return x * s, (x, s)
        def backward(self, params, cache, dy):     # numpy only -> (dx, grads)
            x, s = cache
            return dy * (s + x * s * (1 - s)), {}

- ``init(rng, in_shape, dtype)``: the parameters, drawn from the seeded ``numpy.random.Generator``
  ``rng``; ``in_shape`` is one example's shape (no batch axis), e.g. ``(1, 28, 28)`` or ``(784,)``.
- ``forward(params, x, xp)``: ``x`` is (B, *in_shape); returns the output (B, *out_shape) and a
  cache, anything the backward pass needs. Written against the array namespace ``xp`` (``xp.exp``,
  ``xp.maximum``, ``x.reshape``, ...), the same code runs under numpy, for training, and under
  ``jax.numpy``, where autodiff checks the backward pass (a user layer's JAX reference is its own
  forward; a built-in's is written independently in :mod:`research.verify.layer_refs`).
- ``backward(params, cache, dy)``: numpy; ``dy`` is ∂loss/∂y (B, *out_shape). Returns ∂loss/∂x
  (B, *in_shape) and the parameters' gradients, a dict with the keys and shapes of ``params``.

Extensions, each optional (:func:`out_shape`, :func:`accepts` and the network read them):

- ``out_shape(in_shape) -> tuple``: the output's shape per example. Without it the network runs
  the forward pass once on a single zero example to find it.
- ``check(in_shape) -> str | None``: why this input shape cannot be taken (a kernel larger than its
  input, ...), or None; what a bad ``layers`` value is refused with.
- ``needs``: a tuple naming the extra keyword arguments its forward takes, any of
  ``"training"`` (a bool: training or evaluation mode), ``"state"`` (a dict of non-trained arrays,
  such as batch norm's running statistics, made by ``init_state(in_shape, dtype)`` and advanced by
  ``next_state(state, cache)`` after every training forward pass) and ``"mask"`` (an array from
  ``draw_mask(rng, shape, dtype)``, drawn from the run's dropout generator before the forward pass,
  or None in evaluation mode). Randomness and mode are inputs, never hidden state: the same inputs
  give the same outputs.
- ``decayed``: the parameter keys the l2 penalty applies to (default: ``("W",)`` if there is one),
  or a method ``decayed(params)`` giving them (a residual block's, prefixed inner keys).
- ``describe()``: the layer as written in a ``layers`` value, e.g. ``conv(20,5)``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

LayerParams = dict[str, np.ndarray]
Shape = tuple[int, ...]
#: What an array namespace is: numpy or jax.numpy (anything with numpy's functions).
ArrayNamespace = Any


@runtime_checkable
class Layer(Protocol):
    """The three methods every layer has (see the module's docstring for the extensions)."""

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams: ...

    def forward(self, params: LayerParams, x: Any, xp: ArrayNamespace) -> tuple[Any, Any]: ...

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]: ...


def needs(layer: Layer) -> tuple[str, ...]:
    """The extra keyword arguments ``layer.forward`` takes: a subset of training, state, mask."""
    declared = tuple(getattr(layer, "needs", ()))
    unknown = [name for name in declared if name not in ("training", "state", "mask")]
    if unknown:
        raise ValueError(
            f"layer {describe(layer)} declares needs {unknown!r}; allowed: training, state, mask"
        )
    return declared


def forward_extras(
    layer: Layer, training: bool, state: dict[str, Any] | None, mask: Any
) -> dict[str, Any]:
    """The keyword arguments of ``layer.forward`` beyond (params, x, xp), by its ``needs``."""
    given = {"training": training, "state": state, "mask": mask}
    return {name: given[name] for name in needs(layer)}


def describe(layer: Layer) -> str:
    """How the layer is written in a ``layers`` value (its ``describe()``), else its class name."""
    method = getattr(layer, "describe", None)
    return method() if callable(method) else type(layer).__name__


def decayed(layer: Layer, params: LayerParams) -> tuple[str, ...]:
    """The keys of ``params`` the l2 penalty applies to (the layer's ``decayed``, default W)."""
    declared = getattr(layer, "decayed", None)
    if callable(declared):  # keys that depend on the parameters (a residual block's)
        return tuple(declared(params))
    if declared is not None:
        return tuple(declared)
    return ("W",) if "W" in params else ()


def out_shape(layer: Layer, in_shape: Shape, params: LayerParams | None = None) -> Shape:
    """The shape of one example of the layer's output for inputs of ``in_shape``.

    From the layer's ``out_shape`` when it has one; otherwise one forward pass (evaluation mode)
    on a single zero example, with ``params`` (made by ``init`` from a fixed seed if not given).
    """
    method = getattr(layer, "out_shape", None)
    if callable(method):
        return tuple(int(n) for n in method(tuple(in_shape)))
    if params is None:
        params = layer.init(np.random.default_rng(0), tuple(in_shape), np.float64)
    x = np.zeros((1, *in_shape))
    state = None
    if "state" in needs(layer):
        state = layer.init_state(tuple(in_shape), np.float64)  # type: ignore[attr-defined]
    y, _ = layer.forward(params, x, np, **forward_extras(layer, False, state, None))
    return tuple(int(n) for n in np.shape(y)[1:])


def shape_problem(layer: Layer, in_shape: Shape) -> str | None:
    """Why ``layer`` cannot take inputs of ``in_shape`` (its ``check``), or None."""
    method = getattr(layer, "check", None)
    return method(tuple(in_shape)) if callable(method) else None
