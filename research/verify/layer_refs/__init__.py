"""Independent JAX references of the built-in layers, one function per layer class.

Each reference is ``reference(layer, params, x, *, training, state, mask) -> y``: the layer's
forward pass written again in ``jax.numpy`` / ``jax.lax`` from its definition, sharing no code with
the numpy layer (``lax.conv_general_dilated``, ``lax.reduce_window``, ``jax.nn``), so that the
verifier checks the numpy forward pass as well as its handwritten backward. A layer without a
registered reference (a researcher's own) is checked against its own forward run under
``jax.numpy``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Reference = Callable[..., Any]

REFERENCES: dict[type, Reference] = {}

#: The modules holding the built-in layers' references (imported on first lookup).
_MODULES = ("dense", "conv", "pooling", "norm", "residual")
_loaded = False


def register(layer_class: type) -> Callable[[Reference], Reference]:
    """Registers the decorated function as the JAX reference of ``layer_class``."""

    def decorate(function: Reference) -> Reference:
        REFERENCES[layer_class] = function
        return function

    return decorate


def reference_for(layer: Any) -> Reference | None:
    """The registered reference of ``layer``'s class, or None (a layer of the user's own)."""
    global _loaded
    if not _loaded:
        for name in _MODULES:
            try:
                importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{__name__}.{name}":
                    raise
        _loaded = True
    return REFERENCES.get(type(layer))
