"""What one field may be: :class:`Field`, its check (pydantic, strict types), its MLflow text and
how that text is read back. The field table (:mod:`.fields`) derives one per training field from
its declaration; file formats declare their own settings as Fields directly (a study file's
``[study]`` table)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from research.experiment.config.config_text import (
    ConfigError,
    did_you_mean,
    quoted,
    show,
    type_name,
)

_EXPECTED = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}
_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type")
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _plain(value: Any) -> Any:
    """numpy scalars as the Python scalars they hold (strict pydantic takes only the latter)."""
    return value.item() if isinstance(value, np.generic) else value


def _listed(value: Any) -> Any:
    """A tuple as the list it holds (strict pydantic takes only lists for a list)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Field:
    """What one field may be, derived from its declaration (or declared directly, as the study
    files' ``[study]`` settings are). ``check`` validates through pydantic in strict mode (an
    integer field takes no float, a boolean is never a number; a float field takes integers),
    ``parse`` reads the text of an MLflow param back.

    A list field (``kind`` tuple: a list of integers, each within the bounds, at most
    ``max_items`` of them) takes a TOML array or a tuple and gives a tuple; its MLflow text is
    ``[1024, 512]``, and ``[]`` (no items) is allowed only as its default."""

    name: str
    kind: type  # int, float, bool, str, or tuple: a list of integers
    default: Any
    help: str = ""
    group: str = ""
    choices: tuple[Any, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    not_searchable: str = ""
    flags: tuple[str, ...] = ()
    allowed_text: str = ""  # what is allowed, where the derived wording would not do
    max_items: int | None = None  # a list field: the most items
    column: bool = False  # a column of the train runs' table in the MLflow UI
    #: A check beyond the type and range (a ``layers`` value must read as a network): the
    #: problem with a value of the field's type, and what is allowed instead, or None.
    validate: Callable[[Any], tuple[str, str] | None] | None = None

    @property
    def searchable(self) -> bool:
        return not self.not_searchable

    @property
    def flag(self) -> str:
        """The command-line flag: ``--hidden-size`` for ``hidden_size``."""
        return "--" + self.name.replace("_", "-")

    @property
    def allowed(self) -> str:
        """What is allowed, in words: ``an integer from 1 to 65536``, ``one of "a", "b"``."""
        if self.allowed_text:
            return self.allowed_text
        if self.kind is tuple:
            return f"{self.allowed_items}, or [] (the default)"
        if self.choices:
            return f"one of {quoted(self.choices)}"
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        noun = "an integer" if self.kind is int else "a finite number"
        low = (">=", self.ge) if self.ge is not None else (">", self.gt)
        high = ("<=", self.le) if self.le is not None else ("<", self.lt)

        def number(bound: float) -> str:
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        if low[1] is not None and high[1] is not None:
            if self.kind is int and low[0] == ">=" and high[0] == "<=":
                return f"an integer from {number(low[1])} to {number(high[1])}"
            left, right = "[" if low[0] == ">=" else "(", "]" if high[0] == "<=" else ")"
            plain = "an integer" if self.kind is int else "a number"  # bounded: finite anyway
            return f"{plain} in {left}{number(low[1])}, {number(high[1])}{right}"
        op, bound = low if low[1] is not None else high
        return noun if bound is None else f"{noun} {op} {number(bound)}"

    @property
    def allowed_items(self) -> str:
        """A list field's non-empty values, in words: ``a list of 1 to 32 integers, each ...``."""
        each = dataclasses.replace(self, kind=int, max_items=None).allowed
        return f"a list of 1 to {self.max_items} integers, each {each.removeprefix('an integer ')}"

    def text(self, value: Any) -> str:
        """The text MLflow keeps for a value, which :meth:`parse` reads back (``0.1``, ``True``,
        ``relu``, ``[1024, 512]``); also a list's choice as Optuna keeps it."""
        return str(list(value)) if isinstance(value, tuple) else str(value)

    @functools.cached_property
    def _adapter(self) -> Any:
        import pydantic

        kind: Any = Literal[self.choices] if self.choices else self.kind
        constraints: dict[str, Any] = {
            key: value
            for key, value in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt))
            if value is not None
        }
        if self.kind is float:
            constraints["allow_inf_nan"] = False
        if self.pattern is not None:
            constraints["pattern"] = f"^(?:{self.pattern})$"
        annotated = typing.Annotated[
            int if self.kind is tuple else kind,
            pydantic.BeforeValidator(_plain),
            pydantic.Field(**constraints),
        ]
        if self.kind is tuple:  # a list of such integers
            annotated = typing.Annotated[
                list[annotated],
                pydantic.BeforeValidator(_listed),
                pydantic.Field(max_length=self.max_items),
            ]
        return pydantic.TypeAdapter(annotated, config=pydantic.ConfigDict(strict=True))

    def check(self, value: Any, key: str | None = None, path: str | Path | None = None) -> Any:
        """The value, normalized (integers become floats for float fields), or ConfigError
        naming ``key`` (default: the field's name) and ``path``."""
        import pydantic

        try:
            checked = self._adapter.validate_python(value)
        except pydantic.ValidationError as error:
            value = _plain(value)  # shown as the Python value it is
            problem = self._problem(error.errors()[0], value)
            raise ConfigError(
                key or self.name, problem, value=value, allowed=self.allowed, path=path
            ) from None
        return self._validated(tuple(checked) if self.kind is tuple else checked, key, path)

    def _validated(self, value: Any, key: str | None = None, path: Any = None) -> Any:
        """``value`` (of the field's type, in range) if :attr:`validate` finds no problem."""
        found = None if self.validate is None else self.validate(value)
        if found is None:
            return value
        problem, allowed = found
        raise ConfigError(key or self.name, problem, value=value, allowed=allowed, path=path)

    def _problem(self, error: Mapping[str, Any], value: Any) -> str:
        """Our wording of a pydantic error (the rest of the message is ours too)."""
        kind = error["type"]
        if self.kind is tuple:  # a list: the list itself, or one of its items
            if kind == "list_type":
                return f"{type_name(value)}, not a list"
            if kind == "too_long":
                return f"{len(value)} items, more than {self.max_items}"
            if not error["loc"]:
                return str(error["msg"]).lower()
            index = error["loc"][0]
            item = dataclasses.replace(self, kind=int, max_items=None)
            problem = item._problem(error, _plain(value[index]))
            return f"item {index + 1} ({show(_plain(value[index]))}) is {problem}"
        if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
            return "out of range"  # an integer too large to be a float
        if kind.endswith("_parsing"):  # logged text that is not a value of the field's type
            return f"not {_EXPECTED[self.kind]}"
        if kind in _TYPE_ERRORS or (kind == "literal_error" and not isinstance(value, str)):
            expected = "a string" if self.choices else _EXPECTED[self.kind]
            return f"{type_name(value)}, not {expected}"
        if kind == "literal_error":
            return f"unknown name{did_you_mean(value, self.choices)}"
        if kind in _RANGE_ERRORS or kind == "finite_number":
            return "out of range"
        if kind == "string_pattern_mismatch":
            return "not allowed"
        return str(error["msg"]).lower()

    def parse(self, text: str) -> Any:
        """A value from the text MLflow keeps (``"0.1"``, ``"True"``, ``"relu"``,
        ``"[1024, 512]"``)."""
        import pydantic

        if self.kind is tuple:  # "[1024, 512]" (or a tuple's "(1024, 512)"); strict integers
            try:
                items = ast.literal_eval(text) if len(text) < 10_000 else text
            except (TypeError, ValueError, SyntaxError, MemoryError, RecursionError):
                items = text
            if not isinstance(items, list | tuple):
                raise ConfigError(self.name, "not a list", value=text, allowed=self.allowed)
            return self.check(items)
        try:
            value = self._adapter.validate_python(text, strict=False)
        except pydantic.ValidationError as error:
            problem = self._problem(error.errors()[0], text)
            raise ConfigError(self.name, problem, value=text, allowed=self.allowed) from None
        return self._validated(value)
