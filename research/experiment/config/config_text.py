"""Configuration as text: the one-line :class:`ConfigError` (file, key, value, problem, what is
allowed), values shown as TOML writes them, and reading TOML files (study files, paper files)
with their tables' keys checked. Used by the field table and by every file format built on it."""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import numpy as np


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: Any = _NoValue()


class ConfigError(ValueError):
    """A value a configuration does not allow, as one message:
    ``[<file>: ]<key> = <value>: <problem>; allowed: <what is allowed>``.

    Attributes ``path`` (None outside a file), ``key`` (a dotted key such as
    ``search.learning_rate.low``, None for a file-level problem), ``value``, ``problem`` and
    ``allowed`` hold the parts.
    """

    def __init__(
        self,
        key: str | None,
        problem: str,
        *,
        value: Any = NO_VALUE,
        allowed: str | None = None,
        path: str | Path | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.key, self.value, self.problem, self.allowed = key, value, problem, allowed
        parts = [] if self.path is None else [str(self.path)]
        if key is not None:
            parts.append(key if value is NO_VALUE else f"{key} = {show(value)}")
        elif value is not NO_VALUE:
            parts.append(show(value))
        message = ": ".join([*parts, problem])
        super().__init__(message + (f"; allowed: {allowed}" if allowed else ""))

    def but(self, **changes: Any) -> ConfigError:
        """The same error with some parts changed (e.g. ``path``, ``problem``)."""
        parts = {key: getattr(self, key) for key in ("key", "problem", "value", "allowed", "path")}
        parts.update(changes)
        return ConfigError(parts.pop("key"), parts.pop("problem"), **parts)


_LINE_BREAKS = {code: f"\\u{code:04x}" for code in (0x85, 0x2028, 0x2029)}


def show(value: Any, limit: int = 80) -> str:
    """A value as it is written in TOML (strings in double quotes, true/false, inf, nan)."""
    if isinstance(value, bool | np.bool_):
        text = "true" if value else "false"
    elif isinstance(value, str):  # the line breaks JSON leaves alone escaped too: one line
        text = json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS)
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(show(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{toml_key(k)} = {show(v, limit)}" for k, v in value.items()) + "}"
    elif isinstance(value, datetime | date | time):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def toml_key(key: str) -> str:
    """A key as written in TOML: bare if it can be, else quoted (so it stays on one line)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def type_name(value: Any) -> str:
    """'an integer', 'a string', ... for a TOML value."""
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list | tuple, "an array"),
        (dict, "a table"),
        (datetime | date | time, "a date/time"),
    ):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def quoted(names: Any) -> str:
    return ", ".join(show(name) for name in names)


def did_you_mean(word: Any, known: Any) -> str:
    """`` (did you mean "x"?)`` for a close known word, else ""."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {show(close[0])}?)" if close else ""


# --- TOML files ----------------------------------------------------------------------------------


def check_keys(
    table: Mapping[str, Any], prefix: str, allowed: Sequence[str], required: Sequence[str] = ()
) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{prefix}{toml_key(key)}",
                f"unknown key{did_you_mean(key, allowed)}",
                allowed=", ".join(allowed),
            )
    for key in required:
        if key not in table:
            raise ConfigError(f"{prefix}{key}", "missing (required)", allowed=", ".join(allowed))


def table_of(value: Any, key: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"{type_name(value)}, not a table", value=value, allowed=what)
    return value


def load_toml(path: Path, what: str, parse: Callable[[Path, dict[str, Any]], Any]) -> Any:
    """``parse(path, tables)`` of a TOML file (a study file, a paper file); every ConfigError,
    reading or parsing, names the file."""
    raw = read_toml(path, what)
    try:
        return parse(path, raw)
    except ConfigError as error:
        raise error.but(path=path) from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The tables of a TOML file, or ConfigError naming it."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        problem = f"cannot read the {what} ({error.strerror or error})"
        allowed = "a readable TOML file"
    except UnicodeDecodeError as error:
        problem, allowed = f"not UTF-8 text (byte {error.start})", "a UTF-8 TOML file"
    except tomllib.TOMLDecodeError as error:
        problem, allowed = f"invalid TOML: {error}", "TOML 1.0 syntax (https://toml.io)"
    except RecursionError:
        problem, allowed = "invalid TOML: nested too deeply", f"a {what}"
    raise ConfigError(None, problem, allowed=allowed, path=path)
