"""A researcher's own layer, from a Python file: ``my_layers.py:Swish`` in a ``layers`` value or
on ``verify-layer``'s command line.

``FILE.py:NAME`` names an object of the file: a class (called with the numbers written after it,
``my_layers.py:Gate(16)``, or with none), or a layer object itself. The file is imported from its
path (relative to the working directory), once per content: its SHA-256 names the module, so an
edited file is imported afresh. The loaded layer is wrapped in a :class:`FileLayer`, which keeps
the file's path and digest (logged with every run that uses it: ``rerun`` refuses when the file
has changed) and is written back as it was read (``describe()``).

Every problem (no such file, an import error, no such name, a missing method) is one
:class:`UserLayerError` line, never a traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from research.engine.layers.base import Shape

#: ``path/to/file.py:Name``, the way a user layer is written.
USER_LAYER = re.compile(r"(?P<path>[^\s(),:]+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)")
#: The contract's three methods.
METHODS = ("init", "forward", "backward")


class UserLayerError(ValueError):
    """A user layer that cannot be used; the message is one line: what, where, how to fix it."""


def file_digest(path: str | Path) -> str:
    """The SHA-256 of the file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class FileLayer:
    """A user layer and where it came from; it delegates the contract (and every extension the
    object has) to ``layer``."""

    path: str  # as written (relative to the working directory, or absolute)
    name: str
    args: tuple[float, ...]
    kwargs: tuple[tuple[str, float], ...]
    digest: str  # SHA-256 of the file when it was loaded
    layer: Any = field(repr=False)

    def init(self, rng: Any, in_shape: Shape, dtype: Any) -> dict:
        return self.layer.init(rng, in_shape, dtype)

    def forward(self, params: dict, x: Any, xp: Any, **extras: Any) -> tuple[Any, Any]:
        return self.layer.forward(params, x, xp, **extras)

    def backward(self, params: dict, cache: Any, dy: Any) -> tuple[Any, dict]:
        return self.layer.backward(params, cache, dy)

    def __getattr__(self, name: str) -> Any:
        # the optional extensions (needs, out_shape, check, init_state, ...): the layer's own
        if name.startswith("__") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def describe(self) -> str:
        """``my_layers.py:Gate(16)``, as a ``layers`` value writes it."""
        numbers = [f"{v:g}" for v in self.args] + [f"{k}={v:g}" for k, v in self.kwargs]
        return f"{self.path}:{self.name}" + (f"({','.join(numbers)})" if numbers else "")


def load_layer(
    path: str,
    name: str,
    args: tuple[float, ...] = (),
    kwargs: tuple[tuple[str, float], ...] = (),
) -> FileLayer:
    """The layer ``name`` of the file at ``path``, called with ``args`` if it is a class.

    Numbers that are whole are passed as ints (``Gate(16)`` gets 16, not 16.0).

    Raises:
        UserLayerError: one line saying what is wrong and how to fix it.
    """
    where = f"{path}:{name}"
    file = Path(path)
    if not file.is_file():
        raise UserLayerError(
            f"{where}: no file {path} (from {Path.cwd()}); give the path to a .py file, "
            "relative to the working directory or absolute"
        )
    digest = file_digest(file)
    module = _import(file, digest, where)
    if not hasattr(module, name):
        found = sorted(
            n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")
        )
        raise UserLayerError(
            f"{where}: {path} defines no {name!r} (its classes: {', '.join(found) or 'none'})"
        )
    made = _construct(getattr(module, name), args, kwargs, where)
    missing = [m for m in METHODS if not callable(getattr(made, m, None))]
    if missing:
        raise UserLayerError(
            f"{where}: it has no {', '.join(missing)} method; a layer needs init(rng, in_shape, "
            "dtype), forward(params, x, xp) and backward(params, cache, dy) (docs/layers.md)"
        )
    return FileLayer(path, name, tuple(args), tuple(kwargs), digest, made)


def _import(file: Path, digest: str, where: str) -> ModuleType:
    """The module of ``file``, imported once per content (its digest names it)."""
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"research_user_layer_{stem}_{digest[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise UserLayerError(f"{where}: {file} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise UserLayerError(
            f"{where}: importing {file} failed: {_where_raised(error, file)}"
        ) from None
    return module


def _construct(
    obj: Any, args: tuple[float, ...], kwargs: tuple[tuple[str, float], ...], where: str
) -> Any:
    """A class called with the numbers (whole ones as ints); an object as it is."""
    numbers = [int(v) if float(v).is_integer() else v for v in args]
    named = {k: int(v) if float(v).is_integer() else v for k, v in kwargs}
    if not inspect.isclass(obj):
        if numbers or named:
            raise UserLayerError(f"{where}: it is no class, so it takes no numbers; write {where}")
        return obj
    try:
        return obj(*numbers, **named)
    except Exception as error:
        given = ", ".join([*map(str, numbers), *(f"{k}={v}" for k, v in named.items())])
        raise UserLayerError(
            f"{where}: {obj.__name__}({given}) failed: {type(error).__name__}: {error}"
        ) from None


def _where_raised(error: BaseException, file: Path) -> str:
    """``SyntaxError: invalid syntax (line 3)``: the error and the line of ``file`` it came from."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    lines = [
        f.lineno
        for f in traceback.extract_tb(error.__traceback__)
        if Path(f.filename) == file.resolve()
    ]
    at = f" (line {lines[-1]})" if lines else ""
    return f"{type(error).__name__}: {error}{at}".replace("\n", " ")


def user_files(layers: Any) -> dict[str, str]:
    """``{path: digest}`` of the user layers in ``layers`` (inside residual blocks too)."""
    found: dict[str, str] = {}
    for layer in layers:
        if isinstance(layer, FileLayer):
            found[layer.path] = layer.digest
        inner = getattr(layer, "layers", None)
        if isinstance(inner, tuple) and not isinstance(layer, FileLayer):
            found.update(user_files(inner))
    return found
