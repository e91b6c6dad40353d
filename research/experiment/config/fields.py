"""The field table: every quantity a training run is defined by, declared once.

:class:`TrainConfig` *is* the table. Each field is one line: its name and type (the annotation;
a ``Literal`` type lists the allowed names), its default, help text, group, range (``ge``,
``gt``, ``le``, ``lt``; floats are also finite), whether a study may search it, and any extra
command-line spellings. Everything else derives from it:

- ``TrainConfig(...)`` checks every value (pydantic, strict types) and then the combinations;
- the ``train`` flags and their choices, and ``gradcheck``'s model flags
  (:func:`.flags.add_field_flags`, for :mod:`research.cli`);
- the study files' ``[fixed]`` and ``[search]`` validation (:mod:`.study_config`);
- the Optuna parameter names and the MLflow params, which are the field names;
- ``rerun`` and the report, which read logged params back with :meth:`Field.parse`.

Adding a field is this one declaration plus the code that uses it (docs/development.md walks
through an example). Mistakes are :class:`ConfigError`: one line naming the key, the bad value and
what is allowed.

The network's hidden layers can be given two ways: ``hidden_sizes`` (one width per layer) or the
shorthand ``hidden_size`` × ``n_hidden_layers``. ``hidden_sizes = []`` (the default) means the
shorthand. A non-empty ``hidden_sizes`` defines the network, and the shorthand's two fields then
follow from it (``n_hidden_layers`` = its length, ``hidden_size`` = its widest layer), so that the
logged params always agree; a value of theirs that disagrees is a ConfigError, unless it is the
field's default (:class:`TrainConfig`) or comes from an earlier layer of values (a preset under
command-line flags: :func:`configure`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from research.data import DATASETS, DEFAULT_DATASET, N_CLASSES, N_PIXELS, N_TRAIN, N_VALIDATION
from research.engine.mlp import Activation, InitScheme, Loss, MLPSpec, Output
from research.engine.optim import OptimizerName, ScheduleName

# The one-line errors and their wording live in config_text; the field table's users take
# them from here too.
from research.experiment.config.config_text import NO_VALUE as NO_VALUE
from research.experiment.config.config_text import ConfigError as ConfigError
from research.experiment.config.config_text import did_you_mean as did_you_mean
from research.experiment.config.config_text import quoted as quoted
from research.experiment.config.config_text import show as show
from research.experiment.config.config_text import toml_key as toml_key
from research.experiment.config.config_text import type_name as type_name

#: The datasets' names, from their descriptions (research/data/datasets.py).
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]

MAX_HIDDEN_SIZE = 65_536
MAX_HIDDEN_LAYERS = 32
#: The most rows a batch can have: all of train+validation (a study's final fit).
MAX_BATCH_SIZE = N_TRAIN + N_VALIDATION
#: A sanity bound (the origin trained 200 epochs; an epoch takes seconds at least).
MAX_EPOCHS = 100_000

# --- one line per field: the declaration -------------------------------------------------------


def knob(
    default: Any,
    help: str,
    group: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    not_searchable: str = "",
    flags: tuple[str, ...] = (),
    max_items: int | None = None,
    column: bool = False,
) -> Any:
    """Declares one field of :class:`TrainConfig` (a dataclass field carrying its description).

    Args:
        default: its value when nothing else sets it.
        help: what it is, for ``--help`` and the docs.
        group: ``model``, ``optimizer``, ``training`` or ``data``: how flags are grouped;
            ``gradcheck`` takes the ``model`` ones.
        ge, gt, le, lt: bounds of a number (floats must also be finite); of each item of a list.
        not_searchable: why a study may not search it ("" if it may).
        flags: extra command-line spellings beside ``--<name-with-dashes>``.
        max_items: the most items of a list field (annotated ``tuple[int, ...]``).
        column: a column of the ``train`` runs' table in the MLflow UI (``ui``'s saved view): the
            few fields that tell such runs apart at a glance.
    """
    description = {
        "help": help,
        "group": group,
        "bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt},
        "not_searchable": not_searchable,
        "flags": flags,
        "max_items": max_items,
        "column": column,
    }
    return dataclasses.field(default=default, metadata={"knob": description})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run: the field table.

    Field names are the project's names for these quantities everywhere: command-line flags,
    study TOML keys, Optuna parameters and MLflow params. Construction checks every value and
    raises :class:`ConfigError` (a ValueError) for a bad one, or ValueError for a combination
    the network does not allow (cross-entropy without softmax, say). A non-empty
    ``hidden_sizes`` sets ``hidden_size`` (its widest layer) and ``n_hidden_layers`` (its
    length); either given at another value than that or its default is a ConfigError.
    """

    hidden_size: int = knob(
        256, "units in each hidden layer (with hidden_sizes: its widest layer)", "model",
        ge=1, le=MAX_HIDDEN_SIZE, flags=("--hidden",), column=True,
    )  # fmt: skip
    n_hidden_layers: int = knob(
        1,
        "hidden layers (with hidden_sizes: its length)",
        "model",
        ge=1,
        le=MAX_HIDDEN_LAYERS,
        column=True,
    )
    hidden_sizes: tuple[int, ...] = knob(
        (), "the width of each hidden layer, in order ([]: n_hidden_layers of hidden_size)",
        "model", ge=1, le=MAX_HIDDEN_SIZE, max_items=MAX_HIDDEN_LAYERS,
    )  # fmt: skip
    activation: Activation = knob("relu", "nonlinearity of the hidden layers", "model", column=True)
    output: Output = knob("softmax", "nonlinearity of the output layer", "model")
    loss: Loss = knob("cross_entropy", "mse, cross_entropy (needs softmax), bce (sigmoid)", "model")
    l2: float = knob(0.0, "weight decay: adds (l2/2)·Σ‖W‖² to the loss", "model", ge=0)
    input_dropout: float = knob(
        0.0, "fraction of input pixels dropped at each training step (none at evaluation)", "model",
        ge=0, lt=1,
    )  # fmt: skip
    dropout: float = knob(
        0.0, "fraction of each hidden layer's units dropped at each training step", "model",
        ge=0, lt=1,
    )  # fmt: skip
    max_norm: float = knob(
        0.0, "after each update, cap the norm of every hidden unit's incoming weights (0: off)",
        "optimizer", ge=0,
    )  # fmt: skip
    init: InitScheme = knob("he", "initial weights: the origin's normal, xavier or he", "model")
    optimizer: OptimizerName = knob("momentum", "the update rule", "optimizer", column=True)
    learning_rate: float = knob(0.1, "step size", "optimizer", gt=0, flags=("--lr",), column=True)
    momentum: float = knob(
        0.9, "momentum coefficient (momentum optimizer)", "optimizer", ge=0, lt=1
    )
    nesterov: bool = knob(True, "Nesterov momentum (momentum optimizer)", "optimizer")
    final_momentum: float = knob(
        0.99, "momentum reached at the end of the ramp (momentum_epochs)", "optimizer",
        ge=0, lt=1,
    )  # fmt: skip
    momentum_epochs: int = knob(
        0, "ramp momentum linearly to final_momentum over this many epochs (0: no ramp)",
        "optimizer", ge=0, le=MAX_EPOCHS,
    )  # fmt: skip
    schedule: ScheduleName = knob(
        "constant", "learning-rate schedule over the steps: constant, step, exponential, cosine",
        "optimizer",
    )  # fmt: skip
    decay_rate: float = knob(
        0.1, "step and exponential schedules: the rate's factor every decay_epochs", "optimizer",
        gt=0, le=1,
    )  # fmt: skip
    decay_epochs: int = knob(
        10, "step and exponential schedules: epochs per decay_rate factor", "optimizer",
        ge=1, le=MAX_EPOCHS,
    )  # fmt: skip
    warmup_epochs: int = knob(
        0, "linear warm-up of the learning rate from 0 over this many epochs", "optimizer",
        ge=0, le=MAX_EPOCHS,
    )  # fmt: skip
    batch_size: int = knob(
        128, "rows per optimizer step", "training", ge=1, le=MAX_BATCH_SIZE, column=True
    )
    epochs: int = knob(
        10,
        "passes over the training rows",
        "training",
        ge=1,
        column=True,
        le=MAX_EPOCHS,
        not_searchable="the training budget is fixed per study (pruners compare trials epoch by "
        "epoch)",
    )
    seed: int = knob(
        0,
        "the training seed (initial weights and shuffling)",
        "training",
        ge=0,
        not_searchable="searching the training seed tunes to noise",
    )
    drop_last: bool = knob(
        False,
        "drop each epoch's last partial batch, as the origin did",
        "training",
        not_searchable="batching of the remainder is fixed per study",
    )
    raw_inputs: bool = knob(
        False,
        "feed raw 0..255 pixels, as the origin did (default: scaled to [0, 1])",
        "data",
        not_searchable="input scaling is fixed per study",
        flags=("--raw",),
    )
    dataset: DatasetName = knob(
        DEFAULT_DATASET,
        "the images and labels to train and evaluate on",
        "data",
        not_searchable="a study compares models on one dataset",
        column=True,
    )
    dtype: Literal["float32", "float64"] = knob(
        "float32",
        "floating-point precision of parameters and data",
        "training",
        not_searchable="numerical precision is a cost setting, not a model choice",
    )

    def __post_init__(self) -> None:
        for name, field in FIELDS.items():
            object.__setattr__(self, name, field.check(getattr(self, name)))
        if self.hidden_sizes:  # it defines the network; the shorthand follows from it
            for name, value in shorthand(self.hidden_sizes).items():
                given = getattr(self, name)
                if given not in (value, FIELDS[name].default):
                    raise widths_conflict(name, given, self.hidden_sizes)
                object.__setattr__(self, name, value)
        self.spec()  # the combinations: MLPSpec checks output against loss

    def spec(self) -> MLPSpec:
        """The network: 784 inputs, the hidden layers (``hidden_sizes``, else ``n_hidden_layers``
        of ``hidden_size``), 10 outputs."""
        widths = self.hidden_sizes or (self.hidden_size,) * self.n_hidden_layers
        sizes = (N_PIXELS, *widths, N_CLASSES)
        return MLPSpec(sizes, self.activation, self.output, self.loss, self.l2)

    def as_params(self) -> dict[str, Any]:
        """Flat name → value mapping (for tables; a list field's value is a tuple)."""
        return dataclasses.asdict(self)

    def as_texts(self) -> dict[str, str]:
        """Flat name → the text of its MLflow param (:meth:`from_params` reads them back)."""
        return {name: FIELDS[name].text(value) for name, value in self.as_params().items()}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(FIELDS)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> tuple[TrainConfig, list[str]]:
        """The config a run logged, from its MLflow params (text); fields the run did not log
        (it predates them) take their defaults. Returns the config and those fields' names.
        The logged values were given together: hidden_sizes and the shorthand must agree."""
        missing = [name for name in FIELDS if name not in params]
        values = {name: FIELDS[name].parse(params[name]) for name in FIELDS if name in params}
        return with_values(cls(), values), missing


