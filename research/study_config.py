"""Optuna study definitions: TOML files read and validated into frozen dataclasses.

This module is pure configuration: it imports neither Optuna nor MLflow. The study runner maps a
:class:`StudyConfig` to an Optuna study (sampler, pruner, one ``suggest_*`` call per
:class:`SearchParam`) and builds every trial's :class:`~research.train.TrainConfig` with
:meth:`StudyConfig.train_config`. Everything that can be checked without data is checked when the
file is loaded, before any trial starts; a mistake raises :class:`StudyConfigError` with one
message naming the file, the dotted key (``search.learning_rate.low``), the bad value and what is
allowed.

The format (``experiments/mnist_mlp.toml`` is a complete, commented example)::

    [study]
    name = "mnist_mlp"          # Optuna study name and MLflow experiment name      (required)
    objective = "val/accuracy"  # "val/accuracy" (maximized) or "val/loss" (minimized) (required)
    n_trials = 20               # integer >= 1                                       (required)
    timeout = 540               # seconds > 0; no new trial starts after it    (optional: none)
    sampler = "tpe"             # "tpe" or "random"                           (optional: "tpe")
    pruner = "median"           # "median", "hyperband" or "none"          (optional: "median")
    seed = 0                    # the sampler's seed, 0 .. 2**32 - 1              (optional: 0)
    preset = "default"          # TrainConfig preset the [fixed] values start from
                                #                                        (optional: "default")

    [fixed]                     # TrainConfig fields, the same in every trial (optional table)
    epochs = 8
    seed = 0                    # the *training* seed (init and shuffling), not the sampler's

    [search.hidden_size]        # one table per searched TrainConfig field (at least one)
    type = "int"                # "int": low, high, optional log (default false), step (default 1)
    low = 64
    high = 1024
    log = true

    [search.learning_rate]
    type = "float"              # "float": low, high, optional log (default false), step
    low = 0.01
    high = 0.5
    log = true

    [search.batch_size]
    type = "categorical"        # "categorical": choices, a non-empty array without duplicates
    choices = [64, 128, 256]

Every key under ``[fixed]`` and ``[search]`` is a :class:`~research.train.TrainConfig` field name,
as are the Optuna parameter names and MLflow params. The values of a trial are: the preset, then
``[fixed]``, then the searched values (a field is either fixed or searched, never both).

Rules (each one a :class:`StudyConfigError` when broken):

- Unknown keys anywhere are rejected, with the closest known key suggested (``n_trails`` → did you
  mean ``n_trials``?); ``[study]`` needs ``name``, ``objective`` and ``n_trials``; ``[search]``
  needs at least one table.
- Types are strict: integers for integer fields (``hidden_size = 64.0`` and ``n_trials = "20"``
  are errors, and a boolean is never a number); integers are accepted for float fields
  (``l2 = 0``) and become floats. Floats must be finite.
- Values must be valid for their field: sizes, ``batch_size``, ``epochs`` >= 1, ``hidden_size`` at
  most 65536 and ``n_hidden_layers`` at most 32 (sanity limits against typos),
  ``learning_rate`` > 0, ``l2`` >= 0, ``momentum`` in [0, 1), ``seed`` >= 0, names from
  :mod:`research.mlp` / :mod:`research.optim`. Range ends and categorical choices are checked the
  same way as fixed values.
- Searchable fields: every TrainConfig field except ``epochs`` (the budget; pruners compare
  trials epoch by epoch), ``seed`` (searching it tunes to noise), ``dtype`` (precision and speed,
  not a model choice), ``raw_inputs`` and ``drop_last`` (data handling, fixed per study). Integer
  fields take ``type = "int"`` or ``"categorical"``, float fields ``"float"`` or
  ``"categorical"``, names and booleans ``"categorical"``.
- Ranges: ``low < high`` (a single value belongs in ``[fixed]``, as does a single choice);
  ``log = true`` needs ``low > 0`` and no ``step`` (for ``int``: ``step = 1``); a ``step`` must
  divide ``high - low`` exactly. These mirror Optuna's own rules, so Optuna neither raises nor
  warns later.
- Combinations: a TrainConfig is built from the fixed values with every combination of the
  searched values' corners (each categorical choice, each range's low and high); if one is
  invalid (``loss = "cross_entropy"`` with ``output = "sigmoid"``), the error names the keys
  involved. Searching ``momentum`` or ``nesterov`` when the optimizer can never be
  ``"momentum"`` is rejected too (the dimension would do nothing).
- A batch size larger than the training rows needs the data size: :func:`check_batch_size`.
"""

