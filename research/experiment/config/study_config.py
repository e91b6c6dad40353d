"""Optuna study definitions: TOML files read and validated into frozen dataclasses.

This module is pure configuration: it imports neither Optuna nor MLflow. The study runner maps a
:class:`StudyConfig` to an Optuna study (sampler, pruner, one ``suggest_*`` call per
:class:`SearchParam`) and builds every trial's :class:`~.fields.TrainConfig`
with :meth:`StudyConfig.train_config`. Everything that can be checked without data is checked
when the file is loaded, before any trial starts; a mistake raises :class:`StudyConfigError` with
one message naming the file, the dotted key (``search.learning_rate.low``), the bad value and what
is allowed.

The format (``experiments/mnist_mlp.toml`` is a complete, commented example)::

    [study]
    name = "mnist_mlp"          # Optuna study name and MLflow experiment name      (required)
    objective = "val/accuracy"  # "val/accuracy" (maximized) or "val/loss" (minimized) (required)
    n_trials = 20               # integer >= 1                                       (required)
    timeout = 540               # seconds > 0; no new trial starts after it    (optional: none)
    sampler = "tpe"             # "tpe" or "random"                           (optional: "tpe")
    pruner = "median"           # "median", "hyperband" or "none"          (optional: "median")
    n_warmup_steps = 1          # median pruner: epochs before it may stop a trial (optional: 1)
    n_startup_trials = 4        # median pruner: trials finished before it stops any (optional: 4)
    seed = 0                    # the sampler's seed, 0 .. 2**32 - 1              (optional: 0)
    preset = "default"          # the preset the [fixed] values start from ("origin", "default")
                                #                                        (optional: "default")

    [fixed]                     # training fields, the same in every trial (optional table)
    epochs = 8
    seed = 0                    # the *training* seed (init and shuffling), not the sampler's

    [search.hidden_size]        # one table per searched training field (at least one)
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

Every key under ``[fixed]`` and ``[search]`` is a training field of the field table
(:mod:`research.experiment.config.fields`), as are the Optuna parameter names and MLflow params. The
values of a trial are: the preset, then ``[fixed]``, then the searched values (a field is either
fixed or searched, never both).

Rules (each one a :class:`StudyConfigError` when broken):

- Unknown keys anywhere are rejected, with the closest known key suggested (``n_trails`` → did you
  mean ``n_trials``?); ``[study]`` needs ``name``, ``objective`` and ``n_trials``; ``[search]``
  needs at least one table.
- Values are what the field table allows, with strict types: integers for integer fields
  (``hidden_size = 64.0`` and ``n_trials = "20"`` are errors, and a boolean is never a number);
  integers are accepted for float fields (``l2 = 0``) and become floats; floats are finite. Range
  ends and categorical choices are checked the same way as fixed values.
- Only the fields the table marks searchable may be searched. Integer fields take
  ``type = "int"`` or ``"categorical"``, float fields ``"float"`` or ``"categorical"``, names,
  booleans, texts (``layers``) and lists (``hidden_sizes``) ``"categorical"`` (a list's choices
  are lists: ``choices = [[512, 512], [1024, 1024, 1024]]``, none of them empty; ``layers``'
  choices are architectures: ``choices = ["dense(100)", "conv(8,5) maxpool(2) dense(64)"]``).
- The network is spelled one way (:mod:`.study_network`): ``layers`` (fixed non-empty, or
  searched) defines all of it, and the MLP's fields may then be neither searched nor fixed;
  else ``hidden_sizes`` (searched, or fixed non-empty) defines the hidden layers, and
  ``hidden_size`` and ``n_hidden_layers`` follow from it in every trial (its widest layer, its
  length): they may not be searched, and a value ``[fixed]`` gives them must agree with every
  list. Either way the preset's values of the fields that follow are dropped.
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

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.experiment.config.config_text import check_keys, load_toml, table_of
from research.experiment.config.fields import (
    FIELDS,
    MAX_EPOCHS,
    ConfigError,
    Field,
    TrainConfig,
    did_you_mean,
    quoted,
    show,
    toml_key,
    type_name,
)
from research.experiment.config.presets import PRESETS, preset_name
from research.experiment.config.search_space import (
    KINDS,
    PARAM_KEYS,
    SEARCHABLE,
    SearchParam,
    check_searchable,
    kinds_for,
)
from research.experiment.config.study_network import derived_fields, network_fields

#: objective metric -> Optuna direction
OBJECTIVES: dict[str, str] = {"val/accuracy": "maximize", "val/loss": "minimize"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
#: Above this many corner combinations, combinations are checked pairwise (every value of every
#: pair of searched fields); TrainConfig's constraints involve at most two fields.
MAX_COMBINATIONS = 4096
#: A sanity bound on a study's budget (Optuna's samplers slow down long before it).
MAX_TRIALS = 100_000
#: A study name: one plain path component (no "/", not "." or "..", not hidden).
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}"
NAME_ALLOWED = (
    "a name of letters, digits, '_', '-' and '.' that starts with a letter, digit or '_' (at "
    "most 100 characters)"
)


#: A mistake in a study definition (the same one-line error as the field table's).
StudyConfigError = ConfigError

#: The ``[study]`` table, declared like the training fields.
STUDY_FIELDS: dict[str, Field] = {
    field.name: field
    for field in (
        # Names become MLflow experiment names, tag values in search filters and folder names
        # (reports/<name>): keep them plain, and never "." or ".." or hidden.
        Field(
            "name",
            str,
            None,
            "the Optuna study's and MLflow experiment's name",
            pattern=NAME_PATTERN,
            allowed_text=NAME_ALLOWED,
        ),
        Field(
            "objective",
            str,
            None,
            "the validation metric trials are judged by",
            choices=tuple(OBJECTIVES),
            allowed_text=" or ".join(f"{show(k)} ({v})" for k, v in OBJECTIVES.items()),
        ),
        Field("n_trials", int, None, "trials the study holds in the end", ge=1, le=MAX_TRIALS),
        Field(
            "timeout",
            float,
            None,
            "no new trial starts after this many seconds",
            gt=0,
            allowed_text="a number of seconds > 0 (leave it out for none)",
        ),
        Field("sampler", str, "tpe", "Optuna's sampler", choices=SAMPLERS),
        Field("pruner", str, "median", "Optuna's pruner", choices=PRUNERS),
        # The median pruner's two patiences: a cosine or warm-up schedule makes early epochs
        # say little of the last (the MLP study pruned 87 of 92 trials after 2-3 epochs).
        Field(
            "n_warmup_steps",
            int,
            1,
            "epochs a trial trains before the median pruner may "
            "stop it (it judges from epoch n_warmup_steps + 1)",
            ge=0,
            le=MAX_EPOCHS,
        ),
        Field(
            "n_startup_trials",
            int,
            4,
            "trials that finish before the median pruner stops any",
            ge=0,
            le=MAX_TRIALS,
        ),
        Field(
            "seed",
            int,
            0,
            "the sampler's seed",
            ge=0,
            le=2**32 - 1,
            allowed_text="an integer from 0 to 2**32 - 1",
        ),
        Field("preset", str, "default", "the preset [fixed] starts from", choices=tuple(PRESETS)),
    )
}
_REQUIRED = ("name", "objective", "n_trials")


_OVERRIDE = " (given on the command line)"


class FrozenMapping(Mapping[str, Any]):
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
        n_warmup_steps, n_startup_trials: the median pruner's patience (epochs, trials).
        seed: the sampler's seed (the training seed is ``fixed["seed"]``).
        preset: the preset the fixed values started from.
        fixed: every training field that is not searched → its value (preset, then [fixed]);
            when a searched ``hidden_sizes`` sets them, not ``hidden_size`` or
            ``n_hidden_layers`` (unless [fixed] gives them); when ``layers`` defines the
            network, none of the MLP's fields.
        search: the searched fields, in file order.
        from_preset: the fixed fields whose value the file left to the preset (for messages).

    Construction is where everything is validated, once (so every instance, including those made
    by :func:`with_overrides` or ``dataclasses.replace``, is a valid study); it raises
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
    from_preset: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)
    n_warmup_steps: int = 1
    n_startup_trials: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        try:
            self._validate()
        except ConfigError as error:
            raise error.but(path=self.path) from None

    def _validate(self) -> None:
        object.__setattr__(self, "preset", preset_name(self.preset))
        for name, field in STUDY_FIELDS.items():
            value = getattr(self, name)
            if not (name == "timeout" and value is None):
                object.__setattr__(self, name, field.check(value, f"study.{name}"))
        search = tuple(self.search)
        if any(not isinstance(param, SearchParam) for param in search):
            raise ConfigError("search", "not a SearchParam", allowed="SearchParam")
        names = [param.name for param in search]
        if not names:
            raise ConfigError(
                "search",
                "nothing is searched",
                allowed=f"at least one [search.<field>] table, <field> one of "
                f"{', '.join(SEARCHABLE)}",
            )
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"search.{name}", "searched twice", allowed="each field once")
        fixed = dict(self.fixed)
        for name, value in fixed.items():
            if name in names:
                raise ConfigError(
                    f"search.{name}",
                    f"both fixed and searched (fixed.{name} = {show(value)})",
                    allowed="each field either in [fixed] or in [search], not both",
                )
            if name not in FIELDS:
                raise ConfigError(
                    f"fixed.{toml_key(name)}",
                    f"unknown key{did_you_mean(name, FIELDS)}",
                    allowed=", ".join(FIELDS),
                )
        derived = derived_fields(fixed, search)  # set by each trial's network
        missing = [n for n in FIELDS if n not in fixed and n not in names and n not in derived]
        if missing:
            raise ConfigError(
                "fixed",
                f"missing {', '.join(missing)}",
                allowed="a value for every training field that is not searched",
            )
        fixed = {name: FIELDS[name].check(fixed[name], f"fixed.{name}") for name in fixed}
        fixed = network_fields(fixed, search, self.from_preset)
        object.__setattr__(self, "search", search)
        object.__setattr__(self, "fixed", FrozenMapping(fixed))
        self._check_combinations()

    @property
    def direction(self) -> str:
        """``"maximize"`` for val/accuracy, ``"minimize"`` for val/loss."""
        return OBJECTIVES[self.objective]

    @property
    def search_names(self) -> tuple[str, ...]:
        """The searched training fields (the Optuna parameter names), in file order."""
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
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"not searched: {', '.join(map(str, extra))}"] if extra else []
            raise ValueError(
                f"suggested values must name exactly the searched fields "
                f"({', '.join(self.search_names)}); " + "; ".join(problems)
            )
        values = {param.name: param.value(suggested[param.name]) for param in self.search}
        return TrainConfig(**{**self.fixed, **values})

    # --- checks across fields ------------------------------------------------------------------

    def _combinations(self) -> Iterator[dict[str, Any]]:
        """Corner combinations of the searched values: all of them when there are at most
        MAX_COMBINATIONS, else every pair of values of every pair of fields (others at their
        first)."""
        corners = [param.corners() for param in self.search]
        names = self.search_names
        if math.prod(len(values) for values in corners) <= MAX_COMBINATIONS:
            for values in itertools.product(*corners):
                yield dict(zip(names, values))
            return
        base = {name: values[0] for name, values in zip(names, corners)}
        yield base
        for i, j in itertools.combinations(range(len(names)), 2):
            for a, b in itertools.product(corners[i], corners[j]):
                yield {**base, names[i]: a, names[j]: b}

    def _check_combinations(self) -> None:
        """Builds a TrainConfig for the fixed values with each corner combination of the
        search; a searched momentum or nesterov must be able to matter."""
        optimizer = next((param for param in self.search if param.name == "optimizer"), None)
        if optimizer is None:
            possible = (self.fixed["optimizer"],)
            where = f"fixed.optimizer = {show(self.fixed['optimizer'])}"
        else:
            possible = optimizer.choices
            where = f"search.optimizer.choices = {show(list(possible))}"
        for name in ("momentum", "nesterov"):
            if name in self.search_names and "momentum" not in possible:
                raise ConfigError(
                    f"search.{name}",
                    f'searching it has no effect: {name} applies to optimizer = "momentum" '
                    f"only, and {where}",
                    allowed=f'search {name} only when the optimizer can be "momentum"',
                )
        for combination in self._combinations():
            try:
                TrainConfig(**{**self.fixed, **combination})
            except ValueError as error:
                raise self._combination_error(str(error), combination) from None

    def _combination_error(self, message: str, combination: Mapping[str, Any]) -> ConfigError:
        """Names the fields an invalid combination's message mentions, and where each came
        from (a searched value, [fixed], or the preset)."""
        mentioned = [name for name in FIELDS if re.search(rf"\b{name}\b", message)] or list(
            combination
        )
        from_preset = self.from_preset
        parts = []
        for name in mentioned:
            if name in combination:
                parts.append(f"search.{name} = {show(combination[name])}")
            elif name in from_preset:
                parts.append(f"{name} = {show(self.fixed[name])} (from preset {show(self.preset)})")
            else:
                parts.append(f"fixed.{name} = {show(self.fixed[name])}")
        # the key: a searched field, else one set in [fixed], else one from the preset
        culprit = min(mentioned, key=lambda name: (name not in combination, name in from_preset))
        return ConfigError(
            f"{'search' if culprit in combination else 'fixed'}.{culprit}",
            f"invalid combination {', '.join(parts)}: {message}",
            allowed="values TrainConfig accepts together: change [fixed] or drop the search values",
        )


# --- loading -----------------------------------------------------------------------------------


def load_study_config(path: str | Path) -> StudyConfig:
    """Reads and validates a study file (TOML).

    Raises:
        StudyConfigError: the file cannot be read, is not TOML, or breaks a rule of the format
            (see the module docstring); the message names the file, key, value and what is
            allowed.
    """
    return load_toml(Path(path), "study file", _parse)


def _parse(path: Path, raw: dict[str, Any]) -> StudyConfig:
    """The study file's tables as StudyConfig's arguments (which it then validates): only the
    shape of the file is checked here (tables, known and required keys)."""
    check_keys(raw, "", ("study", "fixed", "search"), required=("study", "search"))
    study = table_of(raw["study"], "study", "a [study] table")
    check_keys(study, "study.", tuple(STUDY_FIELDS), required=_REQUIRED)
    settings = {name: field.default for name, field in STUDY_FIELDS.items()} | study
    # The preset's name first: its values fill what [fixed] leaves out.
    settings["preset"] = STUDY_FIELDS["preset"].check(
        preset_name(settings["preset"]), "study.preset"
    )
    fixed = table_of(raw.get("fixed", {}), "fixed", "a [fixed] table of training fields")
    check_keys(fixed, "fixed.", tuple(FIELDS))
    search = []
    for name, spec in table_of(raw["search"], "search", "[search.<field>] tables").items():
        check_searchable(name, f"search.{toml_key(name)}")
        search.append(_parse_param(name, spec))
    searched = {param.name for param in search}
    preset = {k: v for k, v in PRESETS[settings["preset"]].as_params().items() if k not in searched}
    return StudyConfig(
        path=path,
        fixed=preset | fixed,
        search=tuple(search),
        from_preset=frozenset(preset) - set(fixed),
        **settings,
    )


def _parse_param(name: str, spec: Any) -> SearchParam:
    key = f"search.{name}"
    kinds = kinds_for(name)
    spec = table_of(
        spec,
        key,
        f"a table [search.{name}] with type = {' or '.join(show(kind) for kind in kinds)}",
    )
    if "type" not in spec:
        raise ConfigError(f"{key}.type", "missing (required)", allowed=quoted(kinds))
    kind = spec["type"]
    if kind not in KINDS:
        detail = f"unknown type{did_you_mean(kind, KINDS)}" if isinstance(kind, str) else ""
        raise ConfigError(
            f"{key}.type",
            detail or f"{type_name(kind)}, not a string",
            value=kind,
            allowed=quoted(kinds),
        )
    required = ("choices",) if kind == "categorical" else ("low", "high")
    check_keys(spec, f"{key}.", PARAM_KEYS[kind], required)
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
        for key, value in (("n_trials", n_trials), ("timeout", timeout), ("name", name)):
            if value is not None:
                changes[key] = STUDY_FIELDS[key].check(value, f"study.{key}", config.path)
        if epochs is not None:
            epochs = FIELDS["epochs"].check(epochs, "fixed.epochs", config.path)
            changes["fixed"] = {**config.fixed, "epochs": epochs}
    except ConfigError as error:
        raise error.but(problem=error.problem + _OVERRIDE) from None
    return dataclasses.replace(config, **changes)


def check_batch_size(config: StudyConfig, n_train_rows: int) -> None:
    """Checks that every batch size the study can use fits in ``n_train_rows`` training rows.

    Raises:
        StudyConfigError: the fixed batch_size, the range's high or a choice is larger.
        ValueError: ``n_train_rows`` is not an integer >= 1.
    """
    if isinstance(n_train_rows, bool) or not isinstance(n_train_rows, int) or n_train_rows < 1:
        raise ValueError(f"n_train_rows={n_train_rows!r} is not allowed; give an integer >= 1")
    allowed = f"at most the {n_train_rows} training rows"
    too_big = f"larger than the {n_train_rows} training rows"
    if "batch_size" in config.fixed:
        value = config.fixed["batch_size"]
        if value > n_train_rows:
            raise ConfigError(
                "fixed.batch_size", too_big, value=value, allowed=allowed, path=config.path
            )
        return
    param = next(param for param in config.search if param.name == "batch_size")
    if param.kind == "categorical":
        larger = [value for value in param.choices if value > n_train_rows]
        if larger:
            raise ConfigError(
                f"{param.key}.choices",
                f"{show(larger)} {too_big}",
                value=list(param.choices),
                allowed=allowed,
                path=config.path,
            )
    elif param.high > n_train_rows:
        raise ConfigError(
            f"{param.key}.high", too_big, value=param.high, allowed=allowed, path=config.path
        )
