"""What a study may search: one searched training field and its Optuna distribution.

A :class:`SearchParam` is one ``[search.<field>]`` table of a study file, validated against the
field table (:mod:`.fields`): only fields it marks searchable, range ends and
choices checked as the field's values are, and the rules Optuna itself has for ranges, so that
Optuna neither raises nor warns later. Its :meth:`SearchParam.as_dict` is how a study records its
search space as data.

A list field (``hidden_sizes``) is searched as a categorical of lists. Optuna's choices must be
None, bool, int, float or str, so Optuna is given each list as its text (``"[512, 512]"``, the
MLflow param's text too), under the field's name: :meth:`SearchParam.optuna_choices` and, back,
:meth:`SearchParam.value`.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from typing import Any, Literal

from research.experiment.config.fields import (
    FIELDS,
    ConfigError,
    Field,
    did_you_mean,
    quoted,
    show,
    toml_key,
    type_name,
)

#: The training fields a study may search: those the field table does not mark otherwise.
SEARCHABLE: tuple[str, ...] = tuple(name for name, field in FIELDS.items() if field.searchable)

Kind = Literal["int", "float", "categorical"]
KINDS: tuple[str, ...] = ("int", "float", "categorical")

#: The keys of a ``[search.<field>]`` table, by its type.
PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "int": ("type", "low", "high", "log", "step"),
    "float": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
_LOG = Field("log", bool, False)
_STEP = {
    "int": Field("step", int, None, ge=1),
    "float": Field("step", float, None, gt=0),
}


def kinds_for(name: str) -> tuple[str, ...]:
    """The search types a field allows: its own numeric type, or categorical."""
    numeric = {int: "int", float: "float"}.get(FIELDS[name].kind)
    return (numeric, "categorical") if numeric else ("categorical",)


def check_searchable(name: str, key: str) -> None:
    """ConfigError (naming ``key``) unless ``name`` is a field a study may search."""
    if name not in FIELDS:
        raise ConfigError(
            key,
            f"unknown key{did_you_mean(name, SEARCHABLE)}",
            allowed=", ".join(SEARCHABLE),
        )
    if not FIELDS[name].searchable:
        raise ConfigError(
            key,
            f"{name} cannot be searched: {FIELDS[name].not_searchable}; set it in [fixed]",
            allowed=", ".join(SEARCHABLE),
        )


# --- the dataclasses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One searched training field and its Optuna distribution.

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
            raise ConfigError("search", "a field name must be a string", value=self.name)
        check_searchable(self.name, f"search.{toml_key(self.name)}")
        key, field = self.key, FIELDS[self.name]
        kinds = kinds_for(self.name)
        if self.kind not in kinds:
            raise ConfigError(
                f"{key}.type",
                f"not a search type for {self.name} ({field.allowed})",
                value=self.kind,
                allowed=quoted(kinds),
            )
        if self.kind == "categorical":
            self._check_choices(key, field)
        else:
            self._check_range(key, field)

    def _check_choices(self, key: str, field: Field) -> None:
        for attribute, unset in (("low", None), ("high", None), ("step", None), ("log", False)):
            value = getattr(self, attribute)
            if value is not unset:
                raise ConfigError(
                    f"{key}.{attribute}",
                    'not used with type = "categorical"',
                    value=value,
                    allowed="type, choices",
                )
        each = field.allowed_items if field.kind is tuple else field.allowed  # [] is no choice
        if not isinstance(self.choices, list | tuple):
            raise ConfigError(
                f"{key}.choices",
                f"{type_name(self.choices)}, not an array",
                value=self.choices,
                allowed=f"a non-empty array of values, each {each}",
            )
        try:
            choices = tuple(
                field.check(value, f"{key}.choices[{i}]") for i, value in enumerate(self.choices)
            )
        except ConfigError as error:  # a validator's own allowed (layers' tokens) stays
            specific = error.allowed != field.allowed
            raise error.but(allowed=error.allowed if specific else each) from None
        if () in choices:  # a list field's default, which is no choice of a width
            raise ConfigError(
                f"{key}.choices[{choices.index(())}]",
                "an empty list (the default) is not a choice",
                value=[],
                allowed=field.allowed_items,
            )
        if len(choices) < 2:
            raise ConfigError(
                f"{key}.choices",
                "empty" if not choices else "a single choice is not a search; put it in [fixed]",
                value=list(self.choices),
                allowed=f"at least two distinct values, each {each}",
            )
        for i, value in enumerate(choices):
            if value in choices[:i]:
                raise ConfigError(
                    f"{key}.choices",
                    f"{show(value)} appears more than once",
                    value=list(self.choices),
                    allowed="distinct values",
                )
        object.__setattr__(self, "choices", choices)

    def _check_range(self, key: str, field: Field) -> None:
        if self.choices != ():
            raise ConfigError(
                f"{key}.choices",
                f'not used with type = "{self.kind}"',
                value=self.choices,
                allowed=", ".join(PARAM_KEYS[self.kind]),
            )
        bounds = {}
        for attribute in ("low", "high"):
            value = getattr(self, attribute)
            if value is None:
                raise ConfigError(f"{key}.{attribute}", "missing", allowed=field.allowed)
            bounds[attribute] = field.check(value, f"{key}.{attribute}")
        low, high = bounds["low"], bounds["high"]
        log = _LOG.check(self.log, f"{key}.log")
        if low >= high:
            raise ConfigError(
                key,
                f"low = {show(low)}, high = {show(high)}: the range is "
                + ("a single value; put it in [fixed]" if low == high else "inverted"),
                allowed="low < high",
            )
        if log and low <= 0:
            raise ConfigError(
                f"{key}.low", "log = true needs low > 0", value=low, allowed="low > 0"
            )
        step = self.step
        if step is not None:
            step = self._check_step(key, step, low, high, log)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "step", step)

    def _check_step(self, key: str, step: Any, low: Any, high: Any, log: bool) -> int | float:
        step = _STEP[self.kind].check(step, f"{key}.step")
        if log and (self.kind == "float" or step != 1):
            raise ConfigError(
                f"{key}.step",
                "log = true cannot be combined with a step",
                value=step,
                allowed="no step with log = true"
                if self.kind == "float"
                else "step = 1 (or leave it out) with log = true",
            )
        if self.kind == "int":
            divides = (high - low) % step == 0
        else:
            with decimal.localcontext() as context:
                context.prec = 50
                span = decimal.Decimal(str(high)) - decimal.Decimal(str(low))
                try:
                    divides = span % decimal.Decimal(str(step)) == 0
                except decimal.InvalidOperation:  # more than 10**50 steps
                    divides = False
        if not divides:
            raise ConfigError(
                f"{key}.step",
                f"does not divide high - low = {show(high)} - {show(low)}",
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

    def optuna_choices(self) -> list[Any]:
        """The choices as Optuna takes them: a list field's as their text, ``"[512, 512]"``."""
        field = FIELDS[self.name]
        return [field.text(choice) if field.kind is tuple else choice for choice in self.choices]

    def value(self, suggested: Any) -> Any:
        """The field's value from Optuna's suggestion (a list field's text read back)."""
        field = FIELDS[self.name]
        listed = field.kind is tuple and isinstance(suggested, str)
        return field.parse(suggested) if listed else suggested

    def as_dict(self) -> dict[str, Any]:
        """The parameter as data, in the study file's words (``type``, not ``kind``)."""
        if self.kind == "categorical":
            choices = [list(c) if isinstance(c, tuple) else c for c in self.choices]
            return {"name": self.name, "type": self.kind, "choices": choices}
        data = {"name": self.name, "type": self.kind, "low": self.low, "high": self.high}
        return data | {"log": self.log} | ({"step": self.step} if self.step is not None else {})
