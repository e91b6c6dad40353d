"""Study definition files: the shipped examples load, every kind of mistake is one clear
StudyConfigError (file, key, value, what is allowed), overrides, and a property test that mutated
study files either load or raise StudyConfigError, never anything else."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from research.engine.mlp import ACTIVATIONS, INIT_SCHEMES, LOSSES, OUTPUTS
from research.engine.optim import OPTIMIZERS
from research.experiment.config.fields import FIELDS, TrainConfig
from research.experiment.config.presets import PRESETS, DeprecatedName
from research.experiment.config.search_space import KINDS, SEARCHABLE, SearchParam
from research.experiment.config.study_config import (
    MAX_COMBINATIONS,
    StudyConfig,
    StudyConfigError,
    check_batch_size,
    load_study_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]
MNIST_MLP = REPO / "experiments" / "mnist_mlp.toml"
ORIGIN_BASELINE = REPO / "experiments" / "origin_baseline.toml"
SHIPPED = (MNIST_MLP, ORIGIN_BASELINE, MNIST_MLP.with_name("fashion_mlp.toml"))

Doc = dict[str, Any]


def dumps(doc: Doc) -> str:
    """TOML text for a document (tomli-w)."""
    return tomli_w.dumps(doc)


def parsed(path: Path) -> Doc:
    return tomllib.loads(path.read_text())


def write(directory: Path, doc: Doc | str, name: str = "study.toml") -> Path:
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else dumps(doc))
    return path


def test_the_toml_writer_round_trips_the_shipped_files():
    for path in SHIPPED:
        doc = parsed(path)
        assert tomllib.loads(dumps(doc)) == doc


# --- the shipped files ---------------------------------------------------------------------------


def test_the_default_study_loads():
    config = load_study_config(MNIST_MLP)
    assert config.path == MNIST_MLP
    assert (config.name, config.objective, config.direction) == (
        "mnist_mlp",
        "val/accuracy",
        "maximize",
    )
    assert (config.n_trials, config.sampler, config.pruner, config.seed) == (20, "tpe", "median", 0)
    assert config.timeout is not None and config.timeout < 600
    assert config.search_names == ("hidden_size", "learning_rate", "batch_size", "l2")
    hidden, rate, batch, _ = config.search
    assert (hidden.kind, hidden.low, hidden.high, hidden.log) == ("int", 64, 1024, True)
    assert rate.kind == "float" and rate.log and 0.005 <= rate.low < rate.high <= 0.5
    assert batch.kind == "categorical" and batch.choices == (64, 128, 256)
    assert config.fixed["epochs"] == 8
    assert {k: config.fixed[k] for k in ("activation", "output", "loss", "init", "optimizer")} == {
        "activation": "relu",
        "output": "softmax",
        "loss": "cross_entropy",
        "init": "he",
        "optimizer": "momentum",
    }
    assert config.fixed["nesterov"] is True
    assert set(config.fixed) | set(config.search_names) == set(TrainConfig.field_names())
    check_batch_size(config, 50_000)


def test_the_origin_baseline_starts_from_the_origin():
    config = load_study_config(ORIGIN_BASELINE)
    assert config.preset == "origin"
    assert config.search_names == ("hidden_size", "learning_rate", "batch_size")
    origin = PRESETS["origin"].as_params()
    assert config.fixed["epochs"] == 30 and origin["epochs"] == 200
    assert {k: v for k, v in config.fixed.items() if k != "epochs"} == {
        k: v for k, v in origin.items() if k not in config.search_names and k != "epochs"
    }
    # the origin's own values lie inside the searched ranges
    hidden, rate, batch = config.search
    assert hidden.low <= origin["hidden_size"] <= hidden.high
    assert rate.low <= origin["learning_rate"] <= rate.high
    assert origin["batch_size"] in batch.choices
    assert "200" in ORIGIN_BASELINE.read_text()
    check_batch_size(config, 50_000)


def test_the_old_name_of_the_origin_preset_still_works_with_a_note(tmp_path):
    doc = parsed(ORIGIN_BASELINE)
    doc["study"]["preset"] = "seed"
    with pytest.warns(DeprecatedName, match='"seed" is now called "origin"'):
        config = load_study_config(write(tmp_path, doc))
    assert config.preset == "origin"
    assert replace(config, path=ORIGIN_BASELINE) == load_study_config(ORIGIN_BASELINE)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_files_comment_every_setting(path):
    """Every key = value line of the examples carries a comment (or follows a comment line)."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            commented = "#" in line or lines[number - 1].lstrip().startswith("#")
            in_search = any(lines[i].startswith("[search.") for i in range(number))
            assert commented or in_search, f"{path.name} line {number + 1} has no comment: {line}"


