"""Inverted dropout as a layer: the mask is an input, drawn from the run's generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from research.engine.keep_decisions import inverted_dropout_mask
from research.engine.layers.base import ArrayNamespace, LayerParams, Shape


@dataclass(frozen=True)
class Dropout:
    """y = x·mask, mask of 0 and 1/(1 − rate), each unit kept with probability 1 − rate.

    The mask comes in (``needs = ("mask",)``): :meth:`draw_mask` draws it from the run's dropout
    generator exactly as ``mlp.dropout_masks`` does (float32 uniforms compared with the rate), so
    an MLP written as layers draws the same masks in the same order. Evaluation passes no mask
    (None) and the layer is the identity: the kept units were scaled up at training time.
    """

    rate: float
    needs = ("mask",)

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ValueError(f"dropout rate {self.rate!r} is not allowed; give 0 <= rate < 1")

    def init(self, rng: np.random.Generator, in_shape: Shape, dtype: Any) -> LayerParams:
        return {}

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def draw_mask(self, rng: np.random.Generator, shape: Shape, dtype: Any) -> np.ndarray | None:
        """A fresh mask of ``shape`` (B, *in_shape) in ``dtype``; None when the rate is 0."""
        if self.rate == 0:
            return None
        return inverted_dropout_mask(rng, tuple(shape), self.rate, dtype)

    def forward(
        self, params: LayerParams, x: Any, xp: ArrayNamespace, *, mask: Any = None
    ) -> tuple[Any, Any]:
        if mask is None:
            return x, None
        return x * mask, mask

    def backward(
        self, params: LayerParams, cache: Any, dy: np.ndarray
    ) -> tuple[np.ndarray, LayerParams]:
        return (dy if cache is None else dy * cache), {}

    def describe(self) -> str:
        return f"dropout({self.rate:g})"