from __future__ import annotations

import decimal
import difflib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Literal

from research.mlp import ACTIVATIONS, INIT_SCHEMES, LOSSES, OUTPUTS
from research.optim import OPTIMIZERS
from research.train import PRESETS, TrainConfig

#: objective metric -> Optuna direction
OBJECTIVES: dict[str, str] = {"val/accuracy": "maximize", "val/loss": "minimize"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DTYPES = ("float32", "float64")
#: TrainConfig fields a study may not search, with the reason shown in the error.
NOT_SEARCHABLE: dict[str, str] = {
    "epochs": "the training budget is fixed per study (pruners compare trials epoch by epoch)",
    "seed": "searching the training seed tunes to noise",
    "dtype": "numerical precision is a cost setting, not a model choice",
    "raw_inputs": "input scaling is fixed per study",
    "drop_last": "batching of the remainder is fixed per study",
}
SEARCHABLE: tuple[str, ...] = tuple(
    name for name in TrainConfig.field_names() if name not in NOT_SEARCHABLE
)
MAX_HIDDEN_SIZE = 65_536
MAX_HIDDEN_LAYERS = 32
#: Above this many corner combinations, combinations are checked pairwise (every value of every
#: pair of searched fields); TrainConfig's constraints involve at most two fields.
MAX_COMBINATIONS = 4096

Kind = Literal["int", "float", "categorical"]
KINDS: tuple[str, ...] = ("int", "float", "categorical")
_OVERRIDE = " (given on the command line)"


class _Missing:
    def __repr__(self) -> str:
        return "<no value>"


_NO_VALUE: Any = _Missing()


def _show(value: Any, limit: int = 80) -> str:
    """A value as it is written in TOML (strings in double quotes, true/false, inf, nan)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        text = repr(value) if math.isfinite(value) else text
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{_key(k)} = {_show(v, limit)}" for k, v in value.items()) + "}"
    elif isinstance(value, datetime | date | time):
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: str) -> str:
    """A key as written in TOML: bare if it can be, else quoted (so it stays on one line)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _type_name(value: Any) -> str:
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


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(_show(name) for name in names)


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {_show(close[0])}?)" if close else ""


