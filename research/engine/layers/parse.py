"""The ``layers`` value: a short text naming a network's hidden layers, read into layer objects.

Syntax (``python -m research train --help`` shows it too)::

    conv(20,5) maxpool(2) conv(40,5) maxpool(2) dense(100)

Tokens, separated by spaces; numbers in parentheses, by position or as ``name=value``:

=======================================  ====================================================
``dense(units)``                         fully connected; flattens its input
``conv(filters,kernel[,stride[,pad]])``  2-D convolution, NCHW, zero padding ``pad`` (default
                                         stride 1, pad 0)
``maxpool(kernel[,stride])``             max-pooling (stride defaults to the kernel)
``avgpool(kernel[,stride])``             average-pooling
``batchnorm[(momentum)]``                batch norm per channel (per feature after a dense);
                                         running averages updated with ``momentum`` (0.9)
``layernorm``                            layer norm over each example's features
``dropout[(rate)]``                      inverted dropout; bare, it takes the run's ``dropout``
``flatten``                              (C, H, W) → (C·H·W,)
``res(...)``                             residual block x + f(x), f the layers inside
``sigmoid tanh relu gelu swish``         an activation
``FILE.py:NAME[(numbers)]``              a researcher's own layer: the class NAME of the
                                         file (called with the numbers), or an object
=======================================  ====================================================

The output layer (a dense layer to the classes, then the run's ``output`` and ``loss``) is added
after them. Activations: if the value names none, the run's ``activation`` follows every ``conv``
and ``dense`` (after a ``batchnorm`` or ``layernorm`` right behind it) and every ``res(...)``
block (after the sum; not after the block's own last layer); if it names any, it
places them all. Inputs are images (1, 28, 28) when any ``conv`` or pooling layer is present,
else rows of 784 pixels. A user layer (:mod:`.user_file`) counts as an activation when it says
``activation = True``, and asks for images when it says ``images = True``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from research.engine.layers.activations import ACTIVATION_LAYERS, Activation
from research.engine.layers.base import Layer
from research.engine.layers.dense import Dense, Flatten
from research.engine.layers.dropout import Dropout
from research.engine.layers.user_file import USER_LAYER, load_layer

_TOKEN = re.compile(
    r"\s*(?:([^\s(),:=]+\.py:[A-Za-z_]\w*)|([A-Za-z_][A-Za-z0-9_]*)|(\()|(\))|(,)|([^\s(),]+))"
)


class LayersError(ValueError):
    """A ``layers`` value that cannot be read; the message names the token and what is allowed."""


@dataclass(frozen=True)
class Token:
    """One layer as written: its name, numeric arguments, and, for ``res``, the inner tokens."""

    name: str
    args: tuple[float, ...] = ()
    kwargs: tuple[tuple[str, float], ...] = ()
    inner: tuple[Token, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Syntax:
    """A layer name's arguments: the positional names in order and how many are required."""

    arguments: tuple[str, ...]
    required: int
    usage: str


SYNTAX: dict[str, Syntax] = {
    "dense": Syntax(("units",), 1, "dense(units)"),
    "conv": Syntax(
        ("filters", "kernel", "stride", "pad"), 2, "conv(filters,kernel[,stride[,pad]])"
    ),
    "maxpool": Syntax(("kernel", "stride"), 1, "maxpool(kernel[,stride])"),
    "avgpool": Syntax(("kernel", "stride"), 1, "avgpool(kernel[,stride])"),
    "batchnorm": Syntax(("momentum",), 0, "batchnorm[(momentum)]"),
    "layernorm": Syntax((), 0, "layernorm"),
    "dropout": Syntax(("rate",), 0, "dropout[(rate)]"),
    "flatten": Syntax((), 0, "flatten"),
    "res": Syntax((), 0, "res(layers...)"),
    **{name: Syntax((), 0, name) for name in ACTIVATION_LAYERS},
}
IMAGE_LAYERS = ("conv", "maxpool", "avgpool")
NORM_LAYERS = ("batchnorm", "layernorm")
ALLOWED = ", ".join(s.usage for s in SYNTAX.values()) + ", FILE.py:NAME (a layer of your own)"


def tokenize(text: str) -> tuple[Token, ...]:
    """The tokens of a ``layers`` value; :class:`LayersError` names what cannot be read."""
    pieces = _pieces(re.sub(r"\s*=\s*", "=", text))
    tokens, position = _sequence(pieces, 0, text, nested=False)
    if position != len(pieces):
        raise LayersError(f"unexpected {pieces[position]!r}")
    if not tokens:
        raise LayersError(f"it names no layer; allowed: {ALLOWED}")
    return tokens


def _pieces(text: str) -> list[str]:
    pieces, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            break
        position = match.end()
        piece = next(group for group in match.groups() if group is not None)
        pieces.append(piece)
    return pieces