def test_the_format_example_in_the_module_docstring_loads(tmp_path):
    import research.experiment.config.study_config as module

    example = module.__doc__.split("::\n\n", 1)[1].split("\n\nEvery key", 1)[0]
    config = load_study_config(write(tmp_path, textwrap.dedent(example)))
    assert config.search_names == ("hidden_size", "learning_rate", "batch_size")
    assert config.fixed["epochs"] == 8 and config.preset == "default"


def test_the_study_rules_are_the_field_table():
    """What a study may search and which names a field allows come from the table alone."""
    assert set(FIELDS) == set(TrainConfig.field_names())
    assert SEARCHABLE == tuple(name for name, field in FIELDS.items() if not field.not_searchable)
    assert {"epochs", "seed", "dtype", "raw_inputs", "drop_last", "dataset"} == set(FIELDS) - set(
        SEARCHABLE
    )
    assert FIELDS["activation"].choices == ACTIVATIONS
    assert FIELDS["output"].choices == OUTPUTS
    assert FIELDS["loss"].choices == LOSSES
    assert FIELDS["init"].choices == INIT_SCHEMES
    assert FIELDS["optimizer"].choices == OPTIMIZERS
    for field in FIELDS.values():
        assert field.help and field.group in {"model", "optimizer", "training", "data"}, field


# --- one test per kind of mistake ---------------------------------------------------------------