#: The shorthand for the hidden layers, which a non-empty ``hidden_sizes`` replaces.
SHORTHAND = ("hidden_size", "n_hidden_layers")
_SHORTHAND_ALONE = "hidden_size and n_hidden_layers without hidden_sizes"


def shorthand(widths: tuple[int, ...]) -> dict[str, int]:
    """The shorthand's values that agree with the hidden layers ``widths``: its widest layer and
    its length."""
    return {"hidden_size": max(widths), "n_hidden_layers": len(widths)}


def widths_conflict(
    name: str,
    value: Any,
    widths: tuple[int, ...],
    key: str | None = None,
    widths_key: str = "hidden_sizes",
) -> ConfigError:
    """The one-line error for a shorthand field ``name`` whose ``value`` disagrees with the
    hidden layers ``widths`` (named ``key`` and ``widths_key`` in the message)."""
    agrees = shorthand(widths)[name]
    what = f"{agrees} layers" if name == "n_hidden_layers" else f"its widest layer is {agrees}"
    return ConfigError(
        key or name,
        f"conflicts with {widths_key} = {show(list(widths))} ({what}), which defines the network",
        value=value,
        allowed=f"hidden_sizes alone (it sets {name}), or {_SHORTHAND_ALONE}",
    )


def with_values(base: TrainConfig, given: Mapping[str, Any]) -> TrainConfig:
    """``base`` with ``given`` in place of its values, the network from one spelling (see
    :func:`~.presets.configure`, which also warns; this does not, for values read back from a
    logged run)."""
    values = dataclasses.asdict(base) | dict(given)
    if "hidden_sizes" in given:
        widths = FIELDS["hidden_sizes"].check(given["hidden_sizes"])
        for name, value in (shorthand(widths) if widths else {}).items():
            if name in given and FIELDS[name].check(given[name]) != value:
                raise widths_conflict(name, given[name], widths)
            values[name] = value
    elif any(name in given for name in SHORTHAND):
        values["hidden_sizes"] = ()
    return TrainConfig(**values)