def _sequence(pieces: list[str], i: int, text: str, nested: bool) -> tuple[tuple[Token, ...], int]:
    tokens = []
    while i < len(pieces) and pieces[i] != ")":
        name = pieces[i]
        if USER_LAYER.fullmatch(name):
            token, i = _user_token(pieces, i + 1, name, text)
            tokens.append(token)
            continue
        if name not in SYNTAX:
            hint = "" if re.fullmatch(r"[A-Za-z_]\w*", name) else " (a layer's name comes first)"
            raise LayersError(f"unknown layer {name!r}{hint}; allowed: {ALLOWED}")
        i += 1
        args: list[float] = []
        kwargs: list[tuple[str, float]] = []
        inner: tuple[Token, ...] = ()
        if i < len(pieces) and pieces[i] == "(":
            if name == "res":
                inner, i = _sequence(pieces, i + 1, text, nested=True)
                if not inner:
                    raise LayersError("res() holds no layer")
            else:
                i = _arguments(pieces, i + 1, name, text, args, kwargs)
            if i >= len(pieces) or pieces[i] != ")":
                raise LayersError(f"{name}( is not closed")
            i += 1
        elif name == "res":
            raise LayersError("res needs its layers, e.g. res(conv(8,3,1,1) relu)")
        tokens.append(_checked(Token(name, tuple(args), tuple(kwargs), inner), text))
    if not nested and i < len(pieces) and pieces[i] == ")":
        raise LayersError("a ')' closes nothing")
    return tuple(tokens), i


def _user_token(pieces: list[str], i: int, name: str, text: str) -> tuple[Token, int]:
    """``FILE.py:NAME`` with its optional numbers, which go to the class as they are."""
    args: list[float] = []
    kwargs: list[tuple[str, float]] = []
    if i < len(pieces) and pieces[i] == "(":
        i = _arguments(pieces, i + 1, name, text, args, kwargs)
        if i >= len(pieces) or pieces[i] != ")":
            raise LayersError(f"{name}( is not closed")
        i += 1
    numbers = [f"{v:g}" for v in args] + [f"{k}={v:g}" for k, v in kwargs]
    written = name + (f"({','.join(numbers)})" if numbers else "")
    return Token(name, tuple(args), tuple(kwargs), (), written), i


def is_user(token: Token) -> bool:
    return USER_LAYER.fullmatch(token.name) is not None


def _user_layer(token: Token) -> Layer:
    path, _, name = token.name.rpartition(":")
    return load_layer(path, name, token.args, token.kwargs)


def _arguments(
    pieces: list[str], i: int, name: str, text: str, args: list[float], kwargs: list[Any]
) -> int:
    while i < len(pieces) and pieces[i] != ")":
        piece = pieces[i]
        if piece == ",":
            i += 1
            continue
        key = None
        if i + 1 < len(pieces) and pieces[i + 1].startswith("="):
            key, piece = piece, pieces[i + 1][1:]
            i += 1
        elif "=" in piece:
            key, _, piece = piece.partition("=")
        try:
            value = float(piece)
        except ValueError:
            usage = SYNTAX[name].usage if name in SYNTAX else f"{name}(numbers)"
            raise LayersError(
                f"{name}'s argument {piece!r} is not a number; write {usage}"
            ) from None
        if key is None:
            args.append(value)
        else:
            kwargs.append((key, value))
        i += 1
    return i


def _checked(token: Token, text: str) -> Token:
    syntax = SYNTAX[token.name]
    names = dict(zip(syntax.arguments, token.args))
    if len(token.args) > len(syntax.arguments):
        raise LayersError(
            f"{token.name} takes at most {len(syntax.arguments)} numbers: {syntax.usage}"
        )
    for key, value in token.kwargs:
        if key not in syntax.arguments or key in names:
            raise LayersError(
                f"{token.name} has no argument {key!r} (or it is given twice): {syntax.usage}"
            )
        names[key] = value
    missing = [a for a in syntax.arguments[: syntax.required] if a not in names]
    if missing:
        raise LayersError(f"{token.name} needs {', '.join(missing)}: {syntax.usage}")
    counts = {"units", "filters", "kernel", "stride", "pad"}
    for key, value in names.items():
        if key in counts and (value != int(value) or value < (0 if key == "pad" else 1)):
            raise LayersError(
                f"{token.name}'s {key}={value:g} must be a whole number "
                f"{'>= 0' if key == 'pad' else '>= 1'}"
            )
    ordered = {a: names[a] for a in syntax.arguments if a in names}
    written = token.name
    if token.inner:
        written += "(" + " ".join(t.text for t in token.inner) + ")"
    elif ordered:
        given = list(ordered)
        positional = given == list(syntax.arguments[: len(given)])
        written += (
            "("
            + ",".join(f"{v:g}" if positional else f"{k}={v:g}" for k, v in ordered.items())
            + ")"
        )
    return Token(token.name, tuple(ordered.values()), tuple(ordered.items()), token.inner, written)


def named(token: Token) -> dict[str, float]:
    """The token's arguments by name (only those written)."""
    return dict(token.kwargs)