def _set(*path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        table = doc
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value

    return mutate


def _drop(*path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        table = doc
        for key in path[:-1]:
            table = table[key]
        del table[path[-1]]

    return mutate


def _all(*mutations: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        for mutation in mutations:
            mutation(doc)

    return mutate


def _case(
    id: str,
    mutate: Callable[[Doc], None],
    key: str,
    value: str | None,
    allowed: str,
    *also: str,
    base: Path = MNIST_MLP,
) -> Any:
    return pytest.param(base, mutate, key, value, allowed, also, id=id)


MISTAKES = [
    # unknown keys, with the close match suggested
    _case("unknown table", _set("serach", value={}), "serach", None, "study, fixed, search",
          'did you mean "search"'),
    _case("study key typo", _set("study", "n_trails", value=20), "study.n_trails", None,
          "n_trials", 'did you mean "n_trials"'),
    _case("fixed key typo", _set("fixed", "hiden_size", value=64), "fixed.hiden_size", None,
          "hidden_size", 'did you mean "hidden_size"'),
    _case("searched field typo",
          _set("search", "learning_rte", value={"type": "float", "low": 0.1, "high": 1.0}),
          "search.learning_rte", None, "learning_rate", 'did you mean "learning_rate"'),
    _case("range key typo", _set("search", "hidden_size", "lo", value=1), "search.hidden_size.lo",
          None, "type, low, high, log, step", 'did you mean "low"'),
    _case("low on a categorical", _set("search", "batch_size", "low", value=1),
          "search.batch_size.low", None, "type, choices"),
    # missing keys
    _case("missing objective", _drop("study", "objective"), "study.objective", None, "objective",
          "missing"),
    _case("missing search", _drop("search"), "search", None, "study, fixed, search", "missing"),
    _case("missing type", _drop("search", "hidden_size", "type"), "search.hidden_size.type", None,
          '"int", "categorical"', "missing"),
    _case("missing high", _drop("search", "learning_rate", "high"), "search.learning_rate.high",
          None, "type, low, high", "missing"),
    _case("empty search", _set("search", value={}), "search", None, "at least one [search.",
          "nothing is searched"),
    # wrong types
    _case("string for n_trials", _set("study", "n_trials", value="20"), "study.n_trials", '"20"',
          "an integer from 1 to 100000", "a string, not an integer"),
    _case("bool for n_trials", _set("study", "n_trials", value=True), "study.n_trials", "true",
          "an integer from 1 to 100000", "a boolean"),
    # TOML's 1e20 is a float: one line, as for any float
    _case("float for n_trials", _set("study", "n_trials", value=1e20), "study.n_trials", "1e+20",
          "an integer from 1 to 100000", "a float, not an integer"),
    _case("float for hidden_size", _set("search", "hidden_size", "low", value=64.0),
          "search.hidden_size.low", "64.0", "an integer from 1 to", "a float, not an integer"),
    _case("float for a fixed integer", _set("fixed", "n_hidden_layers", value=1.5),
          "fixed.n_hidden_layers", "1.5", "an integer from 1 to"),
    _case("int for a boolean", _set("fixed", "nesterov", value=1), "fixed.nesterov", "1",
          "true or false"),
    _case("string for log", _set("search", "hidden_size", "log", value="yes"),
          "search.hidden_size.log", '"yes"', "true or false"),
    _case("table for a value", _set("study", "seed", value={"value": 1}), "study.seed",
          "{value = 1}", "an integer from 0", "a table, not an integer"),
    _case("choices not an array", _set("search", "batch_size", "choices", value="64, 128"),
          "search.batch_size.choices", '"64, 128"', "a non-empty array"),
    _case("search entry not a table", _set("search", "batch_size", value=[64, 128]),
          "search.batch_size", "[64, 128]", "a table [search.batch_size]"),
    _case("study not a table", _set("study", value=5), "study", "5", "a [study] table"),
    # empty, inverted and degenerate ranges
    _case("inverted range",
          _all(_set("search", "learning_rate", "low", value=0.5),
               _set("search", "learning_rate", "high", value=0.01)),
          "search.learning_rate", "low = 0.5, high = 0.01", "low < high", "inverted"),
    _case("single-value range",
          _all(_set("search", "hidden_size", "low", value=128),
               _set("search", "hidden_size", "high", value=128)),
          "search.hidden_size", "low = 128, high = 128", "low < high", "[fixed]"),
    _case("empty choices", _set("search", "batch_size", "choices", value=[]),
          "search.batch_size.choices", "[]", "at least two distinct values", "empty"),
    _case("single choice", _set("search", "batch_size", "choices", value=[64]),
          "search.batch_size.choices", "[64]", "at least two distinct values", "[fixed]"),
    _case("duplicate choices", _set("search", "batch_size", "choices", value=[64, 128, 64]),
          "search.batch_size.choices", "[64, 128, 64]", "distinct values", "more than once"),
    _case("duplicate after int to float", _set("search", "l2", "choices", value=[0, 0.0, 1e-4]),
          "search.l2.choices", "[0, 0.0, 0.0001]", "distinct values"),
    _case("mixed-type choices", _set("search", "batch_size", "choices", value=[64, "128"]),
          "search.batch_size.choices[1]", '"128"', "an integer from 1 to 60000"),
    # non-positive rates and sizes, log scales
    _case("zero learning rate", _set("search", "learning_rate", "low", value=0),
          "search.learning_rate.low", "0", "a finite number > 0", "out of range"),
    _case("negative learning rate",
          _all(_drop("search", "learning_rate"), _set("fixed", "learning_rate", value=-0.1)),
          "fixed.learning_rate", "-0.1", "a finite number > 0"),
    _case("nan learning rate", _set("search", "learning_rate", "high", value=math.nan),
          "search.learning_rate.high", "nan", "a finite number > 0"),
    _case("zero hidden size", _set("search", "hidden_size", "low", value=0),
          "search.hidden_size.low", "0", "an integer from 1 to 65536"),
    _case("zero batch size", _set("search", "batch_size", "choices", value=[0, 64]),
          "search.batch_size.choices[0]", "0", "an integer from 1 to 60000"),
    _case("zero hidden layers",
          _all(_drop("fixed", "n_hidden_layers"),
               _set("search", "n_hidden_layers", value={"type": "int", "low": 0, "high": 3})),
          "search.n_hidden_layers.low", "0", "an integer from 1 to 32"),
    _case("zero epochs", _set("fixed", "epochs", value=0), "fixed.epochs", "0",
          "an integer from 1 to 100000"),
    # sanity bounds: nothing a machine could finish
    _case("1e12 epochs", _set("fixed", "epochs", value=10**12), "fixed.epochs", "1000000000000",
          "an integer from 1 to 100000", "out of range"),
    _case("1e15 trials", _set("study", "n_trials", value=10**15), "study.n_trials",
          "1000000000000000", "an integer from 1 to 100000", "out of range"),
    _case("batch size beyond the data", _set("search", "batch_size", "choices", value=[64, 10**6]),
          "search.batch_size.choices[1]", "1000000", "an integer from 1 to 60000"),
    _case("log with low = 0",
          _set("search", "l2", value={"type": "float", "low": 0, "high": 1e-3, "log": True}),
          "search.l2.low", "0.0", "low > 0", "log = true needs low > 0"),
    _case("log with a step", _set("search", "learning_rate", "step", value=0.01),
          "search.learning_rate.step", "0.01", "no step with log = true"),
    _case("step that does not divide",
          _set("search", "hidden_size",
               value={"type": "int", "low": 64, "high": 1000, "step": 64}),
          "search.hidden_size.step", "64", "a step that divides high - low"),
    _case("float step that does not divide",
          _set("search", "learning_rate",
               value={"type": "float", "low": 0.1, "high": 0.5, "step": 0.3}),
          "search.learning_rate.step", "0.3", "a step that divides high - low"),
    _case("non-positive study settings", _set("study", "timeout", value=0), "study.timeout", "0",
          "a number of seconds > 0"),
    _case("negative sampler seed", _set("study", "seed", value=-1), "study.seed", "-1",
          "an integer from 0 to 2**32 - 1"),
    _case("empty study name", _set("study", "name", value=""), "study.name", '""',
          "a name of letters, digits"),
    # names become folders (reports/<name>): one plain path component, not "." or ".."
    *[
        _case(f"study name {name}", _set("study", "name", value=name), "study.name",
              f'"{name}"', "starts with a letter, digit or '_'", "not allowed")
        for name in (".", "..", "...", ".hidden", "-flag", "a/b", "../up")
    ],
    # unknown names
    _case("unknown sampler", _set("study", "sampler", value="tpee"), "study.sampler", '"tpee"',
          '"tpe", "random"', 'did you mean "tpe"'),
    _case("unknown pruner", _set("study", "pruner", value="mediam"), "study.pruner", '"mediam"',
          '"median", "hyperband", "none"', 'did you mean "median"'),
    _case("unknown objective", _set("study", "objective", value="val/acc"), "study.objective",
          '"val/acc"', '"val/accuracy" (maximize) or "val/loss" (minimize)'),
    _case("unknown preset", _set("study", "preset", value="orign"), "study.preset", '"orign"',
          '"origin", "default"', 'did you mean "origin"'),
    _case("unknown activation", _set("fixed", "activation", value="rellu"), "fixed.activation",
          '"rellu"', '"sigmoid", "tanh", "relu"', 'did you mean "relu"'),
    _case("unknown loss", _set("fixed", "loss", value="crossentropy"), "fixed.loss",
          '"crossentropy"', '"mse", "cross_entropy", "bce"'),
    _case("unknown output", _set("fixed", "output", value="softmx"), "fixed.output", '"softmx"',
          '"sigmoid", "softmax", "identity"'),
    _case("unknown init", _set("fixed", "init", value="kaiming"), "fixed.init", '"kaiming"',
          '"normal", "xavier", "he"'),
    _case("unknown dtype", _set("fixed", "dtype", value="float16"), "fixed.dtype", '"float16"',
          '"float32", "float64"'),
    _case("unknown optimizer choice",
          _all(_drop("fixed", "optimizer"),
               _set("search", "optimizer",
                    value={"type": "categorical", "choices": ["sgd", "adamw"]})),
          "search.optimizer.choices[1]", '"adamw"', '"sgd", "momentum", "adam"'),
    _case("unknown search type", _set("search", "hidden_size", "type", value="integer"),
          "search.hidden_size.type", '"integer"', '"int", "categorical"', 'did you mean "int"'),
    _case("float search of an integer field", _set("search", "hidden_size", "type", value="float"),
          "search.hidden_size.type", '"float"', '"int", "categorical"'),
    _case("numeric search of a name",
          _all(_drop("fixed", "activation"),
               _set("search", "activation", value={"type": "int", "low": 1, "high": 2})),
          "search.activation.type", '"int"', '"categorical"'),
    # fixed and searched, not searchable
    _case("fixed and searched", _set("fixed", "hidden_size", value=128), "search.hidden_size",
          "fixed.hidden_size = 128", "either in [fixed] or in [search]", "both fixed and searched"),
    _case("searching epochs", _set("search", "epochs", value={"type": "int", "low": 1, "high": 9}),
          "search.epochs", None, "hidden_size, n_hidden_layers", "cannot be searched"),
    _case("searching the seed",
          _set("search", "seed", value={"type": "categorical", "choices": [0, 1]}),
          "search.seed", None, "learning_rate", "cannot be searched"),
    _case("searching dtype",
          _set("search", "dtype", value={"type": "categorical", "choices": ["float32", "float64"]}),
          "search.dtype", None, "learning_rate", "cannot be searched"),
    # invalid combinations
    _case("fixed output against the loss", _set("fixed", "output", value="sigmoid"),
          "fixed.output", 'fixed.output = "sigmoid"', "values TrainConfig accepts together",
          'fixed.loss = "cross_entropy"', "needs output='softmax'"),
    _case("searched output against the loss",
          _all(_drop("fixed", "output"),
               _set("search", "output",
                    value={"type": "categorical", "choices": ["softmax", "sigmoid"]})),
          "search.output", 'search.output = "sigmoid"', "values TrainConfig accepts together",
          'fixed.loss = "cross_entropy"'),
    _case("fixed loss against the preset's output", _set("fixed", "loss", value="cross_entropy"),
          "fixed.loss", 'fixed.loss = "cross_entropy"', "values TrainConfig accepts together",
          'output = "sigmoid" (from preset "origin")', base=ORIGIN_BASELINE),
    _case("searching momentum without the momentum optimizer",
          _all(_set("fixed", "optimizer", value="adam"), _drop("fixed", "momentum"),
               _set("search", "momentum", value={"type": "float", "low": 0.5, "high": 0.99})),
          "search.momentum", 'fixed.optimizer = "adam"', 'when the optimizer can be "momentum"',
          "has no effect"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "mutate", "key", "value", "allowed", "also"), MISTAKES)
def test_each_mistake_is_one_clear_error(tmp_path, base, mutate, key, value, allowed, also):
    doc = parsed(base)
    mutate(doc)
    path = write(tmp_path, doc, "my_study.toml")
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert caught.value.key == key, message
    assert f": {key}" in message, message
    if value is not None:
        assert value in message, message
    assert "; allowed: " in message and allowed in message.split("; allowed: ", 1)[1], message
    for text in also:
        assert text in message, message
    assert "\n" not in message


def test_a_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(StudyConfigError, match=r"nope\.toml: cannot read the study file"):
        load_study_config(path)
    with pytest.raises(StudyConfigError, match="cannot read the study file"):
        load_study_config(tmp_path)  # a directory


def test_invalid_toml_names_the_line(tmp_path):
    text = MNIST_MLP.read_text().replace("n_trials = 20", "n_trials = = 20")
    line = text.splitlines().index(next(s for s in text.splitlines() if "= = 20" in s)) + 1
    path = write(tmp_path, text, "broken.toml")
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML") and f"line {line}" in message, message
    assert "allowed: TOML" in message


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MNIST_MLP.read_bytes().replace(b"mnist_mlp", b"mnist_\xe9", 1))
    with pytest.raises(StudyConfigError, match="not UTF-8"):
        load_study_config(path)


def test_a_value_checked_in_the_file_keeps_its_key_and_the_file(tmp_path):
    """SearchParam validates on construction too; outside a file its errors name the key."""
    with pytest.raises(StudyConfigError) as caught:
        SearchParam("learning_rate", "float", low=0.0, high=1.0)
    assert caught.value.path is None
    assert str(caught.value).startswith("search.learning_rate.low = 0.0: out of range")


# --- invalid combinations and the pairwise check of large search spaces -------------------------


def _big_search(**extra: Doc) -> Doc:
    doc = parsed(MNIST_MLP)
    for name in ("activation", "init", "optimizer", "nesterov"):
        doc["fixed"].pop(name)
    doc["search"] = {
        "activation": {"type": "categorical", "choices": list(ACTIVATIONS)},
        "init": {"type": "categorical", "choices": list(INIT_SCHEMES)},
        "optimizer": {"type": "categorical", "choices": list(OPTIMIZERS)},
        "nesterov": {"type": "categorical", "choices": [True, False]},
        "hidden_size": {"type": "categorical", "choices": list(range(10, 110, 10))},
        "batch_size": {"type": "categorical", "choices": list(range(16, 176, 16))},
        **extra,
    }
    return doc


def test_large_search_spaces_are_checked_pairwise(tmp_path):
    config = load_study_config(write(tmp_path, _big_search()))
    assert math.prod(len(p.corners()) for p in config.search) > MAX_COMBINATIONS
    doc = _big_search(output={"type": "categorical", "choices": ["softmax", "sigmoid"]})
    doc["fixed"].pop("output")
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(write(tmp_path, doc))
    assert caught.value.key == "search.output"
    assert 'search.output = "sigmoid"' in str(caught.value)


def test_every_corner_of_a_valid_study_builds_a_train_config():
    for path in SHIPPED:
        config = load_study_config(path)
        for values in itertools.product(*(p.corners() for p in config.search)):
            suggested = dict(zip(config.search_names, values))
            assert config.train_config(suggested).as_params().items() >= suggested.items()


# --- train_config, overrides, batch sizes, the dataclasses --------------------------------------


def test_train_config_is_fixed_plus_suggested():
    config = load_study_config(MNIST_MLP)
    suggested = {"hidden_size": 300, "learning_rate": 0.05, "batch_size": 128, "l2": 1e-5}
    train_config = config.train_config(suggested)
    assert train_config == TrainConfig(**{**config.fixed, **suggested})
    assert train_config.hidden_size == 300 and train_config.epochs == 8
    with pytest.raises(ValueError, match="missing l2"):
        config.train_config({k: v for k, v in suggested.items() if k != "l2"})
    with pytest.raises(ValueError, match="not searched: epochs"):
        config.train_config({**suggested, "epochs": 3})
    with pytest.raises(ValueError, match="learning_rate"):
        config.train_config({**suggested, "learning_rate": -1.0})


def test_overrides():
    config = load_study_config(MNIST_MLP)
    changed = with_overrides(config, n_trials=3, timeout=60, epochs=2, name="smoke")
    assert (changed.n_trials, changed.timeout, changed.fixed["epochs"], changed.name) == (
        3,
        60.0,
        2,
        "smoke",
    )
    assert changed.search == config.search and changed.path == config.path
    assert {k: v for k, v in changed.fixed.items() if k != "epochs"} == {
        k: v for k, v in config.fixed.items() if k != "epochs"
    }
    assert with_overrides(config) == config
    assert config.n_trials == 20 and config.fixed["epochs"] == 8  # the original is unchanged


@pytest.mark.parametrize(
    ("overrides", "key", "value", "allowed"),
    [
        ({"n_trials": 0}, "study.n_trials", "0", "an integer from 1 to 100000"),
        ({"n_trials": "5"}, "study.n_trials", '"5"', "an integer from 1 to 100000"),
        ({"n_trials": True}, "study.n_trials", "true", "an integer from 1 to 100000"),
        ({"n_trials": 10**20}, "study.n_trials", "100000000000000000000", "an integer from 1 to"),
        ({"timeout": -5}, "study.timeout", "-5", "a number of seconds > 0"),
        ({"timeout": math.inf}, "study.timeout", "inf", "a number of seconds > 0"),
        ({"epochs": 0}, "fixed.epochs", "0", "an integer from 1 to 100000"),
        ({"epochs": 2.5}, "fixed.epochs", "2.5", "an integer from 1 to 100000"),
        ({"epochs": 10**12}, "fixed.epochs", "1000000000000", "an integer from 1 to 100000"),
        ({"name": "."}, "study.name", '"."', "a name of letters, digits"),
        ({"name": ".."}, "study.name", '".."', "a name of letters, digits"),
        ({"name": "../up"}, "study.name", '"../up"', "a name of letters, digits"),
        ({"name": " padded "}, "study.name", '" padded "', "a name of letters, digits"),
        # a quote would break MLflow's tag filters that find the study's parent run
        ({"name": "bob's"}, "study.name", '"bob\'s"', "a name of letters, digits"),
    ],
)
def test_bad_overrides(overrides, key, value, allowed):
    config = load_study_config(MNIST_MLP)
    with pytest.raises(StudyConfigError) as caught:
        with_overrides(config, **overrides)
    message = str(caught.value)
    assert message.startswith(f"{MNIST_MLP}: {key} = {value}: "), message
    assert "(given on the command line)" in message and f"; allowed: {allowed}" in message


def test_check_batch_size(tmp_path):
    config = load_study_config(MNIST_MLP)
    check_batch_size(config, 256)
    with pytest.raises(StudyConfigError) as caught:
        check_batch_size(config, 200)
    assert caught.value.key == "search.batch_size.choices"
    assert "[256] larger than the 200 training rows" in str(caught.value)
    assert "allowed: at most the 200 training rows" in str(caught.value)

    doc = parsed(MNIST_MLP)
    doc["search"]["batch_size"] = {"type": "int", "low": 32, "high": 512, "log": True}
    with pytest.raises(StudyConfigError, match=r"search\.batch_size\.high = 512: larger"):
        check_batch_size(load_study_config(write(tmp_path, doc)), 500)

    doc = parsed(MNIST_MLP)
    del doc["search"]["batch_size"]
    doc["fixed"]["batch_size"] = 128
    fixed = load_study_config(write(tmp_path, doc))
    check_batch_size(fixed, 128)
    with pytest.raises(StudyConfigError, match=r"fixed\.batch_size = 128: larger than the 100"):
        check_batch_size(fixed, 100)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_train_rows"):
            check_batch_size(fixed, bad)


def test_configs_are_frozen_hashable_picklable_and_always_valid():
    config = load_study_config(MNIST_MLP)
    with pytest.raises(FrozenInstanceError):
        config.n_trials = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.fixed["epochs"] = 5  # type: ignore[index]
    assert hash(config) == hash(load_study_config(MNIST_MLP))
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(StudyConfigError, match=r"mnist_mlp\.toml: study\.n_trials = 0"):
        replace(config, n_trials=0)
    with pytest.raises(StudyConfigError, match="both fixed and searched"):
        replace(config, fixed={**config.fixed, "hidden_size": 64})
    with pytest.raises(StudyConfigError, match="missing epochs"):
        replace(config, fixed={k: v for k, v in config.fixed.items() if k != "epochs"})


# --- property: mutated study files load or raise StudyConfigError, nothing else -----------------

KEYS = sorted(
    {"study", "fixed", "search", "type", "low", "high", "log", "step", "choices", "name"}
    | {"objective", "n_trials", "timeout", "sampler", "pruner", "seed", "preset"}
    | set(TrainConfig.field_names())
)
NAMES = sorted(
    {*ACTIVATIONS, *OUTPUTS, *LOSSES, *INIT_SCHEMES, *OPTIMIZERS, *KINDS, "float32", "float64"}
    | {"tpe", "random", "median", "hyperband", "none", "origin", "default", "val/loss"}
)
SCALARS = st.one_of(
    st.integers(-3, 2000),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-4, 0.01, 0.5, 0.99, 1.0, 64.0]),
    st.booleans(),
    st.sampled_from(NAMES),
    st.text(max_size=8),
    st.dates(),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), SCALARS, max_size=3),
)
KEY_TEXT = st.sampled_from(KEYS) | st.text(min_size=0, max_size=10)