class StudyConfigError(Exception):
    """A mistake in a study definition, as one message:
    ``<file>: <dotted key> = <bad value>: <problem>; allowed: <what is allowed>``.

    Attributes ``path`` (None for a value checked outside a file), ``key`` (e.g.
    ``"search.learning_rate.low"``, None for file-level problems), ``value``, ``problem`` and
    ``allowed`` hold the parts.
    """

    def __init__(
        self,
        path: str | Path | None,
        key: str | None,
        problem: str,
        *,
        value: Any = _NO_VALUE,
        allowed: str | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.key = key
        self.value = value
        self.problem = problem
        self.allowed = allowed
        parts = [] if self.path is None else [str(self.path)]
        if key is not None:
            parts.append(key if value is _NO_VALUE else f"{key} = {_show(value)}")
        elif value is not _NO_VALUE:
            parts.append(_show(value))
        message = ": ".join([*parts, problem])
        if allowed:
            message += f"; allowed: {allowed}"
        super().__init__(message)

    def located(self, path: str | Path) -> StudyConfigError:
        """The same error, naming ``path`` as the file."""
        return StudyConfigError(
            path, self.key, self.problem, value=self.value, allowed=self.allowed
        )

    def amended(self, note: str) -> StudyConfigError:
        """The same error with ``note`` appended to the problem."""
        return StudyConfigError(
            self.path, self.key, self.problem + note, value=self.value, allowed=self.allowed
        )


@contextmanager
def _in_file(path: Path) -> Iterator[None]:
    """Errors raised inside without a file get ``path`` as their file."""
    try:
        yield
    except StudyConfigError as error:
        if error.path is None:
            raise error.located(path) from None
        raise


# --- value rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """What one scalar value may be: its TOML type, a range or set of names, and the wording."""

    kind: Literal["int", "float", "bool", "str"]
    allowed: str
    ok: Callable[[Any], bool] = lambda value: True
    names: tuple[str, ...] = ()

    def check(self, value: Any, key: str) -> Any:
        """The value, normalized (ints become floats for float rules), or StudyConfigError."""
        expected = {
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean",
            "str": "a string",
        }
        if self.kind == "int":
            good_type = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind == "float":
            good_type = isinstance(value, int | float) and not isinstance(value, bool)
        elif self.kind == "bool":
            good_type = isinstance(value, bool)
        else:
            good_type = isinstance(value, str)
        if not good_type:
            raise StudyConfigError(
                None,
                key,
                f"{_type_name(value)}, not {expected[self.kind]}",
                value=value,
                allowed=self.allowed,
            )
        normalized = float(value) if self.kind == "float" else value
        if self.names and value not in self.names:
            raise StudyConfigError(
                None,
                key,
                f"unknown name{_did_you_mean(value, self.names)}",
                value=value,
                allowed=self.allowed,
            )
        if not self.ok(normalized):
            problem = "out of range" if self.kind in ("int", "float") else "not allowed"
            raise StudyConfigError(None, key, problem, value=value, allowed=self.allowed)
        return normalized


def _names(names: Sequence[str]) -> _Rule:
    return _Rule("str", f"one of {_quoted(names)}", names=tuple(names))


def _finite(value: float) -> bool:
    return math.isfinite(value)


_FIELD_RULES: dict[str, _Rule] = {
    "hidden_size": _Rule(
        "int", f"an integer from 1 to {MAX_HIDDEN_SIZE}", lambda v: 1 <= v <= MAX_HIDDEN_SIZE
    ),
    "n_hidden_layers": _Rule(
        "int", f"an integer from 1 to {MAX_HIDDEN_LAYERS}", lambda v: 1 <= v <= MAX_HIDDEN_LAYERS
    ),
    "activation": _names(ACTIVATIONS),
    "output": _names(OUTPUTS),
    "loss": _names(LOSSES),
    "l2": _Rule("float", "a finite number >= 0", lambda v: _finite(v) and v >= 0),
    "init": _names(INIT_SCHEMES),
    "optimizer": _names(OPTIMIZERS),
    "learning_rate": _Rule("float", "a finite number > 0", lambda v: _finite(v) and v > 0),
    "momentum": _Rule("float", "a number in [0, 1)", lambda v: 0 <= v < 1),
    "nesterov": _Rule("bool", "true or false"),
    "batch_size": _Rule("int", "an integer >= 1", lambda v: v >= 1),
    "epochs": _Rule("int", "an integer >= 1", lambda v: v >= 1),
    "seed": _Rule("int", "an integer >= 0", lambda v: v >= 0),
    "drop_last": _Rule("bool", "true or false"),
    "raw_inputs": _Rule("bool", "true or false"),
    "dtype": _names(DTYPES),
}

_STUDY_RULES: dict[str, _Rule] = {
    # Names become MLflow experiment names and tag values in search filters: keep them plain.
    "name": _Rule(
        "str",
        "a name of letters, digits, '_', '-' and '.' (at most 100 characters)",
        lambda v: re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", v) is not None,
    ),
    "objective": _Rule(
        "str",
        " or ".join(f"{_show(k)} ({v})" for k, v in OBJECTIVES.items()),
        names=tuple(OBJECTIVES),
    ),
    "n_trials": _Rule("int", "an integer >= 1", lambda v: v >= 1),
    "timeout": _Rule(
        "float", "a number of seconds > 0 (leave it out for none)", lambda v: _finite(v) and v > 0
    ),
    "sampler": _names(SAMPLERS),
    "pruner": _names(PRUNERS),
    "seed": _Rule("int", "an integer from 0 to 2**32 - 1", lambda v: 0 <= v < 2**32),
    "preset": _names(tuple(PRESETS)),
}
_STUDY_REQUIRED = ("name", "objective", "n_trials")
_STUDY_DEFAULTS: dict[str, Any] = {
    "timeout": None,
    "sampler": "tpe",
    "pruner": "median",
    "seed": 0,
    "preset": "default",
}
_PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "int": ("type", "low", "high", "log", "step"),
    "float": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
_LOG_RULE = _Rule("bool", "true or false")


def _kinds_for(name: str) -> tuple[str, ...]:
    """The search types a field allows: its own numeric type, or categorical."""
    rule_kind = _FIELD_RULES[name].kind
    return (rule_kind, "categorical") if rule_kind in ("int", "float") else ("categorical",)


def _check_searchable(name: str, key: str) -> None:
    if name in NOT_SEARCHABLE:
        raise StudyConfigError(
            None,
            key,
            f"{name} cannot be searched: {NOT_SEARCHABLE[name]}; set it in [fixed]",
            allowed=", ".join(SEARCHABLE),
        )
    if name not in _FIELD_RULES:
        raise StudyConfigError(
            None,
            key,
            f"not a TrainConfig field{_did_you_mean(name, SEARCHABLE)}",
            allowed=", ".join(SEARCHABLE),
        )


# --- the dataclasses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One searched TrainConfig field and its Optuna distribution.

    ``kind`` is the TOML ``type``: ``"int"`` and ``"float"`` use ``low``, ``high``, ``log`` and
    ``step`` (``suggest_int`` / ``suggest_float``; ``step`` None means continuous for floats and
    1 for ints), ``"categorical"`` uses ``choices`` (``suggest_categorical``). Construction
    validates everything (a StudyConfigError names ``search.<name>.<key>``) and normalizes
    numbers (ints to floats for float fields, ``choices`` to a tuple).
    """

    name: str
    kind: Kind
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise StudyConfigError(None, "search", "a field name must be a string", value=self.name)
        _check_searchable(self.name, f"search.{_key(self.name)}")
        key = f"search.{self.name}"
        rule = _FIELD_RULES[self.name]
        kinds = _kinds_for(self.name)
        if self.kind not in kinds:
            raise StudyConfigError(
                None,
                f"{key}.type",
                f"not a search type for {self.name} ({_FIELD_RULES[self.name].allowed})",
                value=self.kind,
                allowed=_quoted(kinds),
            )
        if self.kind == "categorical":
            self._check_choices(key, rule)
        else:
            self._check_range(key, rule)

    def _check_choices(self, key: str, rule: _Rule) -> None:
        for attribute, value, unset in (
            ("low", self.low, None),
            ("high", self.high, None),
            ("step", self.step, None),
            ("log", self.log, False),
        ):
            if value is not unset:
                raise StudyConfigError(
                    None,
                    f"{key}.{attribute}",
                    'not used with type = "categorical"',
                    value=value,
                    allowed="type, choices",
                )
        if not isinstance(self.choices, list | tuple):
            raise StudyConfigError(
                None,
                f"{key}.choices",
                f"{_type_name(self.choices)}, not an array",
                value=self.choices,
                allowed=f"a non-empty array of values, each {rule.allowed}",
            )
        choices = tuple(
            rule.check(value, f"{key}.choices[{i}]") for i, value in enumerate(self.choices)
        )
        if len(choices) < 2:
            raise StudyConfigError(
                None,
                f"{key}.choices",
                "empty" if not choices else "a single choice is not a search; put it in [fixed]",
                value=list(self.choices),
                allowed=f"at least two distinct values, each {rule.allowed}",
            )
        for i, value in enumerate(choices):
            if value in choices[:i]:
                raise StudyConfigError(
                    None,
                    f"{key}.choices",
                    f"{_show(value)} appears more than once",
                    value=list(self.choices),
                    allowed="distinct values",
                )
        object.__setattr__(self, "choices", choices)

    def _check_range(self, key: str, rule: _Rule) -> None:
        if self.choices != ():
            raise StudyConfigError(
                None,
                f"{key}.choices",
                f'not used with type = "{self.kind}"',
                value=self.choices,
                allowed=", ".join(_PARAM_KEYS[self.kind]),
            )
        bounds = {}
        for attribute in ("low", "high"):
            value = getattr(self, attribute)
            if value is None:
                raise StudyConfigError(None, f"{key}.{attribute}", "missing", allowed=rule.allowed)
            bounds[attribute] = rule.check(value, f"{key}.{attribute}")
        low, high = bounds["low"], bounds["high"]
        log = _LOG_RULE.check(self.log, f"{key}.log")
        if low >= high:
            raise StudyConfigError(
                None,
                key,
                f"low = {_show(low)}, high = {_show(high)}: the range is "
                + ("a single value; put it in [fixed]" if low == high else "inverted"),
                allowed="low < high",
            )
        if log and low <= 0:
            raise StudyConfigError(
                None, f"{key}.low", "log = true needs low > 0", value=low, allowed="low > 0"
            )
        step = self.step
        if step is not None:
            step = self._check_step(key, step, low, high, log)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "step", step)

    def _check_step(self, key: str, step: Any, low: Any, high: Any, log: bool) -> int | float:
        if self.kind == "int":
            step = _Rule("int", "an integer >= 1", lambda v: v >= 1).check(step, f"{key}.step")
            if log and step != 1:
                raise StudyConfigError(
                    None,
                    f"{key}.step",
                    "log = true cannot be combined with a step",
                    value=step,
                    allowed="step = 1 (or leave it out) with log = true",
                )
            divides = (high - low) % step == 0
        else:
            step = _Rule("float", "a finite number > 0", lambda v: _finite(v) and v > 0).check(
                step, f"{key}.step"
            )
            if log:
                raise StudyConfigError(
                    None,
                    f"{key}.step",
                    "log = true cannot be combined with a step",
                    value=step,
                    allowed="no step with log = true",
                )
            with decimal.localcontext() as context:
                context.prec = 50
                span = decimal.Decimal(str(high)) - decimal.Decimal(str(low))
                try:
                    divides = span % decimal.Decimal(str(step)) == 0
                except decimal.InvalidOperation:  # more than 10**50 steps
                    divides = False
        if not divides:
            raise StudyConfigError(
                None,
                f"{key}.step",
                f"does not divide high - low = {_show(high)} - {_show(low)}",
                value=step,
                allowed="a step that divides high - low exactly",
            )
        return step

    @property
    def key(self) -> str:
        """The dotted key of this parameter's table: ``search.<name>``."""
        return f"search.{self.name}"

    def corners(self) -> tuple[Any, ...]:
        """The values that bound what the sampler can suggest: every choice, or low and high."""
        return self.choices if self.kind == "categorical" else (self.low, self.high)


class _FrozenMapping(Mapping[str, Any]):
    """A read-only, hashable, picklable mapping (the ``fixed`` values of a StudyConfig)."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study definition (see the module docstring for the TOML format).

    Attributes:
        path: the study file (as given), named in every error.
        name: Optuna study name and MLflow experiment name.
        objective: ``"val/accuracy"`` or ``"val/loss"``: the validation metric trials are judged
            by (``direction`` follows from it).
        n_trials, timeout: the budget; ``timeout`` in seconds or None.
        sampler: ``"tpe"`` or ``"random"``; pruner: ``"median"``, ``"hyperband"`` or ``"none"``.
        seed: the sampler's seed (the training seed is ``fixed["seed"]``).
        preset: the TrainConfig preset the fixed values started from.
        fixed: every TrainConfig field that is not searched → its value (preset, then [fixed]).
        search: the searched fields, in file order.

    Construction validates everything again (so every instance, including those made by
    :func:`with_overrides` or ``dataclasses.replace``, is a valid study) and raises
    StudyConfigError naming ``path``.
    """

    path: Path
    name: str
    objective: str
    n_trials: int
    timeout: float | None
    sampler: str
    pruner: str
    seed: int
    preset: str
    fixed: Mapping[str, Any]
    search: tuple[SearchParam, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        with _in_file(self.path):
            for name in _STUDY_RULES:
                value = getattr(self, name)
                if name == "timeout" and value is None:
                    continue
                object.__setattr__(self, name, _STUDY_RULES[name].check(value, f"study.{name}"))
            search = tuple(self.search)
            for param in search:
                if not isinstance(param, SearchParam):
                    raise StudyConfigError(
                        None, "search", "not a SearchParam", value=param, allowed="SearchParam"
                    )
            names = [param.name for param in search]
            if not names:
                raise StudyConfigError(
                    None,
                    "search",
                    "nothing is searched",
                    allowed=f"at least one [search.<field>] table, <field> one of "
                    f"{', '.join(SEARCHABLE)}",
                )
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise StudyConfigError(
                        None, f"search.{name}", "searched twice", allowed="each field once"
                    )
            expected = [name for name in TrainConfig.field_names() if name not in names]
            fixed = dict(self.fixed)
            for name in fixed:
                if name in names:
                    raise StudyConfigError(
                        None,
                        f"fixed.{name}",
                        f"both fixed and searched (search.{name})",
                        value=fixed[name],
                        allowed="each field either in [fixed] or in [search], not both",
                    )
                if name not in expected:
                    raise StudyConfigError(
                        None,
                        f"fixed.{name}",
                        f"unknown key{_did_you_mean(name, expected)}",
                        allowed=", ".join(expected),
                    )
            missing = [name for name in expected if name not in fixed]
            if missing:
                raise StudyConfigError(
                    None,
                    "fixed",
                    f"missing {', '.join(missing)}",
                    allowed="a value for every TrainConfig field that is not searched",
                )
            fixed = {
                name: _FIELD_RULES[name].check(fixed[name], f"fixed.{name}") for name in expected
            }
            object.__setattr__(self, "search", search)
            object.__setattr__(self, "fixed", _FrozenMapping(fixed))
            _check_combinations(self.fixed, search)

    @property
    def direction(self) -> str:
        """``"maximize"`` for val/accuracy, ``"minimize"`` for val/loss."""
        return OBJECTIVES[self.objective]

    @property
    def search_names(self) -> tuple[str, ...]:
        """The searched TrainConfig fields (the Optuna parameter names), in file order."""
        return tuple(param.name for param in self.search)

    def train_config(self, suggested: Mapping[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: the fixed values plus ``suggested`` (one value per
        searched field, keyed by field name, e.g. Optuna's ``trial.params``).

        Raises:
            ValueError: ``suggested`` lacks a searched field or has another key, or TrainConfig
                rejects a value.
        """
        missing = [name for name in self.search_names if name not in suggested]
        extra = [name for name in suggested if name not in self.search_names]
        if missing or extra:
            raise ValueError(
                f"suggested values must name exactly the searched fields "
                f"({', '.join(self.search_names)}); "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"not searched: {', '.join(map(str, extra))}" if extra else "",
                    )
                    if part
                )
            )
        return TrainConfig(**{**self.fixed, **suggested})


# --- checks across fields ----------------------------------------------------------------------


def _combinations(search: Sequence[SearchParam]) -> Iterator[dict[str, Any]]:
    """Corner combinations of the searched values: all of them when there are at most
    MAX_COMBINATIONS, else every pair of values of every pair of fields (others at their first)."""
    corners = [param.corners() for param in search]
    names = [param.name for param in search]
    if math.prod(len(values) for values in corners) <= MAX_COMBINATIONS:
        for values in itertools.product(*corners):
            yield dict(zip(names, values))
        return
    base = {name: values[0] for name, values in zip(names, corners)}
    yield base
    for i, j in itertools.combinations(range(len(names)), 2):
        for a, b in itertools.product(corners[i], corners[j]):
            yield {**base, names[i]: a, names[j]: b}


def _check_combinations(
    fixed: Mapping[str, Any],
    search: Sequence[SearchParam],
    from_preset: tuple[str, frozenset[str]] | None = None,
) -> None:
    """Builds a TrainConfig for the fixed values with each corner combination of the search.

    ``from_preset`` is (preset name, fixed fields that came from it), for the message.
    """
    names = [param.name for param in search]
    optimizer = next((param for param in search if param.name == "optimizer"), None)
    if optimizer is None:
        possible, where = (fixed["optimizer"],), f"fixed.optimizer = {_show(fixed['optimizer'])}"
    else:
        possible = optimizer.choices
        where = f"search.optimizer.choices = {_show(list(possible))}"
    for name in ("momentum", "nesterov"):
        if name in names and "momentum" not in possible:
            raise StudyConfigError(
                None,
                f"search.{name}",
                f'searching it has no effect: {name} applies to optimizer = "momentum" only, '
                f"and {where}",
                allowed=f'search {name} only when the optimizer can be "momentum"',
            )
    for combination in _combinations(search):
        try:
            TrainConfig(**{**fixed, **combination})
        except ValueError as error:
            raise _combination_error(str(error), fixed, combination, from_preset) from None


def _combination_error(
    message: str,
    fixed: Mapping[str, Any],
    combination: Mapping[str, Any],
    from_preset: tuple[str, frozenset[str]] | None,
) -> StudyConfigError:
    """Names the fields an invalid combination's message mentions, and where each came from."""
    mentioned = [
        name for name in TrainConfig.field_names() if re.search(rf"\b{name}\b", message)
    ] or list(combination)
    parts = []
    for name in mentioned:
        if name in combination:
            parts.append(f"search.{name} = {_show(combination[name])}")
        else:
            source = f"fixed.{name} = {_show(fixed[name])}"
            if from_preset is not None and name in from_preset[1]:
                source = f"{name} = {_show(fixed[name])} (from preset {_show(from_preset[0])})"
            parts.append(source)
    # the key: a searched field, else one set in [fixed], else one from the preset
    preset_fields = from_preset[1] if from_preset is not None else frozenset()
    culprit = min(mentioned, key=lambda name: (name not in combination, name in preset_fields))
    key = f"{'search' if culprit in combination else 'fixed'}.{culprit}"
    return StudyConfigError(
        None,
        key,
        f"invalid combination {', '.join(parts)}: {message}",
        allowed="values TrainConfig accepts together: change [fixed] or drop the search values",
    )


# --- loading -----------------------------------------------------------------------------------


def _check_keys(
    table: Mapping[str, Any], prefix: str, allowed: Sequence[str], required: Sequence[str] = ()
) -> None:
    for key in table:
        if key not in allowed:
            raise StudyConfigError(
                None,
                f"{prefix}{_key(key)}",
                f"unknown key{_did_you_mean(key, allowed)}",
                allowed=", ".join(allowed),
            )
    for key in required:
        if key not in table:
            raise StudyConfigError(
                None, f"{prefix}{key}", "missing (required)", allowed=", ".join(allowed)
            )


def _table(value: Any, key: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StudyConfigError(
            None, key, f"{_type_name(value)}, not a table", value=value, allowed=what
        )
    return value


def load_study_config(path: str | Path) -> StudyConfig:
    """Reads and validates a study file (TOML).

    Raises:
        StudyConfigError: the file cannot be read, is not TOML, or breaks a rule of the format
            (see the module docstring); the message names the file, key, value and what is
            allowed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StudyConfigError(
            path,
            None,
            f"cannot read the study file ({error.strerror or error})",
            allowed="a readable TOML file",
        ) from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise StudyConfigError(
            path, None, f"not UTF-8 text (byte {error.start})", allowed="a UTF-8 TOML file"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise StudyConfigError(
            path, None, f"invalid TOML: {error}", allowed="TOML 1.0 syntax (https://toml.io)"
        ) from None
    except RecursionError:
        raise StudyConfigError(
            path, None, "invalid TOML: nested too deeply", allowed="a study file"
        ) from None
    with _in_file(path):
        return _parse(path, raw)


def _parse(path: Path, raw: dict[str, Any]) -> StudyConfig:
    _check_keys(raw, "", ("study", "fixed", "search"), required=("study", "search"))
    study = _table(raw["study"], "study", "a [study] table")
    _check_keys(study, "study.", tuple(_STUDY_RULES), required=_STUDY_REQUIRED)
    settings = dict(_STUDY_DEFAULTS)
    for key, value in study.items():
        settings[key] = _STUDY_RULES[key].check(value, f"study.{key}")

    fields = TrainConfig.field_names()
    fixed_raw = _table(raw.get("fixed", {}), "fixed", "a [fixed] table of TrainConfig fields")
    _check_keys(fixed_raw, "fixed.", fields)
    fixed = {
        key: _FIELD_RULES[key].check(value, f"fixed.{key}") for key, value in fixed_raw.items()
    }

    search_raw = _table(raw["search"], "search", "[search.<field>] tables")
    search = []
    for name, spec in search_raw.items():
        key = f"search.{_key(name)}"
        if name not in fields:
            raise StudyConfigError(
                None,
                key,
                f"unknown key{_did_you_mean(name, SEARCHABLE)}",
                allowed=", ".join(SEARCHABLE),
            )
        _check_searchable(name, key)
        if name in fixed:
            raise StudyConfigError(
                None,
                key,
                f"both fixed and searched (fixed.{name} = {_show(fixed[name])})",
                allowed="each field either in [fixed] or in [search], not both",
            )
        search.append(_parse_param(name, spec))
    if not search:
        raise StudyConfigError(
            None,
            "search",
            "nothing is searched",
            allowed=f"at least one [search.<field>] table, <field> one of {', '.join(SEARCHABLE)}",
        )

    preset_values = PRESETS[settings["preset"]].as_params()
    names = {param.name for param in search}
    values = {name: fixed.get(name, preset_values[name]) for name in fields if name not in names}
    from_preset = frozenset(name for name in values if name not in fixed)
    _check_combinations(values, search, (settings["preset"], from_preset))
    return StudyConfig(path=path, fixed=values, search=tuple(search), **settings)


def _parse_param(name: str, spec: Any) -> SearchParam:
    key = f"search.{name}"
    kinds = _kinds_for(name)
    spec = _table(
        spec,
        key,
        f"a table [search.{name}] with type = {' or '.join(_show(kind) for kind in kinds)}",
    )
    if "type" not in spec:
        raise StudyConfigError(None, f"{key}.type", "missing (required)", allowed=_quoted(kinds))
    kind = spec["type"]
    if kind not in KINDS:
        detail = f"unknown type{_did_you_mean(kind, KINDS)}" if isinstance(kind, str) else ""
        raise StudyConfigError(
            None,
            f"{key}.type",
            detail or f"{_type_name(kind)}, not a string",
            value=kind,
            allowed=_quoted(kinds),
        )
    allowed = _PARAM_KEYS[kind]
    required = ("choices",) if kind == "categorical" else ("low", "high")
    _check_keys(spec, f"{key}.", allowed, required)
    if kind == "categorical":
        choices = spec["choices"]
        return SearchParam(
            name, kind, choices=tuple(choices) if isinstance(choices, list) else choices
        )
    return SearchParam(
        name,
        kind,
        low=spec["low"],
        high=spec["high"],
        log=spec.get("log", False),
        step=spec.get("step"),
    )


# --- command-line overrides and data-dependent checks ------------------------------------------


def with_overrides(
    config: StudyConfig,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    epochs: int | None = None,
    name: str | None = None,
) -> StudyConfig:
    """``config`` with command-line overrides (None keeps the file's value), validated like the
    file's values; a mistake raises StudyConfigError naming the key and noting the command line.
    """
    changes: dict[str, Any] = {}
    try:
        with _in_file(config.path):
            for key, value in (("n_trials", n_trials), ("timeout", timeout), ("name", name)):
                if value is not None:
                    changes[key] = _STUDY_RULES[key].check(value, f"study.{key}")
            if epochs is not None:
                epochs = _FIELD_RULES["epochs"].check(epochs, "fixed.epochs")
                changes["fixed"] = {**config.fixed, "epochs": epochs}
    except StudyConfigError as error:
        raise error.amended(_OVERRIDE) from None
    return replace(config, **changes)


def check_batch_size(config: StudyConfig, n_train_rows: int) -> None:
    """Checks that every batch size the study can use fits in ``n_train_rows`` training rows.

    Raises:
        StudyConfigError: the fixed batch_size, the range's high or a choice is larger.
        ValueError: ``n_train_rows`` is not an integer >= 1.
    """
    if isinstance(n_train_rows, bool) or not isinstance(n_train_rows, int) or n_train_rows < 1:
        raise ValueError(f"n_train_rows={n_train_rows!r} is not allowed; give an integer >= 1")
    allowed = f"at most the {n_train_rows} training rows"
    if "batch_size" in config.fixed:
        value = config.fixed["batch_size"]
        if value > n_train_rows:
            raise StudyConfigError(
                config.path,
                "fixed.batch_size",
                f"larger than the {n_train_rows} training rows",
                value=value,
                allowed=allowed,
            )
        return
    param = next(param for param in config.search if param.name == "batch_size")
    if param.kind == "categorical":
        too_big = [value for value in param.choices if value > n_train_rows]
        if too_big:
            raise StudyConfigError(
                config.path,
                f"{param.key}.choices",
                f"{_show(too_big)} larger than the {n_train_rows} training rows",
                value=list(param.choices),
                allowed=allowed,
            )
    elif param.high > n_train_rows:
        raise StudyConfigError(
            config.path,
            f"{param.key}.high",
            f"larger than the {n_train_rows} training rows",
            value=param.high,
            allowed=allowed,
        )