def uses_images(tokens: tuple[Token, ...]) -> bool:
    """True when any token (inside res too) needs image inputs (C, H, W): a conv or pooling
    layer, or a user layer saying ``images = True``."""
    return any(
        t.name in IMAGE_LAYERS or _user_says(t, "images") or uses_images(t.inner) for t in tokens
    )


def names_activation(tokens: tuple[Token, ...]) -> bool:
    """True when any token is an activation (a user layer saying ``activation = True`` too)."""
    return any(
        t.name in ACTIVATION_LAYERS or _user_says(t, "activation") or names_activation(t.inner)
        for t in tokens
    )


def _user_says(token: Token, flag: str) -> bool:
    return is_user(token) and bool(getattr(_user_layer(token), flag, False))


def build_layers(
    tokens: tuple[Token, ...],
    *,
    activation: str,
    init: str,
    dropout: float,
    insert_activations: bool,
    inside_residual: bool = False,
) -> list[Layer]:
    """Layer objects for ``tokens``; the run's ``activation`` inserted when it names none (inside
    a residual block not after its last layer: the block's activation follows the sum)."""
    layers: list[Layer] = []
    pending = False  # an activation is owed after a conv/dense (and the norm behind it)
    for token in tokens:
        if pending and token.name not in NORM_LAYERS:
            layers.append(Activation(activation))
            pending = False
        layers.append(_make(token, activation, init, dropout, insert_activations))
        # A residual block owes its activation after the sum, as in ResNet: relu(x + f(x)).
        if insert_activations and token.name in ("conv", "dense", "res"):
            pending = True
    if pending and not inside_residual:
        layers.append(Activation(activation))
    return layers


def _make(token: Token, activation: str, init: str, dropout: float, insert: bool) -> Layer:
    a = named(token)
    factories: dict[str, Callable[[], Layer]] = {
        "dense": lambda: Dense(int(a["units"]), init),
        "flatten": lambda: Flatten(),
        "dropout": lambda: Dropout(a.get("rate", dropout)),
        "conv": lambda: _conv(a, init),
        "maxpool": lambda: _pool("max", a),
        "avgpool": lambda: _pool("avg", a),
        "batchnorm": lambda: _norm("batch", a),
        "layernorm": lambda: _norm("layer", a),
        "res": lambda: _residual(
            build_layers(
                token.inner,
                activation=activation,
                init=init,
                dropout=dropout,
                insert_activations=insert,
                inside_residual=True,
            )
        ),
    }
    if token.name in ACTIVATION_LAYERS:
        return Activation(token.name)
    if is_user(token):
        return _user_layer(token)
    return factories[token.name]()


def _conv(a: dict[str, float], init: str) -> Layer:
    from research.engine.layers.conv import Conv2D

    return Conv2D(
        int(a["filters"]), int(a["kernel"]), int(a.get("stride", 1)), int(a.get("pad", 0)), init
    )


def _pool(kind: str, a: dict[str, float]) -> Layer:
    from research.engine.layers.pooling import AvgPool2D, MaxPool2D

    kernel = int(a["kernel"])
    stride = int(a.get("stride", kernel))
    return MaxPool2D(kernel, stride) if kind == "max" else AvgPool2D(kernel, stride)


def _norm(kind: str, a: dict[str, float]) -> Layer:
    from research.engine.layers.norm import BatchNorm, LayerNorm

    if kind == "batch":
        return BatchNorm(a.get("momentum", 0.9))
    return LayerNorm()


def _residual(inner: list[Layer]) -> Layer:
    from research.engine.layers.residual import Residual

    return Residual(tuple(inner))


def build_network(
    text: str,
    *,
    n_classes: int,
    output: str,
    loss: str,
    l2: float = 0.0,
    activation: str = "relu",
    init: str = "he",
    dropout: float = 0.0,
    input_dropout: float = 0.0,
    image_shape: tuple[int, ...] = (1, 28, 28),
) -> Any:
    """The :class:`~research.engine.network.Network` a ``layers`` value describes: the hidden
    layers, then ``dense(n_classes)`` giving the logits. Inputs are ``image_shape`` when a conv
    or pooling layer is present, else rows of prod(image_shape) values.

    Raises:
        LayersError: one line naming the token at fault and what is allowed (an unknown layer,
            a kernel larger than its input, a shape that does not chain).
    """
    from math import prod

    from research.engine.network import Network

    tokens = tokenize(text)
    layers = build_layers(
        tokens,
        activation=activation,
        init=init,
        dropout=dropout,
        insert_activations=not names_activation(tokens),
    )
    if input_dropout:
        layers.insert(0, Dropout(input_dropout))
    layers.append(Dense(n_classes, init))
    in_shape = tuple(image_shape) if uses_images(tokens) else (prod(image_shape),)
    try:
        return Network(tuple(layers), in_shape, output, loss, l2)
    except ValueError as error:
        raise LayersError(f"{error}") from None