def _tables(doc: Doc) -> list[Doc]:
    """Every table of the document, the root first."""
    found = [doc]
    for value in doc.values():
        if isinstance(value, dict):
            found.extend(_tables(value))
    return found


def _slots(doc: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) holding a value, in tables and arrays."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    found = []
    for key, value in items:
        found.append((doc, key))
        if isinstance(value, dict | list):
            found.extend(_slots(value))
    return found


def _typo(draw: Any, word: str) -> str:
    if not word:
        return draw(st.text(min_size=1, max_size=5))
    i = draw(st.integers(0, len(word) - 1))
    return draw(
        st.sampled_from(
            [
                word[:i] + word[i + 1 :],
                word[:i] + word[i] + word[i:],
                word[:i] + "x" + word[i + 1 :],
                word.upper(),
                word + "s",
            ]
        )
    )


def _mutate(doc: Doc, draw: Any) -> None:
    """Applies one random mistake to the document, in place."""
    kind = draw(
        st.sampled_from(
            [
                "drop",
                "typo key",
                "add key",
                "change value",
                "garbage name",
                "nudge number",
                "swap low high",
                "fix a searched field",
                "search a field",
                "bad choices",
            ]
        )
    )
    slots = _slots(doc)
    if kind == "drop" and slots:
        container, key = draw(st.sampled_from(slots))
        del container[key]
    elif kind == "typo key":
        table = draw(st.sampled_from(_tables(doc)))
        if table:
            key = draw(st.sampled_from(sorted(table)))
            table[_typo(draw, key)] = table.pop(key) if draw(st.booleans()) else table[key]
    elif kind == "add key":
        draw(st.sampled_from(_tables(doc)))[draw(KEY_TEXT)] = draw(VALUES)
    elif kind == "change value" and slots:
        container, key = draw(st.sampled_from(slots))
        container[key] = draw(VALUES)
    elif kind == "garbage name":
        strings = [(c, k) for c, k in slots if isinstance(c[k], str)]
        if strings:
            container, key = draw(st.sampled_from(strings))
            container[key] = draw(st.text(max_size=10) | st.sampled_from(NAMES))
    elif kind == "nudge number":
        numbers = [
            (c, k) for c, k in slots if isinstance(c[k], int | float) and not isinstance(c[k], bool)
        ]
        if numbers:
            container, key = draw(st.sampled_from(numbers))
            value = container[key]
            container[key] = draw(
                st.sampled_from([-value, 0, value * 1000, value + 0.5, float(value), 1])
            )
    elif kind == "swap low high":
        ranges = [t for t in _tables(doc) if "low" in t and "high" in t]
        if ranges:
            table = draw(st.sampled_from(ranges))
            table["low"], table["high"] = table["high"], table["low"]
    elif kind == "fix a searched field":
        search = doc.get("search")
        if isinstance(search, dict) and search and isinstance(doc.get("fixed"), dict):
            name = draw(st.sampled_from(sorted(search)))
            doc["fixed"][name] = draw(VALUES)
    elif kind == "search a field":
        if isinstance(doc.get("search"), dict):
            name = draw(st.sampled_from(TrainConfig.field_names()) | KEY_TEXT)
            spec = draw(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(KINDS) | st.text(max_size=5)},
                    optional={
                        "low": SCALARS,
                        "high": SCALARS,
                        "log": st.booleans() | SCALARS,
                        "step": SCALARS,
                        "choices": st.lists(SCALARS, max_size=4),
                    },
                )
            )
            doc["search"][name] = spec
            if draw(st.booleans()) and isinstance(doc.get("fixed"), dict):
                doc["fixed"].pop(name, None)
    elif kind == "bad choices":
        lists = [t for t in _tables(doc) if isinstance(t.get("choices"), list)]
        if lists:
            table = draw(st.sampled_from(lists))
            choices = table["choices"]
            table["choices"] = draw(
                st.sampled_from([[], choices[:1], choices + choices[:1], [*choices, "x"]])
            )


