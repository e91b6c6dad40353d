"""The ``layers`` field: a network written as layers (:mod:`research.engine.layers.parse`), as the
field table checks it, counts its parameters and says what is allowed.

A ``layers`` value is checked on its own, whatever the other fields are: whether it reads and its
shapes chain depends on its text alone (the run's activation, init, dropout rate and output change
which layers it holds or how they start, never whether they fit together). So every surface that
checks a field (a flag, a study file's ``[fixed]`` value or categorical choice, a logged param read
back) refuses a bad value with its own key, before any network is trained.

When ``layers`` is not empty it defines the network: the MLP's fields (:data:`MLP_FIELDS`) do not,
and stay at their defaults, unused (the field table's rule, :class:`~.fields.TrainConfig`).
"""

from __future__ import annotations

import functools
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from research.data import N_CLASSES
from research.engine.layers.parse import ALLOWED as TOKENS
from research.engine.layers.parse import LayersError, build_network
from research.engine.layers.user_file import USER_LAYER
from research.engine.network import Network

#: One image as the layers see it: (channels, height, width).
IMAGE_SHAPE = (1, 28, 28)
#: The fields of the MLP, which a non-empty ``layers`` replaces.
MLP_FIELDS = ("hidden_size", "n_hidden_layers", "hidden_sizes")
#: The longest ``layers`` value: an MLflow param, and a study's choices together, must fit.
MAX_LENGTH = 1000
#: A small CNN, as the flag's help and the messages show it.
EXAMPLE = "conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100)"
HELP = (
    f'the network\'s hidden layers as text, e.g. --layers "{EXAMPLE}"; the output layer (dense '
    "to the classes, then --output) is added, and --activation follows every conv and dense "
    f"unless the text names activations. Tokens: {TOKENS}. Images are (1, 28, 28) when a conv "
    "or pooling layer is present, else rows of 784 pixels (docs/layers.md); the MLP's flags "
    '(--hidden-size, --n-hidden-layers, --hidden-sizes) go unused and are refused beside it. "" '
    "(the default): the MLP of hidden_sizes, or hidden_size x n_hidden_layers"
)
ALLOWED = (
    f'hidden layers such as "{EXAMPLE}" (docs/layers.md; train --help lists the tokens), or "" '
    "(the MLP of hidden_size, n_hidden_layers, hidden_sizes)"
)


def layers_network(text: str, **fields: Any) -> Network:
    """The :class:`~research.engine.network.Network` of the ``layers`` value ``text``: its hidden
    layers, then a dense layer to the classes; ``fields`` are the run's output, loss, l2,
    activation, init, dropout and input_dropout (:func:`~.parse.build_network`'s keywords).

    Raises:
        LayersError: one line naming the token at fault and what is allowed.
    """
    try:
        return build_network(text, n_classes=N_CLASSES, image_shape=IMAGE_SHAPE, **fields)
    except LayersError:
        raise
    except ValueError as error:  # a layer's own constructor refusing an argument
        raise LayersError(str(error)) from None
    except Exception as error:  # a user layer's own code, run to find its output's shape
        if not USER_LAYER.search(text):
            raise
        first = f"{type(error).__name__}: {error}".splitlines()[0]
        raise LayersError(
            f"a layer of your own raised {first}; check it with python -m research "
            "verify-layer FILE.py:NAME"
        ) from None


def layers_problem(text: str) -> tuple[str, str] | None:
    """Why ``text`` is no ``layers`` value, and what is allowed instead; None if it is one (the
    empty text, the MLP, is). Remembered per text, unless it names a user layer, whose file may
    change in the meantime."""
    if USER_LAYER.search(text):
        return _layers_problem(text)
    return _cached_layers_problem(text)


@functools.lru_cache(maxsize=512)
def _cached_layers_problem(text: str) -> tuple[str, str] | None:
    return _layers_problem(text)


def _layers_problem(text: str) -> tuple[str, str] | None:
    if text == "":
        return None
    if len(text) > MAX_LENGTH:
        return f"{len(text)} characters, more than {MAX_LENGTH}", ALLOWED
    try:
        layers_network(text, output="softmax", loss="cross_entropy")
    except LayersError as error:
        problem, _, allowed = str(error).partition("; allowed: ")
        return problem, allowed or ALLOWED
    return None


def count_params(network: Network) -> int:
    """The trained values of ``network``, counted from its shapes without drawing them (a dense
    or conv layer too large for memory is counted all the same)."""
    return sum(layer_params(layer, shape) for layer, shape in zip(network.layers, network.shapes))


def layer_params(layer: Any, in_shape: tuple[int, ...]) -> int:
    """One layer's trained values for inputs ``in_shape``: from its arguments for the layers
    whose arrays can be large (dense, conv, a residual block of them), else by drawing them."""
    from research.engine.layers.base import out_shape
    from research.engine.layers.dense import Dense

    counted = getattr(layer, "n_params", None)
    if callable(counted):
        return int(counted(tuple(in_shape)))
    if isinstance(layer, Dense):
        return (prod(in_shape) + 1) * layer.units
    if type(layer).__name__ == "Conv2D" and len(in_shape) == 3:  # W (F, C, k, k) and b (F,)
        return layer.filters * (in_shape[0] * layer.kernel**2 + 1)
    inner = getattr(layer, "layers", None)
    if isinstance(inner, tuple):  # a residual block: its layers' values
        total, shape = 0, tuple(in_shape)
        for each in inner:
            total += layer_params(each, shape)
            shape = out_shape(each, shape)
        return total
    params = layer.init(np.random.default_rng(0), tuple(in_shape), np.float32)
    return sum(int(np.size(value)) for value in params.values())


@functools.lru_cache(maxsize=512)
def layers_param_count(text: str) -> int:
    """The trained values of the network a (valid, non-empty) ``layers`` value describes: its
    hidden layers and the output layer (the other fields add none)."""
    return count_params(layers_network(text, output="softmax", loss="cross_entropy"))


# --- the files of user layers (``my_layers.py:Swish``) -----------------------------------------

#: The MLflow param (and artifact folder) of the user layers' files a run used.
LAYER_FILES = "layer_files"


def layer_files(config: Any) -> dict[str, str]:
    """``{path as written: SHA-256}`` of the user layers in ``config``'s network ({} for none)."""
    from research.engine.layers.user_file import user_files

    network = config.network()
    return {} if network is None else user_files(network.layers)


def format_layer_files(files: dict[str, str]) -> str:
    """``my_layers.py=sha256:ab12... other.py=sha256:...``, the ``layer_files`` param."""
    return " ".join(f"{path}=sha256:{digest}" for path, digest in sorted(files.items()))


def read_layer_files(text: str) -> dict[str, str]:
    """The ``layer_files`` param read back: ``{path: SHA-256}``."""
    files = {}
    for entry in text.split():
        path, _, digest = entry.rpartition("=sha256:")
        if path and digest:
            files[path] = digest
    return files


def changed_layer_files(text: str) -> list[str]:
    """What differs between the logged ``layer_files`` and the files as they are now: one
    phrase per file gone or edited (empty when every file is as the run used it)."""
    from research.engine.layers.user_file import file_digest

    problems = []
    for path, digest in read_layer_files(text).items():
        try:
            now = file_digest(path)
        except OSError:
            problems.append(f"{path} is gone (from {Path.cwd()})")
            continue
        if now != digest:
            problems.append(f"{path} has changed (sha256 {digest[:12]}... then, {now[:12]}... now)")
    return problems
