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

Or the network is written as layers: ``layers = "conv(20,5) maxpool(2) dense(100)"``
(:mod:`.layers_field`; ``""``, the default, means the MLP above). A non-empty ``layers`` defines
the whole network; the MLP's three fields then stay at their defaults, unused (logged as such),
and a value of theirs other than the default beside it is a ConfigError naming both. Given over
an earlier layer of values (:func:`with_values`), ``layers`` resets the MLP's fields and an MLP
field resets ``layers``: the network is always the one spelled last.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from research.data import (
    DATASETS,
    DEFAULT_DATASET,
    N_CLASSES,
    N_PIXELS,
    N_TRAIN,
    N_VALIDATION,
    Augment,
)
from research.engine.mlp import Activation, InitScheme, Loss, MLPSpec, Output
from research.engine.network import Network
from research.engine.optim import OptimizerName, ScheduleName

# The one-line errors and their wording live in config_text, what one field may be in
# field_type, the layers value's rules in layers_field; the field table's users take them from
# here too.
from research.experiment.config.config_text import NO_VALUE as NO_VALUE
from research.experiment.config.config_text import ConfigError as ConfigError
from research.experiment.config.config_text import did_you_mean as did_you_mean
from research.experiment.config.config_text import quoted as quoted
from research.experiment.config.config_text import show as show
from research.experiment.config.config_text import toml_key as toml_key
from research.experiment.config.config_text import type_name as type_name
from research.experiment.config.field_type import Field as Field
from research.experiment.config.layers_field import ALLOWED as LAYERS_ALLOWED
from research.experiment.config.layers_field import HELP as LAYERS_HELP
from research.experiment.config.layers_field import IMAGE_SHAPE as IMAGE_SHAPE
from research.experiment.config.layers_field import MLP_FIELDS as MLP_FIELDS
from research.experiment.config.layers_field import LayersError, layers_network, layers_problem
from research.experiment.config.layers_field import count_params as count_network_params
from research.experiment.config.layers_field import layers_param_count as layers_param_count

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
    allowed: str = "",
    validate: Any = None,
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
        allowed: what is allowed, in words, where the derived wording would not do.
        validate: a check beyond type and range (:attr:`Field.validate`).
    """
    description = {
        "help": help,
        "group": group,
        "bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt},
        "not_searchable": not_searchable,
        "flags": flags,
        "max_items": max_items,
        "column": column,
        "allowed": allowed,
        "validate": validate,
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
    layers: str = knob(
        "", LAYERS_HELP, "model", column=True, allowed=LAYERS_ALLOWED, validate=layers_problem
    )
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
    augment: Augment = knob(
        "none",
        "expand the training rows: shift1 adds each image moved one pixel down, up, right and "
        "left (5x the rows, as the book's expand_mnist.py); validation and test rows never",
        "data",
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
        for name, field in FIELDS.items():  # a layers value is checked as a network here
            object.__setattr__(self, name, field.check(getattr(self, name)))
        if self.layers:  # it defines the network; the MLP's fields stay at their defaults
            for name in MLP_FIELDS:
                if getattr(self, name) != FIELDS[name].default:
                    raise layers_conflict(name, getattr(self, name), self.layers)
            if self.max_norm:  # it caps a dense W's columns: the MLP's hidden units
                raise ConfigError(
                    "max_norm",
                    f"applies to the MLP's hidden units only, not to a network of layers "
                    f"(layers = {self.layers!r})",
                    value=self.max_norm,
                    allowed="max_norm = 0 with layers, or layers = '' (the MLP of hidden_sizes)",
                )
        if self.hidden_sizes:  # it defines the network; the shorthand follows from it
            for name, value in shorthand(self.hidden_sizes).items():
                given = getattr(self, name)
                if given not in (value, FIELDS[name].default):
                    raise widths_conflict(name, given, self.hidden_sizes)
                object.__setattr__(self, name, value)
        self.spec()  # the combinations: MLPSpec checks output against loss

    def network(self) -> Network | None:
        """The network of ``layers`` (its hidden layers, then a dense layer to the 10 classes),
        or None when ``layers`` is empty: the MLP of :meth:`spec`. (A value that cannot be read
        or does not chain never gets here: the field's check refuses it.)"""
        if not self.layers:
            return None
        try:
            return layers_network(
                self.layers,
                output=self.output,
                loss=self.loss,
                l2=self.l2,
                activation=self.activation,
                init=self.init,
                dropout=self.dropout,
                input_dropout=self.input_dropout,
            )
        except LayersError as error:
            raise ConfigError("layers", str(error), value=self.layers) from None

    def n_params(self) -> int:
        """The network's trained values (weights, biases, norm scales), counted without drawing
        them: of :meth:`network`, else of the MLP of :meth:`spec`."""
        network = self.network()
        return self.spec().n_params if network is None else count_network_params(network)

    def describe_network(self) -> str:
        """The network in a few words: ``784x256x10`` for the MLP, else its layers as written
        (``conv(20,5) relu maxpool(2) dense(100) relu dense(10)``)."""
        network = self.network()
        return "x".join(map(str, self.spec().sizes)) if network is None else network.describe()

    def spec(self) -> MLPSpec:
        """The MLP: 784 inputs, the hidden layers (``hidden_sizes``, else ``n_hidden_layers`` of
        ``hidden_size``), 10 outputs. With ``layers`` set, the network is :meth:`network`, and
        this is the MLP of the fields' defaults: only its output, loss and l2 apply."""
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


def layers_conflict(
    name: str, value: Any, layers: str, key: str | None = None, layers_key: str = "layers"
) -> ConfigError:
    """The one-line error for an MLP field ``name`` set to ``value`` beside a non-empty
    ``layers`` (named ``key`` and ``layers_key`` in the message), which defines the network."""
    return ConfigError(
        key or name,
        f"conflicts with {layers_key} = {show(layers)}, which defines the network",
        value=value,
        allowed=f"layers alone ({', '.join(MLP_FIELDS)} stay at their defaults, unused), or "
        f'{name} with layers = "" (the MLP)',
    )


def with_values(base: TrainConfig, given: Mapping[str, Any]) -> TrainConfig:
    """``base`` with ``given`` in place of its values, the network from one spelling (see
    :func:`~.presets.configure`, which also warns; this does not, for values read back from a
    logged run). A non-empty ``layers`` given replaces base's MLP (its fields back to their
    defaults; given beside it at another value, they are a ConfigError); an MLP field given
    without ``layers`` replaces base's layers."""
    values = dataclasses.asdict(base) | dict(given)
    if "layers" in given and FIELDS["layers"].check(given["layers"]):
        for name in MLP_FIELDS:
            if name in given and FIELDS[name].check(given[name]) != FIELDS[name].default:
                raise layers_conflict(name, given[name], given["layers"])
            values[name] = FIELDS[name].default
        return TrainConfig(**values)
    if "layers" not in given and any(name in given for name in MLP_FIELDS):
        values["layers"] = ""
    if "hidden_sizes" in given:
        widths = FIELDS["hidden_sizes"].check(given["hidden_sizes"])
        for name, value in (shorthand(widths) if widths else {}).items():
            if name in given and FIELDS[name].check(given[name]) != value:
                raise widths_conflict(name, given[name], widths)
            values[name] = value
    elif any(name in given for name in SHORTHAND):
        values["hidden_sizes"] = ()
    return TrainConfig(**values)


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
            allowed_text=description["allowed"],
            validate=description["validate"],
            **description["bounds"],
        )
    return table


#: The training fields, by name, in declaration order.
FIELDS: dict[str, Field] = _fields_of(TrainConfig)