# --- what derives from a declaration -----------------------------------------------------------


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
            return tuple(checked) if self.kind is tuple else checked
        except pydantic.ValidationError as error:
            value = _plain(value)  # shown as the Python value it is
            problem = self._problem(error.errors()[0], value)
        raise ConfigError(key or self.name, problem, value=value, allowed=self.allowed, path=path)

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
            return self._adapter.validate_python(text, strict=False)
        except pydantic.ValidationError as error:
            problem = self._problem(error.errors()[0], text)
        raise ConfigError(self.name, problem, value=text, allowed=self.allowed)


def _fields_of(cls: type) -> dict[str, Field]:
    hints = typing.get_type_hints(cls)
    table = {}
    for declared in dataclasses.fields(cls):
        description = declared.metadata["knob"]
        annotation = hints[declared.name]
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        kind = typing.get_origin(annotation) or annotation  # tuple[int, ...]: a list field
        table[declared.name] = Field(
            name=declared.name,
            kind=type(choices[0]) if choices else kind,
            default=declared.default,
            help=description["help"],
            group=description["group"],
            choices=choices,
            not_searchable=description["not_searchable"],
            flags=description["flags"],
            max_items=description["max_items"],
            column=description["column"],
            **description["bounds"],
        )
    return table


#: The training fields, by name, in declaration order.
FIELDS: dict[str, Field] = _fields_of(TrainConfig)