def _assert_loads_or_study_error(path: Path) -> None:
    try:
        config = load_study_config(path)
    except StudyConfigError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        event("rejected with one message")  # counted by --hypothesis-show-statistics
        return
    event("a valid study")
    assert isinstance(config, StudyConfig)
    # a valid study: every corner of its search builds a TrainConfig
    corners = itertools.product(*(p.corners() for p in config.search))
    for values in itertools.islice(corners, 50):
        config.train_config(dict(zip(config.search_names, values)))
    try:
        check_batch_size(config, 50_000)
    except StudyConfigError as error:
        assert "training rows" in str(error)


_PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(data=st.data(), source=st.sampled_from(SHIPPED))
def test_mutated_study_files_load_or_raise_study_config_error(tmp_path_factory, data, source):
    doc = copy.deepcopy(parsed(source))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(doc, data.draw)
    text = dumps(doc)
    assert dumps(tomllib.loads(text)) == text  # the writer itself is sound
    path = tmp_path_factory.getbasetemp() / "mutated.toml"
    path.write_text(text)
    _assert_loads_or_study_error(path)


@_PROPERTY
@given(
    source=st.sampled_from(SHIPPED),
    cut=st.integers(0, 4000),
    length=st.integers(0, 20),
    insert=st.binary(max_size=6) | st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"[search.x]"]),
)
def test_corrupted_study_text_is_a_study_config_error(
    tmp_path_factory, source, cut, length, insert
):
    raw = source.read_bytes()
    cut %= len(raw)
    path = tmp_path_factory.getbasetemp() / "corrupted.toml"
    path.write_bytes(raw[:cut] + insert + raw[cut + length :])
    _assert_loads_or_study_error(path)
